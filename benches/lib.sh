# Shared by the loopback cluster benchmarks (source it after setting
# BENCH_NAME): the release build, a work directory whose node logs are kept
# under target/$BENCH_NAME, cleanup on exit, and cluster helpers.
# BIN=path runs another build of the server (e.g. an older commit's).

cargo build --release -j2 -p arbiter -p arbiter-bench >&2
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/arbiter}
BENCH=${CARGO_TARGET_DIR:-target}/release/arbiter-bench
work=$(mktemp -d)
declare -A PIDS
cleanup() {
  for p in "${PIDS[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # The nodes' logs stay for a look afterwards.
  mkdir -p "target/$BENCH_NAME" && cp "$work"/*.log "target/$BENCH_NAME/" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
field() { # client port, field name -> value from `cluster status`
  "$BIN" cluster status --server "http://127.0.0.1:$1" 2>/dev/null | sed -n "s/.*$2=\([0-9]*\).*/\1/p" | head -1
}
wait_leader() { # client port -> the leader's id
  for _ in $(seq 200); do
    l=$(field "$1" leader); [ -n "$l" ] && { echo "$l"; return; }
    sleep 0.05
  done
  echo "no leader" >&2; exit 1
}
voters() { # client port -> how many members are voters
  "$BIN" cluster status --server "http://127.0.0.1:$1" 2>/dev/null | grep -c ' voter' || true
}
wait_voters() { # client port, count: a new cluster adds its members as voters one by one
  for _ in $(seq 200); do
    [ "$(voters "$1")" = "$2" ] && return
    sleep 0.05
  done
  echo "not $2 voters" >&2; exit 1
}
