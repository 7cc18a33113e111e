#!/usr/bin/env bash
# Installs everything Shear's tests and benchmarks need on a Debian machine (as root), then the
# npm workspaces. Safe to run again: it skips apt when every tool is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(qemu-utils qemu-system-common qemu-block-extra libnbd-bin python3-libnbd nbdkit hyperfine socat stress-ng time)
tools=(qemu-img qemu-io qemu-storage-daemon qemu-nbd nbdinfo nbdcopy nbdkit hyperfine socat stress-ng /usr/bin/time)
missing=0
for t in "${tools[@]}"; do command -v "$t" >/dev/null 2>&1 || missing=1; done
/usr/bin/python3 -c 'import nbd' 2>/dev/null || missing=1
if [ "$missing" = 1 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: QEMU/libnbd tools are missing and this is not root; install: ${apt_packages[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q "${apt_packages[@]}"
fi

npm ci --no-audit --no-fund
