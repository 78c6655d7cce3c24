#!/usr/bin/env bash
# Builds the arbiter image with no image registry: the release binary is
# built on the host, the base image is made with debootstrap (make-base.sh).
#
#   docker/build-local.sh            # -> arbiter:local
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${TAG:-arbiter:local}
BASE=$(docker/make-base.sh)
cargo build --release -j2 --locked --bin arbiter >&2
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
# Debug info stays on the host (target/release/arbiter, or under $CARGO_TARGET_DIR); the image gets a stripped copy.
strip -o "$ctx/arbiter" "${CARGO_TARGET_DIR:-target}/release/arbiter"
cp docker/Dockerfile.local "$ctx/"
docker build -q -t "$TAG" --build-arg "BASE_IMAGE=$BASE" -f "$ctx/Dockerfile.local" "$ctx" >&2
echo "$TAG"
