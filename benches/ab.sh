#!/usr/bin/env bash
# Two builds of the server side by side, alternating A B A B ... within one
# run (this VM drifts 10-20 % within an hour, so only interleaved rounds
# compare): unary Check over 100k keys, batched Check (100 per call), and
# Raft writes (lease acquire/renew/release), each on a fresh single node
# with one serving thread, driven by the same load generator.
#
#   A=/tmp/arbiter-old B=target/release/arbiter benches/ab.sh
#   ROUNDS=4 DURATION=10 A=... B=... benches/ab.sh
#   WORKLOADS="lease" A=... benches/ab.sh     # a subset of: check batch lease
#   WORKLOADS="check reserve check-hot reserve-hot" A=... B=... benches/ab.sh
#                                             # reserve mode against plain checks
#   WORKLOADS="check-10k breaker" A=target/release/arbiter B=target/release/arbiter benches/ab.sh
#                                             # Breakers.Allow against unary Check
#
# Everything listens on 127.0.0.1 ports chosen by the OS; each round is
# bounded by --duration.
set -euo pipefail
cd "$(dirname "$0")/.."

A=${A:?A=path to the first server build}
B=${B:-${CARGO_TARGET_DIR:-target}/release/arbiter}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
read -r -a WORKLOADS <<<"${WORKLOADS:-check batch lease}"
cargo build --release -j2 -p arbiter-bench >&2
BENCH=${CARGO_TARGET_DIR:-target}/release/arbiter-bench

work=$(mktemp -d)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# start BIN LOG: a fresh single node; sets ADDR and pid.
start() {
  rm -rf "$2.data"
  "$1" serve --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --peer-listen 127.0.0.1:0 \
    --data-dir "$2.data" --log-format json --worker-threads 1 2>"$2" &
  pid=$!
  ADDR=
  for _ in $(seq 100); do
    ADDR=$(python3 -c "import json,sys
for l in open(sys.argv[1]):
    if 'arbiter serving' in l: print(json.loads(l)['fields']['client']); break" "$2")
    [ -n "$ADDR" ] && return
    sleep 0.1
  done
  echo "server did not start; log:" >&2; cat "$2" >&2; exit 1
}

stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=; }

common=(--duration "$DURATION" --warmup "$WARMUP" --inflight 50 --connections 2 --json)
: >"$work/runs"
for round in $(seq "$ROUNDS"); do
  for side in A B; do
    bin=${!side}
    echo "round $round: $side ($bin)" >&2
    start "$bin" "$work/$side.log"
    for w in "${WORKLOADS[@]}"; do
      case $w in
        check) args=(--workload check --keys 100000) ;;
        batch) args=(--workload check --keys 100000 --batch 100) ;;
        lease) args=(--workload lease) ;;
        # Reserve mode (a leaky bucket with max_delay_ms) beside the token
        # bucket's plain check: over 100k keys nothing waits; on 1,000 hot
        # keys at 10/s each most checks are queued or refused.
        reserve) args=(--workload check --keys 100000 --algorithm leaky-bucket --max-delay-ms 1000) ;;
        check-hot) args=(--workload check --keys 1000 --capacity 10 --refill-tokens 10) ;;
        reserve-hot) args=(--workload check --keys 1000 --capacity 10 --refill-tokens 10
          --algorithm leaky-bucket --max-delay-ms 1000) ;;
        # Breakers.Allow on 10k closed breakers beside unary Check on 10k keys.
        check-10k) args=(--workload check --keys 10000) ;;
        breaker) args=(--workload breaker-allow --keys 10000) ;;
        *) echo "unknown workload $w" >&2; exit 2 ;;
      esac
      $BENCH --target "$ADDR" "${args[@]}" "${common[@]}" | sed "s/^/$side $w /" >>"$work/runs"
    done
    stop
  done
done

python3 - "$work/runs" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    label, _, js = line.partition(" {")
    runs.setdefault(label, []).append(json.loads("{" + js))
for name, rs in sorted(runs.items()):
    print(f"{name}: " + ", ".join(f"{r['requests_per_sec']:.0f}" for r in rs))
med = lambda rs, f: statistics.median(f(r) for r in rs)
print(f"{'side workload':<18}{'runs':>5}{'req/s':>12}{'decisions/s':>14}{'p50 µs':>9}{'p99 µs':>9}")
for name in sorted(runs, key=lambda n: (n.split(' ', 1)[1], n)):
    rs = runs[name]
    print(f"{name:<18}{len(rs):>5}{med(rs, lambda r: r['requests_per_sec']):>12.0f}"
          f"{med(rs, lambda r: r['decisions_per_sec']):>14.0f}{med(rs, lambda r: r['latency_us']['p50']):>9.0f}"
          f"{med(rs, lambda r: r['latency_us']['p99']):>9.0f}")
for w in sorted({n.split(' ', 1)[1] for n in runs}):
    a, b = runs.get(f"A {w}"), runs.get(f"B {w}")
    if a and b:
        print(f"B/A {w}: {med(b, lambda r: r['requests_per_sec']) / med(a, lambda r: r['requests_per_sec']):.2f}x")
PY
