import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { closeSync, openSync, readFileSync, readSync, rmSync, writeSync } from 'node:fs';
import path from 'node:path';
import { buildManifest, commitManifest, writeManifestTmp, type BackupManifest } from '../../packages/cli/src/backup-manifest.js';
import { makeRawImage, qemuImg } from './images.js';

const MiB = 2 ** 20;
/** Not a whole number of MiB: the manifest's last chunk is short. */
export const CHAIN_DISK_BYTES = 20 * MiB + 64 * 1024;

export interface BuiltChain {
  dir: string;
  /** Full first: base.raw, inc1.qcow2, inc2.qcow2. */
  links: string[];
  manifests: BackupManifest[];
}

function qemuIo(format: string, file: string, ...cmds: string[]): void {
  execFileSync('qemu-io', ['-f', format, ...cmds.flatMap((c) => ['-c', c]), file], { encoding: 'utf8' });
}

/**
 * The disk as QEMU reads `image` on its chain, hashed per MiB: the manifest digests an oracle
 * other than Shear's own qcow2 reader computes (qemu-img convert to raw, then SHA-256).
 */
export function qemuChunkDigests(image: string, scratch: string): string[] {
  qemuImg('convert', '-O', 'raw', image, scratch);
  try {
    const bytes = readFileSync(scratch);
    const out: string[] = [];
    for (let o = 0; o < bytes.length; o += MiB) out.push(createHash('sha256').update(bytes.subarray(o, Math.min(bytes.length, o + MiB))).digest('hex'));
    return out;
  } finally {
    rmSync(scratch, { force: true });
  }
}

/** Writes `image`'s manifest through the manifest module, with digests from QEMU's view. */
export async function writeQemuManifest(image: string, parent: BackupManifest | null, backingName: string | null): Promise<BackupManifest> {
  const chunks = qemuChunkDigests(image, path.join(path.dirname(image), '.digest-scratch.raw'));
  const m = buildManifest({
    kind: parent ? 'incremental' : 'full',
    image: path.basename(image),
    imageFormat: image.endsWith('.qcow2') ? 'qcow2' : 'raw',
    disk: { size: CHAIN_DISK_BYTES, identity: 'test:disk0', source: 'test' },
    parent: parent ? { image: backingName!, sha256: parent.sha256 } : null,
    bitmap: parent ? 'b0' : null,
    chunks,
    copiedBytes: 0,
    trimmedBytes: 0,
  });
  await writeManifestTmp(image, m);
  await commitManifest(image);
  return m;
}

/**
 * A three-link chain made by QEMU's tools as `shear pull` lays one out: a raw full with data,
 * holes and written zeroes, then two qcow2 incrementals (backing names relative, formats in the
 * headers) that overwrite data, write zeroes and touch the short last chunk; each with its
 * manifest unless `manifests` is false.
 */
export async function buildChain(dir: string, manifests = true): Promise<BuiltChain> {
  const base = path.join(dir, 'base.raw');
  const inc1 = path.join(dir, 'inc1.qcow2');
  const inc2 = path.join(dir, 'inc2.qcow2');
  makeRawImage(base, CHAIN_DISK_BYTES, 7);
  qemuIo('raw', base, 'write -P 0x5a 5M 1M');
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', inc1);
  qemuIo('qcow2', inc1, 'write -P 0x11 1M 192k', 'write -z 8M 1M', 'write -P 0x12 20M 64k');
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'inc1.qcow2', '-F', 'qcow2', inc2);
  qemuIo('qcow2', inc2, 'write -P 0x21 1088k 128k', 'write -P 0x22 12M 64k', 'write -z 14M 512k');
  const out: BuiltChain = { dir, links: [base, inc1, inc2], manifests: [] };
  if (manifests) {
    const m0 = await writeQemuManifest(base, null, null);
    const m1 = await writeQemuManifest(inc1, m0, 'base.raw');
    const m2 = await writeQemuManifest(inc2, m1, 'inc1.qcow2');
    out.manifests.push(m0, m1, m2);
  }
  return out;
}

/** Flips one byte of `file` at `offset` (a corrupted disk sector). */
export function flipByte(file: string, offset: number): void {
  const fd = openSync(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    readSync(fd, b, 0, 1, offset);
    b[0] = b[0]! ^ 0xff;
    writeSync(fd, b, 0, 1, offset);
  } finally {
    closeSync(fd);
  }
}

/** Where guest `offset` of `image`'s own layer lies in the qcow2 file (qemu-img map). */
export function hostOffsetOf(image: string, offset: number): number {
  const map = JSON.parse(qemuImg('map', '--output=json', image)) as { start: number; length: number; depth: number; data: boolean; offset?: number }[];
  const e = map.find((m) => m.depth === 0 && m.data && m.offset !== undefined && m.start <= offset && offset < m.start + m.length);
  if (!e) throw new Error(`${image} does not allocate guest offset ${offset} in its own layer`);
  return e.offset! + (offset - e.start);
}
