#!/usr/bin/env bash
# Arbiter next to the usual alternative, on this machine, in one run:
# Redis (from Debian's packages) running the common token-bucket Lua script
# via EVALSHA, driven by the same load generator (arbiter-bench) with the same
# concurrency and key spread. Rounds alternate A B A B ...; medians are printed.
# Also measures Arbiter alone: batched Check, and server RSS with 1M live keys.
#
#   benches/compare.sh                 # defaults below; override by environment
#   ROUNDS=5 DURATION=20 benches/compare.sh
#   ROUNDS=0 benches/compare.sh        # only the memory measurement
#   ARBITER_ARGS="--limit-sync-ms 1000" benches/compare.sh   # serve flags
#   TLS=1 benches/compare.sh           # also Arbiter with TLS on its client port
#                                      # (a certificate made with openssl), in the same rounds
#
# Redis serves from one thread; Arbiter gets one serving thread too
# (ARBITER_ARGS defaults to "--worker-threads 1"; ARBITER_ARGS= gives the
# server's default of one per core), and the client runs on one thread.
#
# Everything listens on 127.0.0.1 ports chosen by the OS.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
KEYS=${KEYS:-100000}
INFLIGHT=${INFLIGHT:-50}
CONNECTIONS=${CONNECTIONS:-2}
MEMORY_KEYS=${MEMORY_KEYS:-1000000}
read -r -a ARBITER_ARGS <<<"${ARBITER_ARGS---worker-threads 1}"

if [ "$ROUNDS" -gt 0 ] && ! command -v redis-server >/dev/null; then
  echo "installing redis-server from Debian's packages" >&2
  apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
fi
cargo build --release -j2 -p arbiter -p arbiter-bench >&2
BENCH=${CARGO_TARGET_DIR:-target}/release/arbiter-bench

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Waits (up to 10 s) for arbiter's "serving" log line; prints its client address.
arbiter_addr() {
  local log=$1
  for _ in $(seq 100); do
    addr=$(python3 - "$log" <<'PY' || true
import json, sys
for line in open(sys.argv[1]):
    try:
        f = json.loads(line).get("fields", {})
    except ValueError:
        continue
    if f.get("message") == "arbiter serving":
        print(f["client"]); break
PY
)
    [ -n "$addr" ] && { echo "$addr"; return; }
    sleep 0.1
  done
  echo "arbiter did not start; log:" >&2; cat "$log" >&2; exit 1
}

start_arbiter() { # $1 = log file (the data directory is named after it)
  ${CARGO_TARGET_DIR:-target}/release/arbiter serve --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --peer-listen 127.0.0.1:0 \
    --data-dir "$1.data" --log-format json "${ARBITER_ARGS[@]}" 2>"$1" &
  pids+=($!)
  ARBITER_PID=$!
  ARBITER=$(arbiter_addr "$1")
}

: >"$work/runs"
if [ "$ROUNDS" -gt 0 ]; then
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
REDIS=127.0.0.1:$redis_port
start_arbiter "$work/arbiter.log"
if [ "${TLS:-0}" = 1 ]; then
  command -v openssl >/dev/null || { apt-get update -qq && apt-get install -y -qq openssl >/dev/null; }
  # A CA, and a server certificate it signs (a CA certificate cannot serve).
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=bench-ca \
    -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
    -keyout "$work/tls.key" -out "$work/tls.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost\nbasicConstraints=critical,CA:FALSE\n' >"$work/tls.ext"
  openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
    -days 1 -extfile "$work/tls.ext" -out "$work/tls.pem" 2>/dev/null
  plain=("${ARBITER_ARGS[@]}")
  ARBITER_ARGS=("${plain[@]}" --tls-cert "$work/tls.pem" --tls-key "$work/tls.key")
  start_arbiter "$work/arbiter-tls.log"
  ARBITER_TLS=$ARBITER
  ARBITER_ARGS=("${plain[@]}")
  ARBITER=$(arbiter_addr "$work/arbiter.log")
fi

common=(--duration "$DURATION" --warmup "$WARMUP" --inflight "$INFLIGHT" --connections "$CONNECTIONS" --json)
echo "arbiter at $ARBITER, redis at $REDIS; $ROUNDS rounds of ${DURATION}s (+${WARMUP}s warm-up), $INFLIGHT in flight" >&2
for round in $(seq "$ROUNDS"); do
  for keys in "$KEYS" 1; do
    echo "round $round: $keys keys" >&2
    $BENCH --target "$ARBITER" --workload check --keys "$keys" "${common[@]}" | sed "s/^/arbiter keys=$keys /" >>"$work/runs"
    $BENCH --target "$REDIS" --workload redis-check --keys "$keys" "${common[@]}" | sed "s/^/redis keys=$keys /" >>"$work/runs"
    if [ -n "${ARBITER_TLS:-}" ]; then
      $BENCH --target "$ARBITER_TLS" --tls-ca "$work/ca.pem" --workload check --keys "$keys" "${common[@]}" \
        | sed "s/^/arbiter-tls keys=$keys /" >>"$work/runs"
    fi
  done
  $BENCH --target "$ARBITER" --workload check --keys "$KEYS" --batch 100 "${common[@]}" | sed "s/^/arbiter batch=100 /" >>"$work/runs"
done
fi

# Memory: a fresh server, MEMORY_KEYS keys consumed once each (slow refill so
# none is full again), then its resident set.
start_arbiter "$work/arbiter-mem.log"
rss_before=$(awk '/VmRSS/ {print $2}' /proc/$ARBITER_PID/status)
$BENCH --target "$ARBITER" --workload check --keys "$MEMORY_KEYS" --key-order sequential --batch 100 \
  --capacity 1000 --refill-tokens 1 --refill-interval-ms 3600000 --warmup 0 --duration 300 \
  --requests $((MEMORY_KEYS / 100)) --json >"$work/memory-run"
rss_after=$(awk '/VmRSS/ {print $2}' /proc/$ARBITER_PID/status)
sleep 5  # and once in-flight syncs are done and the allocator has settled
rss_settled=$(awk '/VmRSS/ {print $2}' /proc/$ARBITER_PID/status)
live=$(curl -s "http://$(python3 -c "import json;print(next(json.loads(l)['fields']['metrics'] for l in open('$work/arbiter-mem.log') if 'metrics' in l))")/metrics" 2>/dev/null \
  | awk '/arbiter_live_keys\{kind="rate_limit"\}/ {print $2}' || true)

python3 - "$work/runs" "$rss_before" "$rss_after" "$MEMORY_KEYS" "${live:-?}" "$rss_settled" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    label, _, js = line.partition(" {")
    parts = label.split(" ")
    runs.setdefault(" ".join(parts), []).append(json.loads("{" + js))
def med(rs, f):
    return statistics.median(f(r) for r in rs)
print(f"{'workload':<24}{'runs':>5}{'req/s':>12}{'decisions/s':>14}{'p50 µs':>9}{'p99 µs':>9}{'p99.9 µs':>10}{'allowed':>9}")
for name, rs in runs.items():
    print(f"{name:<24}{len(rs):>5}{med(rs, lambda r: r['requests_per_sec']):>12.0f}"
          f"{med(rs, lambda r: r['decisions_per_sec']):>14.0f}{med(rs, lambda r: r['latency_us']['p50']):>9.0f}"
          f"{med(rs, lambda r: r['latency_us']['p99']):>9.0f}{med(rs, lambda r: r['latency_us']['p999']):>10.0f}"
          f"{med(rs, lambda r: r['allowed_ratio']):>9.2f}")
for keys in sorted({k.split('=')[1] for k in runs if k.startswith('arbiter keys=')}, key=int, reverse=True):
    a, r = runs.get(f"arbiter keys={keys}"), runs.get(f"redis keys={keys}")
    if a and r:
        ratio = med(a, lambda x: x['requests_per_sec']) / med(r, lambda x: x['requests_per_sec'])
        print(f"Arbiter/Redis throughput, {keys} keys: {ratio:.2f}x")
for keys in sorted({k.split('=')[1] for k in runs if k.startswith('arbiter-tls keys=')}, key=int, reverse=True):
    a, t = runs.get(f"arbiter keys={keys}"), runs.get(f"arbiter-tls keys={keys}")
    if a and t:
        print(f"Arbiter TLS/plaintext throughput, {keys} keys: "
              f"{med(t, lambda x: x['requests_per_sec']) / med(a, lambda x: x['requests_per_sec']):.2f}x, "
              f"p99 {med(a, lambda x: x['latency_us']['p99']):.0f} -> {med(t, lambda x: x['latency_us']['p99']):.0f} µs")
u, h = runs.get("arbiter keys=100000") or next(iter(runs.values()), None), runs.get("arbiter keys=1")
if u and h:
    print(f"Arbiter hot key vs uniform keys: {med(h, lambda x: x['requests_per_sec']) / med(u, lambda x: x['requests_per_sec']):.2f}x")
before, after, n, live = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
settled = int(sys.argv[6])
print(f"Memory: {n} keys requested, {live} live in the server; RSS {before/1024:.1f} MiB -> {after/1024:.1f} MiB "
      f"({(after-before)*1024/n:.0f} bytes/key) at the end of the load, {settled/1024:.1f} MiB 5 s later")
PY
