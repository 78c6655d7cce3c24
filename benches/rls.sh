#!/usr/bin/env bash
# Envoy's ShouldRateLimit next to arbiter.v1 Check, on one server, in one run:
# the same token bucket per key (capacity 1000, 100 per second), the same
# keys, concurrency and client; ShouldRateLimit reaches it through a named
# limit (domain `bench`, descriptor `user=<key>`), Check carries the limit in
# the request. Rounds alternate check, rls, check, rls ...; medians printed.
#
#   benches/rls.sh
#   ROUNDS=5 DURATION=20 BATCH=1 benches/rls.sh
#
# One serving thread (ARBITER_ARGS defaults to "--worker-threads 1"), one
# client thread; 127.0.0.1 ports chosen by the OS.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
KEYS=${KEYS:-100000}
INFLIGHT=${INFLIGHT:-50}
CONNECTIONS=${CONNECTIONS:-2}
BATCH=${BATCH:-1}
read -r -a ARBITER_ARGS <<<"${ARBITER_ARGS---worker-threads 1}"

cargo build --release -j2 -p arbiter -p arbiter-bench >&2
BENCH=${CARGO_TARGET_DIR:-target}/release/arbiter-bench
work=$(mktemp -d)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cat >"$work/bench.yaml" <<'YAML'
domain: bench
descriptors:
  - key: user
    rate_limit: {unit: second, requests_per_unit: 100, algorithm: token_bucket, burst: 1000}
YAML
${CARGO_TARGET_DIR:-target}/release/arbiter limits check "$work/bench.yaml" >&2
${CARGO_TARGET_DIR:-target}/release/arbiter serve --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --peer-listen 127.0.0.1:0 \
  --data-dir "$work/data" --log-format json --limits "$work/bench.yaml" "${ARBITER_ARGS[@]}" 2>"$work/arbiter.log" &
pid=$!
addr=
for _ in $(seq 100); do
  addr=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    try:
        f = json.loads(line).get("fields", {})
    except ValueError:
        continue
    if f.get("message") == "arbiter serving":
        print(f["client"]); break' "$work/arbiter.log")
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { echo "arbiter did not start:" >&2; cat "$work/arbiter.log" >&2; exit 1; }

common=(--target "$addr" --duration "$DURATION" --warmup "$WARMUP" --inflight "$INFLIGHT"
  --connections "$CONNECTIONS" --keys "$KEYS" --batch "$BATCH" --json
  --capacity 1000 --refill-tokens 100 --refill-interval-ms 1000)
echo "arbiter at $addr; $ROUNDS rounds of ${DURATION}s (+${WARMUP}s warm-up), $INFLIGHT in flight, batch $BATCH" >&2
: >"$work/runs"
for round in $(seq "$ROUNDS"); do
  echo "round $round" >&2
  for w in check rls; do
    $BENCH --workload "$w" "${common[@]}" | sed "s/^/$w /" >>"$work/runs"
  done
done

python3 - "$work/runs" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    name, _, js = line.partition(" ")
    runs.setdefault(name, []).append(json.loads(js))
med = lambda rs, f: statistics.median(f(r) for r in rs)
print(f"{'workload':<10}{'runs':>5}{'req/s':>12}{'decisions/s':>14}{'p50 µs':>9}{'p99 µs':>9}{'p99.9 µs':>10}{'allowed':>9}{'errors':>8}")
for name, rs in runs.items():
    print(f"{name:<10}{len(rs):>5}{med(rs, lambda r: r['requests_per_sec']):>12.0f}"
          f"{med(rs, lambda r: r['decisions_per_sec']):>14.0f}{med(rs, lambda r: r['latency_us']['p50']):>9.0f}"
          f"{med(rs, lambda r: r['latency_us']['p99']):>9.0f}{med(rs, lambda r: r['latency_us']['p999']):>10.0f}"
          f"{med(rs, lambda r: r['allowed_ratio']):>9.2f}{sum(r['errors'] for r in rs):>8}")
c, r = runs["check"], runs["rls"]
print(f"ShouldRateLimit/Check throughput: {med(r, lambda x: x['requests_per_sec']) / med(c, lambda x: x['requests_per_sec']):.2f}x")
PY
