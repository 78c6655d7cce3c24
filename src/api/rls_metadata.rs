//! `--rls-dynamic-metadata`: the response's dynamic metadata in
//! envoyproxy/ratelimit's shape, for the filters after Envoy's rate limit
//! filter: `domain`, `descriptors` (each one's `entries` as `key=value`,
//! its `limit` override and `hitsAddend` when set), the request's
//! `hitsAddend` when set, and `metadata`: the configured `metadata` of every
//! descriptor that passed, merged (a key already present keeps its value,
//! maps merge key by key).

use std::collections::BTreeMap;

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};

use crate::envoy::service::ratelimit::v3::RateLimitRequest;
use crate::limits::Verdict;

/// What the request told, kept for the answer.
pub struct Told {
    domain: String,
    hits_addend: u32,
    descriptors: Vec<Value>,
}

fn string(s: String) -> Value {
    Value {
        kind: Some(Kind::StringValue(s)),
    }
}

fn number(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

fn object(fields: BTreeMap<String, Value>) -> Value {
    Value {
        kind: Some(Kind::StructValue(Struct { fields })),
    }
}

impl Told {
    pub fn of(req: &RateLimitRequest) -> Told {
        let descriptors = req
            .descriptors
            .iter()
            .map(|d| {
                let mut fields = BTreeMap::new();
                let entries = d
                    .entries
                    .iter()
                    .map(|e| string(format!("{}={}", e.key, e.value)))
                    .collect();
                fields.insert(
                    "entries".to_owned(),
                    Value {
                        kind: Some(Kind::ListValue(ListValue { values: entries })),
                    },
                );
                if let Some(limit) = &d.limit {
                    fields.insert(
                        "limit".to_owned(),
                        string(format!(
                            "requests_per_unit:{} unit:{}",
                            limit.requests_per_unit,
                            crate::limits::Unit::from_envoy(limit.unit)
                                .map_or("UNKNOWN".to_owned(), |u| u.name().to_uppercase())
                        )),
                    );
                }
                if let Some(hits) = d.hits_addend {
                    fields.insert("hitsAddend".to_owned(), number(hits as f64));
                }
                object(fields)
            })
            .collect();
        Told {
            domain: req.domain.clone(),
            hits_addend: req.hits_addend,
            descriptors,
        }
    }

    /// The dynamic metadata for an answer of `verdicts` (one per descriptor).
    pub fn metadata(self, verdicts: &[Verdict]) -> Struct {
        let mut fields = BTreeMap::new();
        fields.insert("domain".to_owned(), string(self.domain));
        fields.insert(
            "descriptors".to_owned(),
            Value {
                kind: Some(Kind::ListValue(ListValue {
                    values: self.descriptors,
                })),
            },
        );
        if self.hits_addend != 0 {
            fields.insert("hitsAddend".to_owned(), number(f64::from(self.hits_addend)));
        }
        let mut passed = Struct::default();
        for v in verdicts {
            if let Verdict::Checked {
                rule,
                result,
                shadow,
                ..
            } = v
            {
                if result.allowed || *shadow {
                    if let Some(m) = &rule.metadata {
                        merge(&mut passed, m);
                    }
                }
            }
        }
        if !passed.fields.is_empty() {
            fields.insert(
                "metadata".to_owned(),
                Value {
                    kind: Some(Kind::StructValue(passed)),
                },
            );
        }
        Struct { fields }
    }
}

/// Adds `from`'s fields to `into`: a new key is added, two maps under one
/// key are merged, anything else keeps what `into` had.
fn merge(into: &mut Struct, from: &Struct) {
    for (k, v) in &from.fields {
        match into.fields.get_mut(k) {
            None => {
                into.fields.insert(k.clone(), v.clone());
            }
            Some(Value {
                kind: Some(Kind::StructValue(mine)),
            }) => {
                if let Some(Kind::StructValue(theirs)) = &v.kind {
                    merge(mine, theirs);
                }
            }
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, Value)]) -> Struct {
        Struct {
            fields: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        }
    }

    #[test]
    fn maps_merge_key_by_key_and_the_first_value_stays() {
        let mut into = map(&[
            ("a", string("first".into())),
            ("m", object(map(&[("x", number(1.0))]).fields)),
        ]);
        let from = map(&[
            ("a", string("second".into())),
            ("b", string("new".into())),
            (
                "m",
                object(map(&[("x", number(2.0)), ("y", number(3.0))]).fields),
            ),
        ]);
        merge(&mut into, &from);
        assert_eq!(into.fields["a"], string("first".into()));
        assert_eq!(into.fields["b"], string("new".into()));
        assert_eq!(
            into.fields["m"],
            object(map(&[("x", number(1.0)), ("y", number(3.0))]).fields)
        );
    }
}
