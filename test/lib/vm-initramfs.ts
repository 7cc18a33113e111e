// The guest of the VM tests: Debian's kernel from /boot and an initramfs built here from
// busybox-static and the kernel's own virtio modules. Its /init loads the modules, then writes a
// known pattern to /dev/vda in a loop (see vm-pattern.ts), reporting each step on the serial console.
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { BLOCK, CHUNK_BLOCKS, MARK, LINE_BYTES } from './vm-pattern.js';

/** insmod order: each module needs the ones before it. */
export const VIRTIO_MODULES = ['virtio_ring', 'virtio', 'virtio_pci_modern_dev', 'virtio_pci_legacy_dev', 'virtio_pci', 'virtio_blk'] as const;

const BUSYBOX = '/bin/busybox';

export interface GuestKernel {
  version: string;
  vmlinuz: string;
}

/**
 * The newest Debian kernel in /boot whose modules are installed (not the host's running kernel:
 * the machine may run another one). Undefined when there is none.
 */
export function findGuestKernel(): GuestKernel | undefined {
  if (!existsSync('/boot')) return undefined;
  const versions = readdirSync('/boot')
    .filter((f) => f.startsWith('vmlinuz-'))
    .map((f) => f.slice('vmlinuz-'.length))
    .filter((v) => existsSync(path.join('/lib/modules', v, 'kernel/drivers/block')))
    .sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
  const version = versions.at(-1);
  return version ? { version, vmlinuz: path.join('/boot', `vmlinuz-${version}`) } : undefined;
}

/** A module's file under the kernel's tree, possibly compressed (.ko.xz, .ko.zst, .ko.gz). */
function findModule(version: string, name: string): string {
  const root = path.join('/lib/modules', version, 'kernel/drivers');
  for (const sub of ['virtio', 'block']) {
    for (const ext of ['.ko', '.ko.xz', '.ko.zst', '.ko.gz']) {
      const p = path.join(root, sub, name + ext);
      if (existsSync(p)) return p;
    }
  }
  throw new Error(`kernel ${version} has no module ${name} under ${root}/{virtio,block}`);
}

/**
 * The module's ELF bytes. Debian's busybox insmod may not read compressed modules, and the guest
 * kernel may not decompress in-kernel, so they are decompressed here, with the host's tools.
 */
function moduleBytes(file: string): Buffer {
  if (file.endsWith('.ko')) return readFileSync(file);
  if (file.endsWith('.xz')) return execFileSync(BUSYBOX, ['xzcat', file], { maxBuffer: 64 << 20 });
  if (file.endsWith('.gz')) return execFileSync(BUSYBOX, ['zcat', file], { maxBuffer: 64 << 20 });
  return execFileSync('zstd', ['-dc', file], { maxBuffer: 64 << 20 });
}

interface CpioEntry {
  name: string;
  mode: number;
  data?: Buffer;
  /** For device nodes. */
  rdev?: [number, number];
}

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFCHR = 0o020000;

/**
 * An uncompressed newc cpio archive, the format the kernel unpacks as initramfs. Written here
 * rather than with cpio(1) so that the archive can hold /dev/console without root's mknod.
 */
export function newcArchive(entries: CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  let ino = 1;
  const hex = (n: number) => n.toString(16).padStart(8, '0');
  const pad4 = (n: number) => Buffer.alloc((4 - (n % 4)) % 4);
  const push = (e: CpioEntry) => {
    const data = e.data ?? Buffer.alloc(0);
    const name = Buffer.from(e.name + '\0');
    const [rmaj, rmin] = e.rdev ?? [0, 0];
    const header = '070701' + [ino++, e.mode, 0, 0, 1, 0, data.length, 0, 0, rmaj, rmin, name.length, 0].map(hex).join('');
    parts.push(Buffer.from(header, 'ascii'), name, pad4(110 + name.length), data, pad4(data.length));
  };
  for (const e of entries) push(e);
  push({ name: 'TRAILER!!!', mode: 0 });
  return Buffer.concat(parts);
}

/**
 * /init. SHEAR_PACE (from the kernel command line, which passes unknown name=value to init's
 * environment) is a pause in seconds between generations. Each generation g writes CHUNK_BLOCKS blocks starting at a chunk chosen from g, every
 * block holding its own number and g (vm-pattern.ts's layout), with O_DIRECT so that the writes
 * reach the virtual disk at once rather than at the next writeback. awk builds a generation's
 * chunk in one process (a fork per block is far too slow under TCG); dd writes it from a file so
 * that every 4 KiB write is whole.
 */
function initScript(modules: string[]): string {
  return `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /tmp
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs tmp /tmp
${modules.map((m) => `insmod /lib/modules/${m}.ko || echo "${MARK} insmod ${m} failed"`).join('\n')}
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -b /dev/vda ]; then echo "${MARK} no /dev/vda"; poweroff -f; fi
blocks=$(( $(cat /sys/block/vda/size) / ${BLOCK / 512} ))
chunks=$(( blocks / ${CHUNK_BLOCKS} ))
echo "${MARK} ready blocks=$blocks"
g=1
while true; do
  c=$(( (g * 7919) % chunks ))
  s=$(( c * ${CHUNK_BLOCKS} ))
  awk -v s=$s -v n=${CHUNK_BLOCKS} -v g=$g 'BEGIN { for (b = s; b < s + n; b++) { x = sprintf("${MARK} b=%010d g=%08d\\n", b, g); for (i = 0; i < ${Math.log2(BLOCK / LINE_BYTES)}; i++) x = x x; printf "%s", x } }' > /tmp/chunk
  if ! dd if=/tmp/chunk of=/dev/vda bs=${BLOCK} seek=$s oflag=direct conv=notrunc status=none; then
    echo "${MARK} write failed g=$g"; sleep 1
  fi
  echo "${MARK} gen $g chunk $c"
  g=$((g + 1))
  [ -z "$SHEAR_PACE" ] || sleep "$SHEAR_PACE"
done
`;
}

/** Writes the initramfs for `kernel` to `file`. */
export function buildInitramfs(kernel: GuestKernel, file: string): void {
  const busybox = readFileSync(BUSYBOX);
  if (!statSync(BUSYBOX).isFile() || !busybox.subarray(0, 4).equals(Buffer.from('\x7fELF', 'latin1'))) {
    throw new Error(`${BUSYBOX} is not the busybox-static binary`);
  }
  const entries: CpioEntry[] = [
    { name: 'bin', mode: S_IFDIR | 0o755 },
    { name: 'bin/busybox', mode: S_IFREG | 0o755, data: busybox },
    { name: 'dev', mode: S_IFDIR | 0o755 },
    { name: 'dev/console', mode: S_IFCHR | 0o600, rdev: [5, 1] },
    { name: 'lib', mode: S_IFDIR | 0o755 },
    { name: 'lib/modules', mode: S_IFDIR | 0o755 },
    ...VIRTIO_MODULES.map((m) => ({ name: `lib/modules/${m}.ko`, mode: S_IFREG | 0o644, data: moduleBytes(findModule(kernel.version, m)) })),
    { name: 'init', mode: S_IFREG | 0o755, data: Buffer.from(initScript([...VIRTIO_MODULES])) },
  ];
  writeFileSync(file, newcArchive(entries));
}
