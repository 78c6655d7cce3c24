#!/usr/bin/env bash
# Memory budget: one node started with --memory-budget-mib $BUDGET (default
# 64) is filled until every cap the budget sets refuses (rate-limit keys,
# leases, idempotency records and their bytes), and its resident memory is
# compared with an empty node's and with the budget. Keys, names and
# idempotency keys are padded to $KEY_BYTES bytes (default 64) and
# responses are $RESPONSE_BYTES (default 330), so both record caps bind.
#
#   benches/memory_budget.sh
#   BUDGET=256 KEY_BYTES=96 benches/memory_budget.sh
#   KINDS=lease benches/memory_budget.sh     # one kind's cost alone
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-64}
KEY_BYTES=${KEY_BYTES:-64}
RESPONSE_BYTES=${RESPONSE_BYTES:-330}
KINDS=${KINDS:-check,lease,idem} # fill only these (to measure one kind's cost)

BENCH_NAME=memory_budget
. benches/lib.sh
kib() { sed -n "s/^$2:[[:space:]]*\([0-9]*\) kB/\1/p" "/proc/$1/status"; }
metric() { # series -> value on the node's metrics endpoint
  python3 - "$M" "$1" <<'PY' 2>/dev/null || echo 0
import sys, urllib.request
body = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=2).read().decode()
print(next((int(float(l[len(sys.argv[2]) + 1:])) for l in body.splitlines() if l.startswith(sys.argv[2] + " ")), 0))
PY
}

C=$(port); M=$(port)
"$BIN" serve --listen "127.0.0.1:$C" --metrics-listen "127.0.0.1:$M" --data-dir "$work/n1" \
  --memory-budget-mib "$BUDGET" 2>>"$work/n1.log" &
PIDS[n1]=$!
wait_leader "$C" >/dev/null
pid=${PIDS[n1]}
empty_kib=$(kib "$pid" VmRSS)

mib=$(( BUDGET * 1024 * 1024 ))
keys=$(( (mib / 2 + 199) / 200 )); leases=$(( (mib / 4 + 399) / 400 )); records=$(( (mib / 8 + 399) / 400 ))
fill() { $BENCH --target "127.0.0.1:$C" --warmup 0 --duration 600 --json --key-bytes "$KEY_BYTES" "$@" >/dev/null; }
# 10 % past each cap, so every one of them refuses.
has() { [[ ",$KINDS," == *",$1,"* ]]; }
! has check || fill --workload check --batch 100 --key-order sequential --keys $(( keys * 11 / 10 )) \
  --requests $(( keys * 11 / 1000 )) --capacity 1000 --refill-tokens 1 --refill-interval-ms 3600000
! has lease || fill --workload lease --keep-secs 3600 --requests $(( leases * 11 / 10 ))
! has idem || fill --workload idem --keep-secs 3600 --response-bytes "$RESPONSE_BYTES" --requests $(( records * 22 / 10 ))
full_kib=$(kib "$pid" VmRSS); peak_kib=$(kib "$pid" VmHWM)
held=("$(metric 'arbiter_live_keys{kind="rate_limit"}')" "$(metric 'arbiter_live_keys{kind="lease"}')"
      "$(metric 'arbiter_live_keys{kind="idempotency_record"}')" "$(metric arbiter_idempotency_record_bytes)")

python3 - "$BUDGET" "$KEY_BYTES" "$RESPONSE_BYTES" "$empty_kib" "$full_kib" "$peak_kib" "$keys" "$leases" "$records" "${held[@]}" <<'PY'
import sys
budget, key_bytes, resp, empty, full, peak, keys, leases, records, hk, hl, hr, hb = map(int, sys.argv[1:])
state = (full - empty) / 1024
print(f"budget {budget} MiB; keys padded to {key_bytes} bytes, responses {resp} bytes")
print(f"caps: {keys} rate-limit keys, {leases} leases, {records} records, {budget * 2**20 // 8} record bytes; "
      f"held: {hk}, {hl}, {hr}, {hb}")
print(f"RSS empty {empty / 1024:.1f} MiB, full {full / 1024:.1f} MiB (peak {peak / 1024:.1f}): "
      f"state {state:.1f} MiB = {100 * state / budget:.0f} % of the budget")
PY
