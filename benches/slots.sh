#!/usr/bin/env bash
# Rate-limit checks with the slots spread over a 3-node loopback cluster
# (--slot-owners spread) against one node and against a 3-node cluster whose
# leader decides every key (--slot-owners leader), all release builds,
# ROUNDS rounds alternating the configurations so the VM's drift hits them
# alike. Calls "spread" go over the three members' client ports in turn
# (arbiter-bench --targets), as a Kubernetes Service spreads callers; calls
# "routed" go to the owner of their keys' slots (--route slots), as a client
# that keeps the slot map sends them.
#
#   benches/slots.sh      # ROUNDS=3 DURATION=10 KEYS=100000
#
# CONFIGS=spanning runs instead two-check calls, all or nothing or not: on
# one node; over the spread cluster's members (random keys, so about two in
# three calls span two owners and are reserved and confirmed at each); and
# routed (both keys from one owner's slots, decided there at once).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
KEYS=${KEYS:-100000}

BENCH_NAME=slots
# shellcheck source=benches/lib.sh
. benches/lib.sh

cluster() { # name owners -> starts 3 nodes; sets ${name}1..3 to their client ports
  local name=$1 owners=$2 peers="" i
  declare -ga "${name}_c=()"
  local -a c p
  for i in 1 2 3; do c[$i]=$(port); p[$i]=$(port); peers+="$i=127.0.0.1:${p[$i]},"; done
  peers=${peers%,}
  for i in 1 2 3; do
    "$BIN" serve --node-id "$i" --peers "$peers" --listen "127.0.0.1:${c[$i]}" \
      --peer-listen "127.0.0.1:${p[$i]}" --metrics-listen 127.0.0.1:0 \
      --data-dir "$work/$name$i" --slot-owners "$owners" 2>"$work/$name$i.log" &
    PIDS[$name$i]=$!
  done
  wait_voters "${c[1]}" 3
  wait_leader "${c[1]}" >/dev/null
  eval "${name}_c=(\"${c[1]}\" \"${c[2]}\" \"${c[3]}\")"
}

one=$(port)
"$BIN" serve --listen "127.0.0.1:$one" --metrics-listen 127.0.0.1:0 \
  --peer-listen 127.0.0.1:0 --data-dir "$work/one" 2>"$work/one.log" &
PIDS[one]=$!
cluster lead leader
cluster spread spread
# Give the spread cluster's leader time to hand out the slots.
for _ in $(seq 100); do
  grep -q "moving rate-limit slots" "$work"/spread*.log && break
  sleep 0.05
done
sleep 1

lead="lead1 lead2 lead3" spread="spread1 spread2 spread3"
targets() { local IFS=,; local -a t=(); for p in "$@"; do t+=("127.0.0.1:$p"); done; echo "${t[*]}"; }
cpu_ticks() { # pids... -> user + system clock ticks they have used
  local total=0 p f
  for p in "$@"; do
    read -ra f <"/proc/$p/stat"
    # Fields 14 and 15 (utime, stime); the name field (arbiter) has no space.
    total=$((total + f[13] + f[14]))
  done
  echo "$total"
}
bench() { # label servers targets batch [extra...]: servers names the PIDS measured
  local label=$1 servers=$2 targets=$3 batch=$4 before after; shift 4
  local -a pids=()
  for s in $servers; do pids+=("${PIDS[$s]}"); done
  before=$(cpu_ticks "${pids[@]}")
  $BENCH --targets "$targets" --workload check --batch "$batch" --keys "$KEYS" \
    --duration "$DURATION" --warmup "$WARMUP" --inflight 48 --connections 3 --json "$@" |
    sed "s/^/$label /" >>"$work/results"
  after=$(cpu_ticks "${pids[@]}")
  echo "$label $((after - before))" >>"$work/cpu"
}

for r in $(seq "$ROUNDS"); do
  echo "round $r" >&2
  if [ "${CONFIGS:-all}" = spanning ]; then
    bench "batch2-one-node" one "$(targets "$one")" 2
    bench "batch2-one-node-aon" one "$(targets "$one")" 2 --all-or-nothing
    bench "batch2-slots-spread" "$spread" "$(targets "${spread_c[@]}")" 2
    bench "batch2-slots-spread-aon" "$spread" "$(targets "${spread_c[@]}")" 2 --all-or-nothing
    bench "batch2-slots-routed-aon" "$spread" "$(targets "${spread_c[@]}")" 2 --route slots --all-or-nothing
    continue
  fi
  bench "unary-one-node" one "$(targets "$one")" 1
  bench "unary-leader-decides-spread" "$lead" "$(targets "${lead_c[@]}")" 1
  bench "unary-slots-spread" "$spread" "$(targets "${spread_c[@]}")" 1
  bench "unary-slots-via-one-member" "$spread" "$(targets "${spread_c[0]}")" 1
  bench "unary-slots-routed" "$spread" "$(targets "${spread_c[@]}")" 1 --route slots
  bench "batch100-one-node" one "$(targets "$one")" 100
  bench "batch100-slots-spread" "$spread" "$(targets "${spread_c[@]}")" 100
  bench "batch100-slots-routed" "$spread" "$(targets "${spread_c[@]}")" 100 --route slots
done

# Server CPU per decision: the servers' user + system time over the run
# (warm-up included) divided by its decisions (the measured rate times the
# whole run). The capacity model in docs/design.md is built from these.
python3 - "$work/results" "$work/cpu" "$(getconf CLK_TCK)" "$DURATION" "$WARMUP" <<'EOF'
import json, sys, statistics
rows = {}
for line in open(sys.argv[1]):
    label, js = line.split(" ", 1)
    rows.setdefault(label, []).append(json.loads(js))
cpu = {}
for line in open(sys.argv[2]):
    label, ticks = line.split()
    cpu.setdefault(label, []).append(int(ticks) / int(sys.argv[3]))
run_s = float(sys.argv[4]) + float(sys.argv[5])
base = {}
print(f"| configuration | decisions/s (median of {len(next(iter(rows.values())))}) | each round | p50 ms | p99 ms | errors | vs one node | server CPU µs/decision |")
first_errors = {label: r["first_error"] for label, rs in rows.items() for r in rs if r.get("first_error")}
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for label, rs in rows.items():
    d = [r["decisions_per_sec"] for r in rs]
    med = statistics.median(d)
    kind = label.split("-")[0]
    base.setdefault(kind, med)
    p50 = statistics.median(r["latency_us"]["p50"] for r in rs) / 1000
    p99 = statistics.median(r["latency_us"]["p99"] for r in rs) / 1000
    errors = sum(r["errors"] for r in rs)
    each = ", ".join(f"{x:,.0f}" for x in d)
    per = statistics.median(c / (r["decisions_per_sec"] * run_s) * 1e6 for c, r in zip(cpu[label], rs))
    print(f"| {label} | {med:,.0f} | {each} | {p50:.2f} | {p99:.2f} | {errors} | {med / base[kind]:.2f}x | {per:.1f} |")
for label, e in first_errors.items():
    print(f"\n{label}: first error: {e}")
EOF
