#!/usr/bin/env bash
# A local 3-node Arbiter cluster of plain processes on 127.0.0.1.
#
#   cluster/local.sh up       # build (release), start nodes 1..3, wait for a leader
#   cluster/local.sh status   # arbiter cluster status, as node 1 sees it
#   cluster/local.sh down     # SIGTERM every node
#
# Client ports 7101..7103, peer ports 7201..7203, metrics 7301..7303 (override
# with BASE_CLIENT/BASE_PEER/BASE_METRICS); data under ./data/cluster/node-N.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-3}
BASE_CLIENT=${BASE_CLIENT:-7100}
BASE_PEER=${BASE_PEER:-7200}
BASE_METRICS=${BASE_METRICS:-7300}
DIR=${DIR:-data/cluster}
BIN=${CARGO_TARGET_DIR:-target}/release/arbiter

peers() {
  local p=()
  for i in $(seq "$N"); do p+=("$i=127.0.0.1:$((BASE_PEER + i))"); done
  (IFS=,; echo "${p[*]}")
}

up() {
  cargo build --release -j2 --bin arbiter >&2
  mkdir -p "$DIR"
  for i in $(seq "$N"); do
    if [ -f "$DIR/node-$i.pid" ] && kill -0 "$(cat "$DIR/node-$i.pid")" 2>/dev/null; then
      echo "node $i already running"; continue
    fi
    "$BIN" serve --node-id "$i" --peers "$(peers)" \
      --listen "127.0.0.1:$((BASE_CLIENT + i))" --peer-listen "127.0.0.1:$((BASE_PEER + i))" \
      --metrics-listen "127.0.0.1:$((BASE_METRICS + i))" --data-dir "$DIR/node-$i" \
      >"$DIR/node-$i.log" 2>&1 &
    echo $! >"$DIR/node-$i.pid"
    echo "node $i: client 127.0.0.1:$((BASE_CLIENT + i)), log $DIR/node-$i.log"
  done
  for _ in $(seq 100); do
    # Formed: a leader, and every member a voter (a new cluster adds them
    # one by one as they catch up).
    st=$("$BIN" cluster status --server "http://127.0.0.1:$((BASE_CLIENT + 1))" 2>/dev/null || true)
    if echo "$st" | grep -q 'leader=[0-9]' && [ "$(echo "$st" | grep -c ' voter')" = 3 ]; then
      status; return
    fi
    sleep 0.1
  done
  echo "not formed after 10 s; see $DIR/node-*.log" >&2; exit 1
}

status() { "$BIN" cluster status --server "http://127.0.0.1:$((BASE_CLIENT + 1))"; }

down() {
  for f in "$DIR"/node-*.pid; do
    [ -f "$f" ] || continue
    kill -TERM "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
}

case "${1:-}" in
  up) up ;;
  status) status ;;
  down) down ;;
  *) echo "usage: $0 up|status|down" >&2; exit 2 ;;
esac
