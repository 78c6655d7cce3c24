#!/usr/bin/env bash
# Writes through Raft, on one node and on a 3-node loopback cluster, and
# leader failover time:
#   - lease acquire/renew/release and idempotency begin/complete, requests/s
#     with p50/p99 (arbiter-bench, 50 in flight), single node and 3 nodes;
#   - TRIALS times: kill -9 the leader, time until a write through another
#     node succeeds, restart the killed node.
#
#   benches/cluster_bench.sh            # DURATION=10 TRIALS=10 by default
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
TRIALS=${TRIALS:-10}
INFLIGHT=${INFLIGHT:-50}

BENCH_NAME=cluster_bench
# shellcheck source=benches/lib.sh
. benches/lib.sh

# start NAME ID PEERS CLIENT PEER
start() {
  "$BIN" serve --node-id "$2" --peers "$3" --listen "127.0.0.1:$4" --peer-listen "127.0.0.1:$5" \
    --metrics-listen 127.0.0.1:0 --data-dir "$work/$1" 2>>"$work/$1.log" &
  PIDS[$1]=$!
}

run() { # label target workload
  $BENCH --target "$2" --workload "$3" --duration "$DURATION" --warmup "$WARMUP" --inflight "$INFLIGHT" \
    --connections 2 --keys 10000 --json | sed "s/^/$1 /" >>"$work/results"
}

# Single node.
c=$(port); p=$(port)
start single 1 "1=127.0.0.1:$p" "$c" "$p"
wait_leader "$c" >/dev/null
run "single lease" "127.0.0.1:$c" lease
run "single idem" "127.0.0.1:$c" idem
kill -TERM "${PIDS[single]}"; wait "${PIDS[single]}" 2>/dev/null || true; unset 'PIDS[single]'

# Three nodes.
declare -a C P
peers=""
for i in 1 2 3; do C[$i]=$(port); P[$i]=$(port); peers+="$i=127.0.0.1:${P[$i]},"; done
peers=${peers%,}
for i in 1 2 3; do start "n$i" "$i" "$peers" "${C[$i]}" "${P[$i]}"; done
wait_voters "${C[1]}" 3
leader=$(wait_leader "${C[1]}")
run "3-node lease (via leader)" "127.0.0.1:${C[$leader]}" lease
run "3-node idem (via leader)" "127.0.0.1:${C[$leader]}" idem
follower=$(( leader % 3 + 1 ))
run "3-node lease (via follower)" "127.0.0.1:${C[$follower]}" lease

# Failover trials.
: >"$work/failover"
for t in $(seq "$TRIALS"); do
  leader=$(wait_leader "${C[1]}" 2>/dev/null || wait_leader "${C[2]}")
  # Only the leader's own word counts (a restarted node may name a stale one).
  for _ in $(seq 200); do [ "$(field "${C[$leader]}" leader)" = "$leader" ] && break; sleep 0.05
    leader=$(wait_leader "${C[$(( leader % 3 + 1 ))]}"); done
  other=$(( leader % 3 + 1 ))
  kill -9 "${PIDS[n$leader]}"; wait "${PIDS[n$leader]}" 2>/dev/null || true
  t0=$(date +%s%N)
  until "$BIN" lease acquire "failover-$t" --holder bench --ttl 60s --server "http://127.0.0.1:${C[$other]}" >/dev/null 2>&1; do :; done
  t1=$(date +%s%N)
  echo $(( (t1 - t0) / 1000000 )) >>"$work/failover"
  echo "trial $t: killed node $leader at $(date -u -d @$((t0 / 1000000000)) +%T), $(( (t1 - t0) / 1000000 )) ms" >&2
  start "n$leader" "$leader" "$peers" "${C[$leader]}" "${P[$leader]}"
  # Wait until the restarted node follows a leader again.
  for _ in $(seq 200); do [ -n "$(field "${C[$leader]}" leader)" ] && break; sleep 0.05; done
done

python3 - "$work/results" "$work/failover" <<'PY'
import json, statistics, sys
print(f"{'workload':<30}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
for line in open(sys.argv[1]):
    label, _, js = line.partition(" {")
    label = label.rsplit(" ", 0)[0]
    r = json.loads("{" + js)
    print(f"{label:<30}{r['requests_per_sec']:>10.0f}{r['latency_us']['p50']/1000:>9.2f}{r['latency_us']['p99']/1000:>9.2f}{r['errors']:>8}")
f = [int(x) for x in open(sys.argv[2])]
print(f"failover (kill -9 leader -> first acknowledged write via another node), {len(f)} trials, ms: "
      f"min {min(f)}, median {statistics.median(f):.0f}, max {max(f)}; all: {f}")
PY
