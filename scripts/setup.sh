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

# The real-VM and libvirt tests (test/vm/): a TCG guest booted from Debian's kernel with a
# busybox initramfs, libvirt 9 started without systemd, and virtnbdbackup as the benchmark's peer.
# Without recommends: the recommended packages (firmware, dnsmasq, ...) are not needed and double
# the download. Only what is not installed yet is asked for.
vm_packages=(qemu-system-x86 busybox-static linux-image-amd64 libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu virtnbdbackup)
vm_missing=()
for p in "${vm_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || vm_missing+=("$p")
done
if [ "${#vm_missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: packages for the VM tests are missing and this is not root; install: apt-get install --no-install-recommends ${vm_missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  [ "$missing" = 1 ] || apt-get update -q
  apt-get install -y -q --no-install-recommends "${vm_missing[@]}"
fi

npm ci --no-audit --no-fund
