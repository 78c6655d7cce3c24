#!/usr/bin/env bash
# Builds a minimal Debian base image locally, for machines with a Docker
# engine but no image registry: debootstrap from Debian's package mirrors
# into a directory, then `docker import` it.
#
#   docker/make-base.sh                 # -> image arbiter-base:bookworm
#   IMAGE=my-base:tag SUITE=bookworm docker/make-base.sh
#
# Needs root and the debootstrap package (installed here if missing).
set -euo pipefail
IMAGE=${IMAGE:-arbiter-base:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE already exists" >&2
  echo "$IMAGE"
  exit 0
fi
if ! command -v debootstrap >/dev/null; then
  apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
# minbase: just enough for a glibc binary (libc, NSS for DNS, ca-certificates not needed).
debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >&2
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import - "$IMAGE" >&2
echo "$IMAGE"
