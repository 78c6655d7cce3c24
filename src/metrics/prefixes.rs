//! Rate-limit decisions by key prefix (`arbiter_decisions_by_prefix_total`),
//! for the dashboard's and `arbiter top`'s hottest keys. A key's prefix is
//! the key up to and including its first separator (`/`, `:` or `.`), or
//! the whole key if it has none. The first [`MAX_PREFIXES`] prefixes seen
//! get their own series; the rest count under [`OTHER`], so the series
//! stay bounded whatever keys callers send.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Prefixes with a series of their own, at most.
pub const MAX_PREFIXES: usize = 64;
/// The `prefix` label of every prefix past [`MAX_PREFIXES`].
pub const OTHER: &str = "(other)";

/// Allowed and denied decisions of one prefix.
#[derive(Default)]
pub struct Counts {
    allowed: AtomicU64,
    denied: AtomicU64,
}

impl Counts {
    pub fn count(&self, allowed: bool) {
        let n = if allowed { &self.allowed } else { &self.denied };
        n.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct Prefixes {
    known: RwLock<HashMap<Box<str>, Arc<Counts>>>,
    other: Arc<Counts>,
}

/// `key`'s prefix.
pub fn prefix_of(key: &str) -> &str {
    match key.find(['/', ':', '.']) {
        Some(i) => &key[..=i],
        None => key,
    }
}

impl Prefixes {
    /// The counts `key`'s decision goes to (taken before the decision, so
    /// the keys need not be kept until it is made).
    pub fn counts_for(&self, key: &str) -> Arc<Counts> {
        let prefix = prefix_of(key);
        let read = self.known.read().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = read.get(prefix) {
            return c.clone();
        }
        let full = read.len() >= MAX_PREFIXES;
        drop(read);
        if full {
            return self.other.clone();
        }
        let mut write = self.known.write().unwrap_or_else(|e| e.into_inner());
        if write.len() >= MAX_PREFIXES && !write.contains_key(prefix) {
            return self.other.clone();
        }
        write.entry(prefix.into()).or_default().clone()
    }

    /// `arbiter_decisions_by_prefix_total{prefix,result}` in Prometheus
    /// text format.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# HELP arbiter_decisions_by_prefix_total Rate-limit decisions by key prefix (up to \
             the first /, : or .; past 64 prefixes, \"(other)\").\n\
             # TYPE arbiter_decisions_by_prefix_total counter\n",
        );
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        let all = known
            .iter()
            .map(|(p, c)| (&**p, c))
            .chain([(OTHER, &self.other)]);
        for (prefix, c) in all {
            let prefix = escape(prefix);
            for (result, n) in [("allowed", &c.allowed), ("denied", &c.denied)] {
                let n = n.load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "arbiter_decisions_by_prefix_total{{prefix=\"{prefix}\",result=\"{result}\"}} {n}"
                );
            }
        }
        out
    }
}

/// A label value as Prometheus text format writes it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_end_at_the_first_separator() {
        assert_eq!(prefix_of("api/user/1"), "api/");
        assert_eq!(prefix_of("user:42"), "user:");
        assert_eq!(prefix_of("a.b/c"), "a.");
        assert_eq!(prefix_of("plain"), "plain");
    }

    #[test]
    fn past_the_bound_prefixes_count_as_other_and_labels_are_escaped() {
        let p = Prefixes::default();
        for i in 0..MAX_PREFIXES + 10 {
            p.counts_for(&format!("t{i}/k")).count(i % 2 == 0);
        }
        p.counts_for("t0/other-key").count(false);
        p.counts_for("q\"uo\\te/k").count(true);
        let text = p.render();
        assert!(
            text.contains("prefix=\"t0/\",result=\"allowed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("prefix=\"t0/\",result=\"denied\"} 1"),
            "{text}"
        );
        // 10 past the bound, and the quoted one: 6 allowed, 5 denied.
        assert!(
            text.contains("prefix=\"(other)\",result=\"allowed\"} 6"),
            "{text}"
        );
        assert!(
            text.contains("prefix=\"(other)\",result=\"denied\"} 5"),
            "{text}"
        );
        assert_eq!(text.matches("result=\"allowed\"").count(), MAX_PREFIXES + 1);
    }

    #[test]
    fn an_escaped_label_reads_back() {
        let p = Prefixes::default();
        p.counts_for("q\"uo\\te\nx/k").count(true);
        assert!(p
            .render()
            .contains(r#"prefix="q\"uo\\te\nx/",result="allowed"} 1"#));
    }
}
