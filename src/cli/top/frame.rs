//! What `arbiter top` shows, from two samples of every member's metrics:
//! parsing the Prometheus text, rates over the interval between them, and
//! the frame as plain text (pure functions, tested here).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use crate::proto as pb;

/// One series of a member's metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// One member's metrics, by series name.
#[derive(Clone, Debug, Default)]
pub struct Scrape(HashMap<String, Vec<Sample>>);

impl Scrape {
    /// Parses Prometheus text format; lines it cannot read are skipped.
    pub fn parse(text: &str) -> Self {
        let mut by_name: HashMap<String, Vec<Sample>> = HashMap::new();
        for sample in text.lines().filter_map(parse_line) {
            by_name.entry(sample.name.clone()).or_default().push(sample);
        }
        Self(by_name)
    }

    fn all(&self, name: &str) -> &[Sample] {
        self.0.get(name).map_or(&[], Vec::as_slice)
    }

    /// The first series of `name` whose labels include `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.all(name)
            .iter()
            .find(|s| labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
            .map(|s| s.value)
    }
}

/// `name{k="v",...} value` (a timestamp after the value is ignored).
fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let (labels, rest) = parse_labels(&line[open + 1..])?;
            (&line[..open], labels, rest)
        }
        None => {
            let (name, rest) = line.split_once(' ')?;
            (name, Vec::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `k="v",k2="v2"} rest` → the labels and `rest`.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let (key, rest) = s.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_owned(), value));
        s = &rest[end + 1..];
    }
}

/// Every member's metrics at one moment, and the cluster's status then.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub status: pb::ClusterStatusResponse,
    /// By member id: its metrics, or why they did not come.
    pub members: BTreeMap<u64, Result<Scrape, String>>,
}

impl Snapshot {
    pub fn new(status: pb::ClusterStatusResponse, metrics: pb::ClusterMetricsResponse) -> Self {
        let members = metrics
            .members
            .into_iter()
            .map(|m| {
                let scrape = if m.error.is_empty() {
                    Ok(Scrape::parse(&m.text))
                } else {
                    Err(m.error)
                };
                (m.id, scrape)
            })
            .collect();
        Self { status, members }
    }

    fn scrape(&self, id: u64) -> Option<&Scrape> {
        self.members.get(&id).and_then(|m| m.as_ref().ok())
    }
}

/// Per second, of `name{labels}` summed over every member that answered
/// both times (a member restarted meanwhile counts from 0).
fn rate(
    before: &Snapshot,
    now: &Snapshot,
    id: u64,
    name: &str,
    labels: &[(&str, &str)],
    secs: f64,
) -> Option<f64> {
    let then = before.scrape(id)?.get(name, labels)?;
    let now = now.scrape(id)?.get(name, labels)?;
    let delta = if now >= then { now - then } else { now };
    Some(delta / secs)
}

/// The increase of each series of `name` (keyed by `key` of its labels)
/// summed over members.
fn increases(
    before: &Snapshot,
    now: &Snapshot,
    name: &str,
    key: impl Fn(&Sample) -> Option<String>,
) -> BTreeMap<String, f64> {
    let mut sums = BTreeMap::new();
    for (id, scrape) in &now.members {
        let (Ok(scrape), Some(then)) = (scrape, before.scrape(*id)) else {
            continue;
        };
        for s in scrape.all(name) {
            let Some(k) = key(s) else { continue };
            let labels: Vec<(&str, &str)> = s
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let old = then.get(name, &labels).unwrap_or(0.0);
            let delta = if s.value >= old {
                s.value - old
            } else {
                s.value
            };
            *sums.entry(k).or_insert(0.0) += delta;
        }
    }
    sums
}

/// The upper bound (seconds) of the bucket holding quantile `q` of
/// cumulative `buckets` (upper bound, count), `None` without calls.
fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.iter().map(|(_, n)| *n).fold(0.0, f64::max);
    if total <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map(|(le, _)| *le)
}

fn millis(seconds: f64) -> String {
    if seconds.is_infinite() {
        "> 1 s".to_owned()
    } else if seconds < 0.001 {
        format!("≤ {} µs", (seconds * 1e6).round())
    } else {
        format!("≤ {} ms", (seconds * 1e4).round() / 10.0)
    }
}

fn per_second(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.1}"))
}

/// The frame for the interval from `before` to `now` (`elapsed` apart);
/// without `before`, counts only (rates need two samples).
pub fn render(
    server: &str,
    before: Option<&Snapshot>,
    now: &Snapshot,
    elapsed: Duration,
    every: Duration,
) -> String {
    let st = &now.status;
    let mut out = String::new();
    let leader = st.leader_id.map_or("none".to_owned(), |l| l.to_string());
    let _ = writeln!(
        out,
        "arbiter top  {server}  leader {leader}  term {}  members {}   (every {:?}; q quits)\n",
        st.term,
        st.members.len(),
        every
    );
    let secs = elapsed.as_secs_f64().max(1e-3);
    let leader_scrape = st.leader_id.and_then(|l| now.scrape(l));
    let _ = writeln!(
        out,
        "{:>4}  {:<10} {:>5} {:>9} {:>6} {:>6} {:>12} {:>7} {:>8} {:>8}",
        "ID",
        "ROLE",
        "TERM",
        "APPLIED",
        "LAG",
        "SLOTS",
        "DECISIONS/S",
        "DENIED",
        "LEASES",
        "RECORDS"
    );
    let (mut allowed_sum, mut denied_sum, mut leases, mut records) = (0.0, 0.0, 0.0_f64, 0.0_f64);
    for m in &st.members {
        let Some(scrape) = now.scrape(m.id) else {
            let why = now
                .members
                .get(&m.id)
                .and_then(|r| r.as_ref().err())
                .map_or("not asked", String::as_str);
            let _ = writeln!(out, "{:>4}  (no metrics: {why})", m.id);
            continue;
        };
        let role = ["Leader", "Follower", "Candidate", "Learner", "Shutdown"]
            .into_iter()
            .find(|r| scrape.get("arbiter_raft_state", &[("state", r)]) == Some(1.0))
            .unwrap_or("?");
        let lag = if Some(m.id) == st.leader_id {
            "-".to_owned()
        } else {
            let peer = m.id.to_string();
            leader_scrape
                .and_then(|s| s.get("arbiter_raft_follower_lag_entries", &[("peer", &peer)]))
                .map_or("?".to_owned(), |v| format!("{v:.0}"))
        };
        let value = |name: &str, labels: &[(&str, &str)]| scrape.get(name, labels).unwrap_or(0.0);
        let rates = before.map(|b| {
            let allowed = rate(
                b,
                now,
                m.id,
                "arbiter_decisions_total",
                &[("result", "allowed")],
                secs,
            )
            .unwrap_or(0.0);
            let denied = rate(
                b,
                now,
                m.id,
                "arbiter_decisions_total",
                &[("result", "denied")],
                secs,
            )
            .unwrap_or(0.0);
            (allowed, denied)
        });
        let (decisions, denied_share) = match rates {
            Some((a, d)) => {
                allowed_sum += a;
                denied_sum += d;
                let share = if a + d > 0.0 {
                    format!("{:.1}%", 100.0 * d / (a + d))
                } else {
                    "-".into()
                };
                (format!("{:.1}", a + d), share)
            }
            None => ("-".into(), "-".into()),
        };
        let (l, r) = (
            value("arbiter_live_keys", &[("kind", "lease")]),
            value("arbiter_live_keys", &[("kind", "idempotency_record")]),
        );
        leases = leases.max(l);
        records = records.max(r);
        let _ = writeln!(
            out,
            "{:>4}  {:<10} {:>5} {:>9} {:>6} {:>6} {:>12} {:>7} {:>8} {:>8}",
            m.id,
            role,
            value("arbiter_raft_term", &[]),
            value("arbiter_raft_applied_index", &[]),
            lag,
            m.slots,
            decisions,
            denied_share,
            l,
            r
        );
    }
    let _ = writeln!(
        out,
        "\ncluster: {} decisions/s ({} allowed, {} denied)   leases {leases}   records {records}",
        per_second(before.map(|_| allowed_sum + denied_sum)),
        per_second(before.map(|_| allowed_sum)),
        per_second(before.map(|_| denied_sum)),
    );
    if let Some(before) = before {
        render_rpcs(&mut out, before, now, secs);
        render_prefixes(&mut out, before, now, secs);
        render_named(&mut out, before, now, secs);
    }
    out
}

fn render_rpcs(out: &mut String, before: &Snapshot, now: &Snapshot, secs: f64) {
    let buckets = increases(before, now, "arbiter_rpc_duration_seconds_bucket", |s| {
        Some(format!("{}\u{0}{}", s.label("rpc")?, s.label("le")?))
    });
    let mut by_rpc: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for (key, n) in &buckets {
        let (rpc, le) = key.split_once('\u{0}').unwrap_or((key, "+Inf"));
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::INFINITY)
        };
        by_rpc.entry(rpc).or_default().push((le, *n));
    }
    let mut rows: Vec<(&str, f64, Option<f64>)> = by_rpc
        .into_iter()
        .map(|(rpc, mut b)| {
            b.sort_by(|x, y| x.0.total_cmp(&y.0));
            let calls = b.last().map_or(0.0, |(_, n)| *n);
            (rpc, calls / secs, quantile(0.99, &b))
        })
        .filter(|(_, calls, _)| *calls > 0.0)
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let _ = writeln!(out, "\n{:<18} {:>10} {:>12}", "RPC", "CALLS/S", "P99");
    if rows.is_empty() {
        let _ = writeln!(out, "(no calls)");
    }
    for (rpc, calls, p99) in rows {
        let _ = writeln!(
            out,
            "{rpc:<18} {calls:>10.1} {:>12}",
            p99.map_or("-".to_owned(), millis)
        );
    }
}

fn render_prefixes(out: &mut String, before: &Snapshot, now: &Snapshot, secs: f64) {
    let name = "arbiter_decisions_by_prefix_total";
    let all = increases(before, now, name, |s| s.label("prefix").map(str::to_owned));
    let denied = increases(before, now, name, |s| {
        (s.label("result") == Some("denied")).then(|| s.label("prefix").map(str::to_owned))?
    });
    top_table(out, "KEY PREFIX (top 10)", &all, &denied, secs);
}

fn render_named(out: &mut String, before: &Snapshot, now: &Snapshot, secs: f64) {
    let key = |s: &Sample| Some(format!("{} {}", s.label("domain")?, s.label("rule")?));
    let hits = increases(before, now, "arbiter_rls_hits_total", key);
    let over = increases(before, now, "arbiter_rls_over_limit_total", key);
    top_table(out, "NAMED LIMIT (top 10)", &hits, &over, secs);
}

/// The 10 busiest of `hits` (increases over the interval), per second,
/// with the share of them in `denied`; nothing when none moved.
fn top_table(
    out: &mut String,
    title: &str,
    hits: &BTreeMap<String, f64>,
    denied: &BTreeMap<String, f64>,
    secs: f64,
) {
    let over = denied;
    let mut rows: Vec<(&String, f64)> = hits
        .iter()
        .map(|(k, n)| (k, *n))
        .filter(|(_, n)| *n > 0.0)
        .collect();
    if rows.is_empty() {
        return;
    }
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let _ = writeln!(out, "\n{title:<32} {:>10} {:>7}", "CHECKS/S", "DENIED");
    for (name, n) in rows.into_iter().take(10) {
        let denied = over.get(name).copied().unwrap_or(0.0);
        let _ = writeln!(
            out,
            "{name:<32} {:>10.1} {:>6.1}%",
            n / secs,
            100.0 * denied / n
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_with_labels_escapes_and_specials() {
        let s = Scrape::parse(
            "# HELP x y\nplain 3\nwith{a=\"1\",b=\"q\\\"uo,te\"} 2.5\ninf{le=\"+Inf\"} +Inf\nbroken{a=\"1\" 4\n",
        );
        assert_eq!(s.get("plain", &[]), Some(3.0));
        assert_eq!(s.get("with", &[("b", "q\"uo,te")]), Some(2.5));
        assert_eq!(s.get("with", &[("a", "2")]), None);
        assert_eq!(s.get("inf", &[("le", "+Inf")]), Some(f64::INFINITY));
        assert_eq!(s.get("broken", &[]), None);
    }

    #[test]
    fn the_quantile_is_the_bound_of_the_bucket_it_falls_in() {
        let b = [
            (0.001, 90.0),
            (0.01, 99.0),
            (0.1, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert_eq!(quantile(0.5, &b), Some(0.001));
        assert_eq!(quantile(0.99, &b), Some(0.01));
        assert_eq!(quantile(1.0, &b), Some(0.1));
        assert_eq!(quantile(0.99, &[(0.1, 0.0), (f64::INFINITY, 0.0)]), None);
    }

    fn snapshot(leader: u64, texts: &[(u64, &str)]) -> Snapshot {
        let status = pb::ClusterStatusResponse {
            leader_id: Some(leader),
            term: 4,
            members: texts
                .iter()
                .map(|(id, _)| pb::Member {
                    id: *id,
                    voter: true,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let members = texts
            .iter()
            .map(|(id, t)| pb::MemberMetrics {
                id: *id,
                text: t.to_string(),
                error: String::new(),
            })
            .collect();
        Snapshot::new(
            status,
            pb::ClusterMetricsResponse {
                node_id: leader,
                members,
            },
        )
    }

    fn member(
        allowed: u64,
        denied: u64,
        check_fast: u64,
        check_slow: u64,
        hits: u64,
        over: u64,
        leader: bool,
    ) -> String {
        format!(
            "arbiter_decisions_total{{result=\"allowed\"}} {allowed}\n\
             arbiter_decisions_total{{result=\"denied\"}} {denied}\n\
             arbiter_raft_state{{state=\"{}\"}} 1\narbiter_raft_term 4\narbiter_raft_applied_index 77\n\
             arbiter_raft_follower_lag_entries{{peer=\"2\"}} 5\n\
             arbiter_live_keys{{kind=\"lease\"}} 3\narbiter_live_keys{{kind=\"idempotency_record\"}} 8\n\
             arbiter_rpc_duration_seconds_bucket{{rpc=\"Check\",le=\"0.001\"}} {check_fast}\n\
             arbiter_rpc_duration_seconds_bucket{{rpc=\"Check\",le=\"0.01\"}} {}\n\
             arbiter_rpc_duration_seconds_bucket{{rpc=\"Check\",le=\"+Inf\"}} {}\n\
             arbiter_decisions_by_prefix_total{{prefix=\"api/\",result=\"allowed\"}} {allowed}\n\
             arbiter_decisions_by_prefix_total{{prefix=\"api/\",result=\"denied\"}} {denied}\n\
             arbiter_rls_hits_total{{domain=\"edge\",rule=\"login\"}} {hits}\n\
             arbiter_rls_over_limit_total{{domain=\"edge\",rule=\"login\"}} {over}\n",
            if leader { "Leader" } else { "Follower" },
            check_fast + check_slow,
            check_fast + check_slow
        )
    }

    /// Rates over the interval summed over members, the deny share, the
    /// leader's view of a follower's lag, p99 from the summed buckets, and
    /// a member whose metrics did not come.
    #[test]
    fn a_frame_shows_rates_over_the_interval_summed_over_members() {
        let before = snapshot(
            1,
            &[
                (1, &member(100, 0, 0, 0, 0, 0, true)),
                (2, &member(0, 0, 0, 0, 0, 0, false)),
            ],
        );
        let mut now = snapshot(
            1,
            &[
                (1, &member(150, 10, 98, 0, 20, 15, true)),
                (2, &member(40, 0, 0, 2, 0, 0, false)),
            ],
        );
        now.status.members.push(pb::Member {
            id: 3,
            voter: true,
            ..Default::default()
        });
        now.members.insert(3, Err("member 3 did not answer".into()));
        let frame = render(
            "http://x",
            Some(&before),
            &now,
            Duration::from_secs(2),
            Duration::from_secs(2),
        );
        // Member 1: 60 decisions in 2 s, 10 denied.
        assert!(
            frame.contains("   1  Leader         4        77      -      0         30.0   16.7%"),
            "{frame}"
        );
        assert!(
            frame.contains("   2  Follower       4        77      5"),
            "{frame}"
        );
        assert!(
            frame.contains("   3  (no metrics: member 3 did not answer)"),
            "{frame}"
        );
        assert!(
            frame.contains("cluster: 50.0 decisions/s (45.0 allowed, 5.0 denied)"),
            "{frame}"
        );
        // 100 Check calls: 98 within 1 ms, 2 within 10 ms; p99 ≤ 10 ms.
        assert!(
            frame.contains("Check                    50.0      ≤ 10 ms"),
            "{frame}"
        );
        assert!(
            frame.contains("edge login                             10.0   75.0%"),
            "{frame}"
        );
        // 100 decisions on api/ keys in 2 s, 10 denied.
        assert!(
            frame.contains("api/                                   50.0   10.0%"),
            "{frame}"
        );
        // Without a first sample there are no rates.
        let first = render(
            "http://x",
            None,
            &now,
            Duration::ZERO,
            Duration::from_secs(2),
        );
        assert!(first.contains("cluster: - decisions/s"), "{first}");
        assert!(!first.contains("CALLS/S"), "{first}");
    }
}
