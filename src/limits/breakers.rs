//! Circuit breaker thresholds in the limits files: a file whose top level
//! is `breakers:` (instead of envoyproxy/ratelimit's `domain:`) maps
//! breaker names to thresholds. A call on a breaker takes each threshold
//! it leaves unset (0) from here, then from the built-in defaults.
//!
//! ```yaml
//! breakers:
//!   payments:
//!     window_ms: 10000
//!     min_calls: 20
//!     failure_percent: 50
//!     open_ms: 5000
//!     probes: 1
//!     probes_to_close: 3
//!     probe_ttl_ms: 10000
//! ```

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use crate::engine::BreakerDef;

/// One breaker's thresholds as written (each optional).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    pub window_ms: Option<u64>,
    pub min_calls: Option<u32>,
    pub failure_percent: Option<u32>,
    pub open_ms: Option<u64>,
    pub probes: Option<u32>,
    pub probes_to_close: Option<u32>,
    pub probe_ttl_ms: Option<u64>,
}

impl Thresholds {
    /// `self` over `under`: each threshold set here, or `under`'s.
    pub fn over(&self, under: BreakerDef) -> BreakerDef {
        BreakerDef {
            window_ms: self.window_ms.unwrap_or(under.window_ms),
            min_calls: self.min_calls.unwrap_or(under.min_calls),
            failure_percent: self.failure_percent.unwrap_or(under.failure_percent),
            open_ms: self.open_ms.unwrap_or(under.open_ms),
            probes: self.probes.unwrap_or(under.probes),
            probes_to_close: self.probes_to_close.unwrap_or(under.probes_to_close),
            probe_ttl_ms: self.probe_ttl_ms.unwrap_or(under.probe_ttl_ms),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakersDoc {
    breakers: BTreeMap<String, Thresholds>,
}

/// Whether `text` is a breakers file (a top-level `breakers:` and no
/// `domain:`).
pub fn is_breakers_file(text: &str) -> bool {
    match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text) {
        Ok(serde_yaml_ng::Value::Mapping(m)) => {
            m.contains_key("breakers") && !m.contains_key("domain")
        }
        _ => false,
    }
}

/// Parses a breakers file: each breaker's thresholds, over the defaults,
/// within their bounds (errors name the breaker and the field).
pub fn parse(text: &str) -> Result<HashMap<String, Thresholds>, String> {
    let doc: BreakersDoc = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    let mut out = HashMap::new();
    for (name, t) in doc.breakers {
        if name.is_empty() || name.len() > 1024 {
            return Err(format!("breaker {name:?}: names are 1 to 1024 bytes"));
        }
        t.over(BreakerDef::default())
            .validate()
            .map_err(|(field, bound)| format!("breakers.{name}.{field}: {bound}"))?;
        out.insert(name, t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_breakers_file_sets_thresholds_over_the_defaults() {
        let text = "breakers:\n  payments:\n    min_calls: 5\n    open_ms: 2000\n";
        assert!(is_breakers_file(text));
        assert!(!is_breakers_file("domain: d\ndescriptors: []\n"));
        let parsed = parse(text).unwrap();
        let def = parsed["payments"].over(BreakerDef::default());
        assert_eq!((def.min_calls, def.open_ms), (5, 2000));
        assert_eq!(def.window_ms, BreakerDef::default().window_ms);
    }

    #[test]
    fn bad_thresholds_name_the_breaker_and_field() {
        let err = parse("breakers:\n  pay:\n    failure_percent: 120\n").unwrap_err();
        assert_eq!(err, "breakers.pay.failure_percent: must be 1 to 100");
        let err = parse("breakers:\n  pay:\n    open_after: 3\n").unwrap_err();
        assert!(err.contains("unknown field `open_after`"), "{err}");
    }
}
