#!/usr/bin/env bash
# Builds a minimal runtime base image locally, for machines with a Docker
# engine but no image registry. debootstrap fetches Debian's packages into a
# scratch directory; from it only what a glibc binary needs is kept (the
# dynamic loader, libc, libm, libgcc_s and NSS configuration, so host names
# resolve through /etc/hosts and DNS), plus /etc/passwd with the arbiter user
# (uid 10001), a /data directory it owns and /tmp. The result is
# `docker import`ed. No shell, no package manager.
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
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
full=$work/full
slim=$work/slim
echo "debootstrap $SUITE (log: $work/debootstrap.log)" >&2
if ! debootstrap --variant=minbase "$SUITE" "$full" "$MIRROR" >"$work/debootstrap.log" 2>&1; then
  tail -30 "$work/debootstrap.log" >&2
  exit 1
fi

lib=lib/x86_64-linux-gnu
mkdir -p "$slim/$lib" "$slim/lib64" "$slim/etc" "$slim/tmp" "$slim/data" "$slim/usr/local/bin"
# The loader and the libraries `ldd target/release/arbiter` lists, plus the
# NSS modules (built into libc since glibc 2.34; copied where present).
cp -L "$full/lib64/ld-linux-x86-64.so.2" "$slim/lib64/"
for so in libc.so.6 libm.so.6 libgcc_s.so.1 libnss_dns.so.2 libnss_files.so.2 libresolv.so.2; do
  if [ -e "$full/$lib/$so" ] || [ -e "$full/usr/$lib/$so" ]; then
    cp -L "$( [ -e "$full/$lib/$so" ] && echo "$full/$lib/$so" || echo "$full/usr/$lib/$so")" "$slim/$lib/"
  fi
done
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$slim/etc/nsswitch.conf"
printf 'root:x:0:0:root:/root:/sbin/nologin\narbiter:x:10001:10001:arbiter:/data:/sbin/nologin\n' >"$slim/etc/passwd"
printf 'root:x:0:\narbiter:x:10001:\n' >"$slim/etc/group"
chmod 1777 "$slim/tmp"
chown 10001:10001 "$slim/data"
tar -C "$slim" --numeric-owner -c . | docker import - "$IMAGE" >&2
echo "$IMAGE"
