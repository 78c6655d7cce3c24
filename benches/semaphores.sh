#!/usr/bin/env bash
# Semaphore writes beside lease writes on a 3-node loopback cluster: each
# round runs lease acquire/renew/release and semaphore acquire/renew/release
# (arbiter-bench --workload lease / sem, 50 in flight, 10,000 names) through
# the leader, one after the other, ROUNDS times, so the two alternate within
# one run.
#
#   benches/semaphores.sh                 # ROUNDS=3 DURATION=10 by default
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-3}
INFLIGHT=${INFLIGHT:-50}

BENCH_NAME=semaphores
# shellcheck source=benches/lib.sh
. benches/lib.sh

# start NAME ID PEERS CLIENT PEER
start() {
  "$BIN" serve --node-id "$2" --peers "$3" --listen "127.0.0.1:$4" --peer-listen "127.0.0.1:$5" \
    --metrics-listen 127.0.0.1:0 --data-dir "$work/$1" 2>>"$work/$1.log" &
  PIDS[$1]=$!
}

declare -a C P
peers=""
for i in 1 2 3; do C[$i]=$(port); P[$i]=$(port); peers+="$i=127.0.0.1:${P[$i]},"; done
peers=${peers%,}
for i in 1 2 3; do start "n$i" "$i" "$peers" "${C[$i]}" "${P[$i]}"; done
wait_voters "${C[1]}" 3
leader=$(wait_leader "${C[1]}")
: >"$work/results"
for round in $(seq "$ROUNDS"); do
  # Which goes first swaps each round: the cluster's log and disk grow
  # through the run, and neither workload should always meet them later.
  order="lease sem"
  [ $((round % 2)) -eq 0 ] && order="sem lease"
  for w in $order; do
    echo "round $round: $w" >&2
    $BENCH --target "127.0.0.1:${C[$leader]}" --workload "$w" --duration "$DURATION" --warmup "$WARMUP" \
      --inflight "$INFLIGHT" --connections 2 --keys 10000 --json | sed "s/^/$w /" >>"$work/results"
  done
done

python3 - "$work/results" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    label, _, js = line.partition(" {")
    runs.setdefault(label, []).append(json.loads("{" + js))
for name, rs in runs.items():
    print(f"{name}: " + ", ".join(f"{r['requests_per_sec']:.0f}" for r in rs)
          + f"  (errors {sum(r['errors'] for r in rs)})")
med = lambda rs, f: statistics.median(f(r) for r in rs)
for name, rs in runs.items():
    print(f"{name:<6} median {med(rs, lambda r: r['requests_per_sec']):.0f} req/s, "
          f"p50 {med(rs, lambda r: r['latency_us']['p50'])/1000:.2f} ms, "
          f"p99 {med(rs, lambda r: r['latency_us']['p99'])/1000:.2f} ms")
if "lease" in runs and "sem" in runs:
    print(f"sem/lease: {med(runs['sem'], lambda r: r['requests_per_sec']) / med(runs['lease'], lambda r: r['requests_per_sec']):.2f}x")
PY
