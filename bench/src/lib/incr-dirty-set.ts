// The incremental-backup data set: which clusters of an image are dirty (uniform random, fixed
// seed), their extents, the SHA-256 QEMU's x-debug-block-dirty-bitmap-sha256 gives for such a
// bitmap, and the check of an incremental target (dirty clusters equal the source, the rest zero).
import { createHash } from 'node:crypto';
import { closeSync, openSync, readSync } from 'node:fs';

/** mulberry32: small, fast, deterministic; not cryptographic. */
function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

/**
 * `count` distinct cluster indexes out of `totalClusters`, uniform random for `seed`, sorted.
 * A partial Fisher-Yates shuffle, so the same seed always gives the same set.
 */
export function chooseDirtyClusters(totalClusters: number, count: number, seed: number): Uint32Array {
  if (!Number.isSafeInteger(totalClusters) || totalClusters <= 0 || totalClusters > 2 ** 32) throw new Error(`Cannot choose dirty clusters: bad cluster count ${totalClusters}`);
  if (!Number.isSafeInteger(count) || count < 0 || count > totalClusters) throw new Error(`Cannot choose ${count} dirty clusters out of ${totalClusters}`);
  const rng = mulberry32(seed);
  const idx = new Uint32Array(totalClusters);
  for (let i = 0; i < totalClusters; i++) idx[i] = i;
  for (let i = 0; i < count; i++) {
    const j = i + Math.floor(rng() * (totalClusters - i));
    const t = idx[i]!;
    idx[i] = idx[j]!;
    idx[j] = t;
  }
  return idx.slice(0, count).sort();
}

/** Adjacent dirty clusters merged into (offset, bytes) extents, in offset order. */
export function dirtyExtents(clusters: Uint32Array, clusterBytes: number): Array<[offset: number, bytes: number]> {
  const out: Array<[number, number]> = [];
  for (const c of clusters) {
    const offset = c * clusterBytes;
    const last = out[out.length - 1];
    if (last && last[0] + last[1] === offset) last[1] += clusterBytes;
    else out.push([offset, clusterBytes]);
  }
  return out;
}

/**
 * SHA-256 of the bitmap as QEMU hashes it (hbitmap_sha256): its lowest level, one bit per
 * cluster, bit i of 64-bit little-endian word i/64 for cluster i, ceil(clusters/64) words.
 */
export function bitmapSha256(clusters: Uint32Array, totalClusters: number): string {
  const bytes = Buffer.alloc(Math.ceil(totalClusters / 64) * 8);
  for (const c of clusters) bytes[c >>> 3]! |= 1 << (c & 7);
  return createHash('sha256').update(bytes).digest('hex');
}

export interface TargetCheck {
  ok: boolean;
  detail: string;
}

const CHECK_CHUNK_BYTES = 8 * 2 ** 20;

/**
 * Checks an incremental target that started empty: inside `extents` it equals `source`,
 * everywhere else (up to `length`) it reads as zeroes. Reads the target once and only the
 * dirty ranges of the source.
 */
export function checkIncrementalTarget(source: string, target: string, extents: ReadonlyArray<readonly [number, number]>, length: number): TargetCheck {
  const tfd = openSync(target, 'r');
  const sfd = openSync(source, 'r');
  try {
    const tbuf = Buffer.allocUnsafe(CHECK_CHUNK_BYTES);
    const sbuf = Buffer.allocUnsafe(CHECK_CHUNK_BYTES);
    const zero = Buffer.alloc(CHECK_CHUNK_BYTES);
    let e = 0;
    for (let pos = 0; pos < length;) {
      // Walk the file in pieces that never straddle an extent boundary.
      while (e < extents.length && extents[e]![0] + extents[e]![1] <= pos) e++;
      const ext = extents[e];
      const inside = ext !== undefined && ext[0] <= pos;
      const end = Math.min(length, pos + CHECK_CHUNK_BYTES, inside ? ext[0] + ext[1] : ext ? ext[0] : length);
      const n = end - pos;
      readFully(tfd, tbuf, n, pos, target);
      if (inside) {
        readFully(sfd, sbuf, n, pos, source);
        if (tbuf.compare(sbuf, 0, n, 0, n) !== 0) return { ok: false, detail: `dirty range at ${firstDiff(tbuf, sbuf, n) + pos} differs from the source` };
      } else if (tbuf.compare(zero, 0, n, 0, n) !== 0) {
        return { ok: false, detail: `clean range at ${firstDiff(tbuf, zero, n) + pos} is not zero` };
      }
      pos = end;
    }
    return { ok: true, detail: `${extents.length} dirty extents equal the source, the rest is zero` };
  } finally {
    closeSync(sfd);
    closeSync(tfd);
  }
}

function readFully(fd: number, buf: Buffer, bytes: number, position: number, file: string): void {
  for (let done = 0; done < bytes;) {
    const n = readSync(fd, buf, done, bytes - done, position + done);
    if (n === 0) throw new Error(`Cannot read "${file}" at ${position + done}: unexpected end of file`);
    done += n;
  }
}

function firstDiff(a: Buffer, b: Buffer, n: number): number {
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return -1;
}
