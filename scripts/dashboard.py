#!/usr/bin/env python3
"""Writes Arbiter's Grafana dashboard, helm/arbiter/files/dashboard.json.

The dashboard is kept as this list of panels and their queries; the JSON is
generated from it (`python3 scripts/dashboard.py`), and a test
(tests/monitoring) checks that the committed JSON is what this writes and
runs every query against a real Prometheus scraping a 3-node cluster.

Queries use the dashboard's variables: `$job` (one Arbiter cluster),
`$instance` (members, regex) and Grafana's `$__rate_interval`. A panel's
`legendFormat` names the labels each of its series carries."""

import json
import pathlib

OUT = pathlib.Path(__file__).resolve().parents[1] / "helm" / "arbiter" / "files" / "dashboard.json"

SEL = 'job="$job",instance=~"$instance"'
RATE = "[$__rate_interval]"

# (row title, [(panel title, unit, description, [(expr, legendFormat)])])
ROWS = [
    ("Decisions", [
        ("Rate-limit decisions/s", "ops", "Checks answered, allowed and denied, over the selected members.", [
            (f"sum by (result) (rate(arbiter_decisions_total{{{SEL}}}{RATE}))", "{{result}}"),
        ]),
        ("Key prefixes: decisions/s (top 10)", "ops",
         "Checks by key prefix (up to the first /, : or .; past 64 prefixes a member counts \"(other)\").", [
             (f"topk(10, sum by (prefix) (rate(arbiter_decisions_by_prefix_total{{{SEL}}}{RATE})))", "{{prefix}}"),
         ]),
        ("Key prefixes: denied/s (top 10)", "ops", "Denied checks by key prefix.", [
            (f"topk(10, sum by (prefix) (rate(arbiter_decisions_by_prefix_total{{{SEL},result=\"denied\"}}{RATE})))",
             "{{prefix}}"),
        ]),
        ("Named limits: hits/s (top 10)", "ops", "Envoy descriptors and LimitCheck.named checks, per domain and rule.", [
            (f"topk(10, sum by (domain, rule) (rate(arbiter_rls_hits_total{{{SEL}}}{RATE})))", "{{domain}} {{rule}}"),
        ]),
        ("Named limits: over limit/s (top 10)", "ops", "Denied named-limit checks, per domain and rule.", [
            (f"topk(10, sum by (domain, rule) (rate(arbiter_rls_over_limit_total{{{SEL}}}{RATE})))",
             "{{domain}} {{rule}}"),
        ]),
        ("Forwarded share", "percentunit",
         "Calls a member sent on to another (the leader, or a key's owner) as a share of the calls it served.", [
             (f"sum by (instance) (rate(arbiter_forwarded_calls_total{{{SEL},direction=\"sent\"}}{RATE}))"
              f" / sum by (instance) (rate(arbiter_rpc_duration_seconds_count{{{SEL}}}{RATE}))", "{{instance}}"),
         ]),
    ]),
    ("Latency", [
        ("p99 latency per RPC", "s", "Server-side time to answer, failed calls included.", [
            ("histogram_quantile(0.99, sum by (rpc, le) "
             f"(rate(arbiter_rpc_duration_seconds_bucket{{{SEL}}}{RATE})))", "{{rpc}}"),
        ]),
        ("p50 latency per RPC", "s", "Server-side time to answer, failed calls included.", [
            ("histogram_quantile(0.5, sum by (rpc, le) "
             f"(rate(arbiter_rpc_duration_seconds_bucket{{{SEL}}}{RATE})))", "{{rpc}}"),
        ]),
        ("Calls/s per RPC", "ops", "Every call, by RPC.", [
            (f"sum by (rpc) (rate(arbiter_rpc_duration_seconds_count{{{SEL}}}{RATE}))", "{{rpc}}"),
        ]),
        ("Failed calls/s per RPC", "ops", "Calls answered with a status other than OK.", [
            (f"sum by (rpc) (rate(arbiter_rpc_failures_total{{{SEL}}}{RATE}))", "{{rpc}}"),
        ]),
    ]),
    ("Raft", [
        ("Leader", "none", "1 on the member that leads; a change of colour is a leader change.", [
            (f"max by (instance) (arbiter_raft_is_leader{{{SEL}}})", "{{instance}}"),
        ]),
        ("Term", "none", "The Raft term each member is in.", [
            (f"max by (instance) (arbiter_raft_term{{{SEL}}})", "{{instance}}"),
        ]),
        ("Leader changes", "none", "Leaders each member learnt of, per interval.", [
            (f"sum by (instance) (increase(arbiter_raft_leader_changes_total{{{SEL}}}{RATE}))", "{{instance}}"),
        ]),
        ("Log lag per follower (entries)", "none",
         "On the leader: entries of its log each member has not confirmed.", [
             (f"max by (peer) (arbiter_raft_follower_lag_entries{{{SEL}}})", "member {{peer}}"),
         ]),
        ("Apply lag (entries)", "none", "Entries in each member's log not yet applied to its state.", [
            (f"max by (instance) (arbiter_raft_apply_lag_entries{{{SEL}}})", "{{instance}}"),
        ]),
        ("Replication bytes/s", "Bps", "Bytes members sent each other: appends, votes, snapshots.", [
            (f"sum by (kind) (rate(arbiter_raft_sent_bytes_total{{{SEL}}}{RATE}))", "{{kind}}"),
        ]),
        ("Rate-limit sync cells/s", "ops", "Rate-limit cells deciders synced through the log.", [
            (f"sum by (instance) (rate(arbiter_limit_sync_cells_total{{{SEL}}}{RATE}))", "{{instance}}"),
        ]),
        ("Snapshots", "none", "Snapshots built and installed (from the leader), per interval.", [
            (f"sum by (how) (increase(arbiter_snapshots_total{{{SEL}}}{RATE}))", "{{how}}"),
        ]),
    ]),
    ("State", [
        ("Leases held and expiring", "none", "Live leases, and those lapsing within 10 s unless renewed.", [
            (f"max by (instance) (arbiter_live_keys{{{SEL},kind=\"lease\"}})", "held {{instance}}"),
            (f"max by (instance) (arbiter_leases_expiring{{{SEL}}})", "expiring {{instance}}"),
        ]),
        ("Idempotency records", "none", "Records held and the bytes they hold.", [
            (f"max by (instance) (arbiter_live_keys{{{SEL},kind=\"idempotency_record\"}})", "records {{instance}}"),
            (f"max by (instance) (arbiter_idempotency_record_bytes{{{SEL}}})", "bytes {{instance}}"),
        ]),
        ("Lease watchers", "none", "Watch streams being served.", [
            (f"max by (instance) (arbiter_lease_watchers{{{SEL}}})", "{{instance}}"),
        ]),
        ("Memory against the budget", "bytes",
         "The state's estimated memory and the process's resident memory, against --memory-budget-mib.", [
             (f"max by (instance) (arbiter_state_memory_bytes{{{SEL}}})", "state {{instance}}"),
             (f"max by (instance) (arbiter_resident_memory_bytes{{{SEL}}})", "resident {{instance}}"),
             (f"max by (instance) (arbiter_memory_budget_bytes{{{SEL}}})", "budget {{instance}}"),
         ]),
        ("Caps used", "percentunit", "Each table's live entries against its cap.", [
            (f"max by (instance, kind) (arbiter_live_keys{{{SEL}}} / arbiter_cap{{{SEL}}})", "{{kind}} {{instance}}"),
        ]),
    ]),
    ("Security and configuration", [
        ("TLS handshake failures/s", "ops", "Connections refused at the TLS handshake (client and peer ports).", [
            (f"sum by (instance) (rate(arbiter_tls_handshake_failures_total{{{SEL}}}{RATE}))", "{{instance}}"),
        ]),
        ("Auth refusals/s by principal", "ops", "Calls refused as UNAUTHENTICATED or PERMISSION_DENIED.", [
            (f"sum by (principal, code) (rate(arbiter_auth_refusals_total{{{SEL}}}{RATE}))", "{{principal}} {{code}}"),
        ]),
        ("Configuration reloads", "none", "Loads of each reloaded file (limits, auth, certificates) that took.", [
            (f"max by (what) (arbiter_config_generation{{{SEL}}})", "{{what}}"),
        ]),
        ("Configuration reload failures", "none", "Reloads refused (the last good file stays in use).", [
            (f"sum by (what) (increase(arbiter_config_reload_failures_total{{{SEL}}}{RATE}))", "{{what}}"),
        ]),
    ]),
]


def panel(pid, title, unit, description, targets, x, y):
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 6, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"fillOpacity": 10}}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for i, (expr, legend) in enumerate(targets)],
    }


def dashboard():
    panels, pid, y = [], 1, 0
    for row, row_panels in ROWS:
        panels.append({"id": pid, "type": "row", "title": row, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        for i, (title, unit, description, targets) in enumerate(row_panels):
            if i and i % 4 == 0:
                y += 8
            panels.append(panel(pid, title, unit, description, targets, (i % 4) * 6, y))
            pid += 1
        y += 8
    variable = {"type": "query", "refresh": 2, "sort": 1,
                "datasource": {"type": "prometheus", "uid": "${datasource}"}}
    return {
        "title": "Arbiter",
        "uid": "arbiter-overview",
        "description": "Decisions, latency, Raft, state and security of one Arbiter cluster (job).",
        "tags": ["arbiter"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"},
            dict(variable, name="job", label="Cluster (job)",
                 query="label_values(arbiter_node_id, job)",
                 definition="label_values(arbiter_node_id, job)"),
            dict(variable, name="instance", label="Members", multi=True, includeAll=True, allValue=".*",
                 query='label_values(arbiter_node_id{job="$job"}, instance)',
                 definition='label_values(arbiter_node_id{job="$job"}, instance)'),
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render():
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
