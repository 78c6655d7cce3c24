# Shared by cluster/up, cluster/status, cluster/down and cluster/e2e.sh.
# ARBITER_CLUSTER names the compose project and prefixes the containers
# (default arbiter: containers arbiter-0..2, network arbiter_net, volumes
# arbiter_data-N). ARBITER_IMAGE picks the image (default arbiter:local,
# built by docker/build-local.sh when missing or when BUILD=1).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export ARBITER_CLUSTER=${ARBITER_CLUSTER:-arbiter}
export ARBITER_IMAGE=${ARBITER_IMAGE:-arbiter:local}
REPLICAS=3

compose() {
  if command -v docker-compose >/dev/null; then
    docker-compose -p "$ARBITER_CLUSTER" -f "$ROOT/cluster/compose.yml" "$@"
  else
    docker compose -p "$ARBITER_CLUSTER" -f "$ROOT/cluster/compose.yml" "$@"
  fi
}

# Builds the image when it is missing, or always with BUILD=1.
ensure_image() {
  if [ "${BUILD:-0}" = 1 ] || ! docker image inspect "$ARBITER_IMAGE" >/dev/null 2>&1; then
    TAG=$ARBITER_IMAGE "$ROOT/docker/build-local.sh" >/dev/null
  fi
}

# `arbiter cluster status` as node N sees it (run inside its container).
node_status() {
  docker exec "$ARBITER_CLUSTER-$1" arbiter cluster status 2>&1
}

# Waits (up to $1 seconds) until every node names the same leader and lists
# all members as voters; prints the leader.
wait_for_leader() {
  local deadline=$((SECONDS + $1)) statuses leaders voters
  while [ $SECONDS -lt $deadline ]; do
    statuses=$(for i in $(seq 0 $((REPLICAS - 1))); do node_status "$i"; done)
    leaders=$(echo "$statuses" | sed -n 's/^node_id=.* leader=\([0-9a-z]*\) .*/\1/p')
    voters=$(echo "$statuses" | grep -c ' voter$' || true)
    if [ "$(echo "$leaders" | grep -c '^[0-9]')" = "$REPLICAS" ] && \
       [ "$(echo "$leaders" | sort -u | wc -l)" = 1 ] && [ "$voters" = $((REPLICAS * REPLICAS)) ]; then
      echo "$leaders" | head -1
      return 0
    fi
    sleep 0.5
  done
  return 1
}
