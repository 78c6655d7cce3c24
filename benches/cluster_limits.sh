#!/usr/bin/env bash
# Rate-limit checks on a 3-node loopback cluster (release build):
#   1. throughput: unary and 100-check batches, through the leader and
#      through a follower (which forwards), ROUNDS rounds alternating the
#      four so the VM's drift hits them alike;
#   2. a follower falling behind: unary checks over KEYS_BIG keys for
#      UNARY_SECS s, then batched checks for BATCH_SECS s during which one
#      follower is frozen (SIGSTOP) for PAUSE_SECS s. Reports failed calls,
#      whether the term changed, how long the resumed follower took to get
#      back within 5 entries of the leader, and decisions/s.
#
#   benches/cluster_limits.sh      # ROUNDS=3 DURATION=10 KEYS=100000 KEYS_BIG=1000000
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
KEYS=${KEYS:-100000}
KEYS_BIG=${KEYS_BIG:-1000000}
UNARY_SECS=${UNARY_SECS:-10}
BATCH_SECS=${BATCH_SECS:-30}
PAUSE_AT=${PAUSE_AT:-10}
PAUSE_SECS=${PAUSE_SECS:-3}

BENCH_NAME=cluster_limits
# shellcheck source=benches/lib.sh
. benches/lib.sh

declare -a C P
peers=""
for i in 1 2 3; do C[$i]=$(port); P[$i]=$(port); peers+="$i=127.0.0.1:${P[$i]},"; done
peers=${peers%,}
for i in 1 2 3; do
  "$BIN" serve --node-id "$i" --peers "$peers" --listen "127.0.0.1:${C[$i]}" \
    --peer-listen "127.0.0.1:${P[$i]}" --metrics-listen 127.0.0.1:0 --data-dir "$work/n$i" \
    2>"$work/n$i.log" &
  PIDS[n$i]=$!
done
wait_voters "${C[1]}" 3
leader=$(wait_leader "${C[1]}")
follower=$(( leader % 3 + 1 ))
echo "leader: node $leader; follower used: node $follower" >&2

bench() { # label port batch keys duration [extra...]
  local label=$1 port=$2 batch=$3 keys=$4 secs=$5; shift 5
  $BENCH --target "127.0.0.1:$port" --workload check --batch "$batch" --keys "$keys" \
    --duration "$secs" --warmup "$WARMUP" --inflight 50 --connections 2 --json "$@" |
    sed "s/^/$label /" >>"$work/results"
}

for r in $(seq "$ROUNDS"); do
  echo "round $r" >&2
  bench "unary-via-leader" "${C[$leader]}" 1 "$KEYS" "$DURATION"
  bench "unary-via-follower" "${C[$follower]}" 1 "$KEYS" "$DURATION"
  bench "batch100-via-leader" "${C[$leader]}" 100 "$KEYS" "$DURATION"
  bench "batch100-via-follower" "${C[$follower]}" 100 "$KEYS" "$DURATION"
done

# A follower falling behind under sustained load (leadership may have moved
# during the rounds above: look again).
leader=$(wait_leader "${C[1]}")
follower=$(( leader % 3 + 1 ))
term_before=$(field "${C[$leader]}" term)
bench "sustained-unary" "${C[$leader]}" 1 "$KEYS_BIG" "$UNARY_SECS"
bench "sustained-batch100" "${C[$leader]}" 100 "$KEYS_BIG" "$BATCH_SECS" &
load=$!
sleep "$PAUSE_AT"
kill -STOP "${PIDS[n$follower]}"
sleep "$PAUSE_SECS"
kill -CONT "${PIDS[n$follower]}"
resumed=$(date +%s%N)
caught_up=never
for _ in $(seq 600); do
  lead=$(field "${C[$leader]}" applied_index); own=$(field "${C[$follower]}" applied_index)
  if [ -n "$lead" ] && [ -n "$own" ] && [ $(( own + 5 )) -ge "$lead" ]; then
    caught_up=$(( ($(date +%s%N) - resumed) / 1000000 ))
    break
  fi
  sleep 0.05
done
wait "$load"
term_after=$(field "${C[$leader]}" term)
leader_after=$(field "${C[$leader]}" leader)
elections=$(cat "$work"/n*.log | grep -c "starting an election" || true)
echo "elections started during the whole run: $elections"

python3 - "$work/results" "$term_before" "$term_after" "$leader" "$leader_after" "$caught_up" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    label, _, js = line.partition(" {")
    rows.setdefault(label, []).append(json.loads("{" + js))
print(f"{'workload':<24}{'runs':>5}{'req/s':>10}{'decisions/s':>13}{'p50 ms':>8}{'p99 ms':>8}{'errors':>8}")
for label, rs in rows.items():
    med = lambda f: statistics.median(f(r) for r in rs)
    print(f"{label:<24}{len(rs):>5}{med(lambda r: r['requests_per_sec']):>10.0f}"
          f"{med(lambda r: r['decisions_per_sec']):>13.0f}{med(lambda r: r['latency_us']['p50'])/1000:>8.2f}"
          f"{med(lambda r: r['latency_us']['p99'])/1000:>8.2f}{sum(r['errors'] for r in rs):>8}")
_, _, before, after, leader, leader_after, caught = sys.argv
print(f"follower paused: term {before} -> {after}, leader {leader} -> {leader_after}, "
      f"resumed follower within 5 entries of the leader after {caught} ms")
PY
