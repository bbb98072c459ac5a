#!/usr/bin/env bash
# Build the local Debian base image (python3 3.11 on bookworm, bubblewrap for
# the Python sandbox's namespaces) without any image registry: debootstrap a
# minimal root fs from the configured Debian mirror and `docker import` it.
# Skips when the image already exists and has bubblewrap.
#
# usage: deploy/build-base-image.sh [IMAGE]     (default envfleet-base:bookworm)
# env:   MIRROR=<debian mirror URL>  FORCE=1 (rebuild even if present)
set -euo pipefail

IMAGE=${1:-envfleet-base:bookworm}
SUITE=bookworm

if [[ "${FORCE:-0}" != 1 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  if docker run --rm --network none "$IMAGE" test -x /usr/bin/bwrap; then
    echo "base image $IMAGE exists, skipping"
    exit 0
  fi
  echo "base image $IMAGE has no bubblewrap (built before it was added): rebuilding"
fi

for tool in debootstrap docker; do
  command -v "$tool" >/dev/null || { echo "error: $tool is not installed" >&2; exit 1; }
done
if [[ $(id -u) != 0 ]]; then
  echo "error: debootstrap needs root" >&2
  exit 1
fi

if [[ -z "${MIRROR:-}" ]]; then
  # The mirror apt already uses (deb822 first, then the one-line format).
  MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  if [[ -z "$MIRROR" ]]; then
    MIRROR=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  fi
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi

ROOTFS=$(mktemp -d /var/tmp/envfleet-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT

start=$SECONDS
echo "debootstrap $SUITE from $MIRROR into $ROOTFS"
# python3-venv brings ensurepip's bundled pip, enough to install the wheelhouse;
# bubblewrap puts each Python sandbox in namespaces of its own (envserver/envs/sandbox_isolation.py).
debootstrap --variant=minbase --include=python3,python3-venv,bubblewrap \
  "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || {
    tail -20 "$ROOTFS.log" >&2; rm -f "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"
echo "debootstrap done in $((SECONDS - start)) s"

rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
  "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
  "$ROOTFS"/usr/share/locale/* "$ROOTFS"/var/log/*.log "$ROOTFS"/var/cache/debconf/*-old

tar -C "$ROOTFS" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  - "$IMAGE" >/dev/null
docker run --rm --network none "$IMAGE" python3 -c 'import sys, venv; print("python", sys.version.split()[0])'
echo "base image $IMAGE built in $((SECONDS - start)) s"
