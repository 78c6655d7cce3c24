#!/usr/bin/env bash
# Snapshot catch-up at size, on a loopback cluster (release build).
#
# Three members (--snapshot-logs 1000); one follower is killed (-9) at once.
# The rest are filled with KEYS rate-limit keys, LEASES leases and RECORDS
# idempotency records (all kept for an hour). Then:
#   build:   the leader's peak RSS while it builds one more snapshot, against
#            its RSS before (the peak is reset first through clear_refs);
#   add:     a fourth node starts empty and is added with `arbiter cluster
#            add`: the time until it holds every key, and its peak RSS;
#   lagging: the killed follower (down past several compactions) restarts:
#            the same two figures.
# RSS counts the whole process (runtime, buffers, allocator slack), so the
# ratio of peak to steady RSS is the figure to read; "state" is RSS minus
# that of an empty node.
#
#   benches/snapshot_catchup.sh     # KEYS=1000000 LEASES=100000 RECORDS=100000
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS=${KEYS:-1000000}
LEASES=${LEASES:-100000}
RECORDS=${RECORDS:-100000}

BENCH_NAME=snapshot_catchup
# shellcheck source=benches/lib.sh
. benches/lib.sh
live() { # node, kind -> arbiter_live_keys{kind} from its metrics
  python3 - "${M[$1]}" "$2" <<'PY' 2>/dev/null || echo 0
import sys, urllib.request
body = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=2).read().decode()
key = 'arbiter_live_keys{kind="%s"} ' % sys.argv[2]
print(next((int(float(l[len(key):])) for l in body.splitlines() if l.startswith(key)), 0))
PY
}
kib() { sed -n "s/^$2:[[:space:]]*\([0-9]*\) kB/\1/p" "/proc/$1/status"; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

declare -a C P M
peers=""
for i in 1 2 3 4; do C[$i]=$(port); P[$i]=$(port); M[$i]=$(port); done
for i in 1 2 3; do peers+="$i=127.0.0.1:${P[$i]},"; done
peers=${peers%,}
start() { # node, peers
  "$BIN" serve --node-id "$1" --peers "$2" --listen "127.0.0.1:${C[$1]}" \
    --peer-listen "127.0.0.1:${P[$1]}" --metrics-listen "127.0.0.1:${M[$1]}" \
    --data-dir "$work/n$1" --snapshot-logs 1000 2>>"$work/n$1.log" &
  PIDS[n$1]=$!
}
for i in 1 2 3; do start "$i" "$peers"; done
leader=""
for _ in $(seq 200); do leader=$(field "${C[1]}" leader); [ -n "$leader" ] && break; sleep 0.05; done
[ -n "$leader" ] || { echo "no leader" >&2; exit 1; }
wait_voters "${C[1]}" 3
lagger=$(( leader % 3 + 1 ))
kill -9 "${PIDS[n$lagger]}"; unset "PIDS[n$lagger]"
echo "leader: node $leader; killed: node $lagger" >&2

fill() { $BENCH --target "127.0.0.1:${C[$leader]}" --warmup 0 --duration 600 --json "$@" >/dev/null; }
fill --workload check --batch 100 --key-order sequential --keys "$KEYS" --requests $(( KEYS / 100 )) \
  --capacity 1000 --refill-tokens 1 --refill-interval-ms 3600000
fill --workload lease --keep-secs 3600 --requests "$LEASES"
fill --workload idem --keep-secs 3600 --requests $(( RECORDS * 2 ))
want=("$(live "$leader" rate_limit)" "$(live "$leader" lease)" "$(live "$leader" idempotency_record)")
echo "filled: ${want[*]} (rate-limit keys, leases, records)" >&2

snap="$work/n$leader/snapshots/current.snap"

# build: one more snapshot on the leader.
lpid=${PIDS[n$leader]}
before_kib=$(kib "$lpid" VmRSS)
echo 5 > "/proc/$lpid/clear_refs"
old=$(stat -c %i "$snap" 2>/dev/null || echo none)
# One write per entry (the leader batches concurrent writes into one), so
# that --snapshot-logs entries pass.
fill --workload lease --keep-secs 3600 --requests 1500 --inflight 1 --connections 1
for _ in $(seq 600); do [ "$(stat -c %i "$snap")" != "$old" ] && break; sleep 0.05; done
[ "$(stat -c %i "$snap")" != "$old" ] || { echo "the leader built no new snapshot" >&2; exit 1; }
sleep 1 # the build's last writes; a peak is only ever higher later
build_peak_kib=$(kib "$lpid" VmHWM)
snap_bytes=$(stat -c %s "$snap")

caught_up() { # node -> ms until it holds what the leader holds
  local t0=$1 node=$2
  for _ in $(seq 6000); do
    # (Compared with the leader's figures as they are now: a record begun
    # but never completed lapses after its lock TTL.)
    if [ "$(live "$node" rate_limit)" = "$(live "$leader" rate_limit)" ] \
      && [ "$(live "$node" lease)" = "$(live "$leader" lease)" ] \
      && [ "$(live "$node" idempotency_record)" = "$(live "$leader" idempotency_record)" ]; then
      echo $(( $(now_ms) - t0 )); return
    fi
    sleep 0.05
  done
  echo never
}

# add: node 4 joins empty.
start 4 "$peers,4=127.0.0.1:${P[4]}"
for _ in $(seq 200); do [ -n "$(field "${C[4]}" term)" ] && break; sleep 0.05; done
empty_kib=$(kib "${PIDS[n4]}" VmRSS) # an empty node's, for the state's own size
t0=$(now_ms)
"$BIN" cluster add 4 "127.0.0.1:${P[4]}" --server "http://127.0.0.1:${C[$leader]}" >/dev/null
add_ms=$(caught_up "$t0" 4)
add_peak_kib=$(kib "${PIDS[n4]}" VmHWM); add_rss_kib=$(kib "${PIDS[n4]}" VmRSS)

# lagging: the killed member comes back.
t0=$(now_ms)
start "$lagger" "$peers"
lag_ms=$(caught_up "$t0" "$lagger")
lag_peak_kib=$(kib "${PIDS[n$lagger]}" VmHWM); lag_rss_kib=$(kib "${PIDS[n$lagger]}" VmRSS)

python3 - "$empty_kib" "$before_kib" "$build_peak_kib" "$snap_bytes" "$add_ms" "$add_peak_kib" \
  "$add_rss_kib" "$lag_ms" "$lag_peak_kib" "$lag_rss_kib" "${want[@]}" <<'PY'
import sys
(empty, before, build_peak, snap, add_ms, add_peak, add_rss, lag_ms, lag_peak, lag_rss,
 keys, leases, records) = sys.argv[1:]
empty, before, build_peak, add_peak, add_rss, lag_peak, lag_rss = map(
    int, (empty, before, build_peak, add_peak, add_rss, lag_peak, lag_rss))
mib = lambda k: k / 1024
print(f"state: {keys} rate-limit keys, {leases} leases, {records} records; snapshot file {int(snap)/2**20:.1f} MiB")
print(f"empty node RSS {mib(empty):.1f} MiB")
def row(what, steady, peak, ms=None):
    state = steady - empty
    extra = f", caught up in {ms} ms" if ms is not None else ""
    print(f"{what:<8} steady RSS {mib(steady):7.1f} MiB, peak {mib(peak):7.1f} MiB: "
          f"peak/steady {peak/steady:.2f}x, (peak-empty)/(steady-empty) {(peak-empty)/state:.2f}x{extra}")
row("build", before, build_peak)
row("add", add_rss, add_peak, add_ms)
row("lagging", lag_rss, lag_peak, lag_ms)
PY
