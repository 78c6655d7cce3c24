#!/usr/bin/env bash
# Randomised fault runs with checked histories (cluster/nemesis.py) on a
# 3-container cluster. Needs root and a Docker engine with docker-compose;
# builds the image when it is missing (or always with BUILD=1) and installs
# grpcio.
#
#   cluster/nemesis.sh                        # RUNS=3 runs of DURATION=20 s
#   RUNS=100 cluster/nemesis.sh               # the long mode (about an hour)
#   SEED=1234 RUNS=1 cluster/nemesis.sh       # replay one run's schedule
#   FAULTS=oneway-leader,kill-leader cluster/nemesis.sh   # only these fault kinds
#   cluster/nemesis.sh --check target/nemesis/run-1234/history.json
#
# The cluster is its own compose project (arbiter-nemesis), apart from
# cluster/up's and cluster/e2e.sh's.
set -euo pipefail
cd "$(dirname "$0")/.."
export ARBITER_IMAGE=${ARBITER_IMAGE:-arbiter:local}
python3 -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
if [[ " $* " != *" --check "* ]]; then
  if [ "${BUILD:-0}" = 1 ] || ! docker image inspect "$ARBITER_IMAGE" >/dev/null 2>&1; then
    echo "nemesis: building $ARBITER_IMAGE" >&2
    TAG=$ARBITER_IMAGE docker/build-local.sh >/dev/null
  fi
fi
# Bounded: the long mode's hundred runs fit well within four hours.
exec timeout --kill-after 60 "${NEMESIS_TIMEOUT:-14400}" python3 -u cluster/nemesis.py "$@"
