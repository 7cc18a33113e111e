// The scale workload of the peers bench: a huge sparse raw image with a little data in scattered
// extents (by default 1 TiB with 1% data in 1 MiB extents), so that a copy's time should follow
// the data, not the size. Verification reads only data: each source extent against the target,
// and whatever the target holds outside them must read as zeroes.
import { closeSync, existsSync, ftruncateSync, openSync, readFileSync, readSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { createHash, randomFillSync } from 'node:crypto';
import { getNative } from '@shear/native';

const EXTENT_BYTES = 2 ** 20;

export interface ScaleImage {
  path: string;
  bytes: number;
  dataBytes: number;
  /** Sorted, non-overlapping [offset, bytes] of the data the image holds. */
  extents: Array<[number, number]>;
  /** SHA-256 of each extent, in order. */
  hashes: string[];
  reused: boolean;
}

function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    return x / 2 ** 32;
  };
}

/** Makes (or reuses, when its description file matches) the image; 1 MiB extents at random MiB slots. */
export function ensureScaleImage(file: string, bytes: number, dataPercent: number, seed: number): ScaleImage {
  const slots = Math.floor(bytes / EXTENT_BYTES);
  const want = Math.max(1, Math.round((slots * dataPercent) / 100));
  const meta = `${file}.json`;
  if (existsSync(file) && existsSync(meta)) {
    const saved = JSON.parse(readFileSync(meta, 'utf8')) as Omit<ScaleImage, 'reused'> & { seed: number; dataPercent: number };
    if (saved.bytes === bytes && saved.seed === seed && saved.dataPercent === dataPercent) return { ...saved, path: file, reused: true };
  }
  const r = rng(seed);
  const chosen = new Set<number>();
  while (chosen.size < Math.min(want, slots)) chosen.add(Math.floor(r() * slots));
  const offsets = [...chosen].sort((a, b) => a - b).map((s) => s * EXTENT_BYTES);
  rmSync(file, { force: true });
  const fd = openSync(file, 'w');
  const buf = Buffer.alloc(EXTENT_BYTES);
  const hashes: string[] = [];
  try {
    ftruncateSync(fd, bytes);
    for (const off of offsets) {
      randomFillSync(buf);
      writeAll(fd, buf, off);
      hashes.push(createHash('sha256').update(buf).digest('hex'));
    }
  } finally {
    closeSync(fd);
  }
  const image = { path: file, bytes, dataBytes: offsets.length * EXTENT_BYTES, extents: offsets.map((o): [number, number] => [o, EXTENT_BYTES]), hashes };
  writeFileSync(meta, JSON.stringify({ ...image, seed, dataPercent }));
  return { ...image, reused: false };
}

function writeAll(fd: number, buf: Buffer, at: number): void {
  for (let done = 0; done < buf.length; ) done += writeSync(fd, buf, done, buf.length - done, at + done);
}

function readAll(fd: number, buf: Buffer, at: number): void {
  for (let done = 0; done < buf.length; ) {
    const n = readSync(fd, buf, done, buf.length - done, at + done);
    if (n === 0) { buf.fill(0, done); return; }
    done += n;
  }
}

/** The target's data ranges (SEEK_DATA/SEEK_HOLE), as [offset, end). */
function dataRanges(fd: number, size: number): Array<[number, number]> {
  const native = getNative();
  const out: Array<[number, number]> = [];
  for (let at = 0; at < size; ) {
    const data = native.seekData(fd, at);
    if (data < 0 || data >= size) break;
    const hole = Math.min(size, native.seekHole(fd, data));
    out.push([data, hole]);
    at = hole;
  }
  return out;
}

/** null when the target holds exactly the image's data (zeroes elsewhere), else what differs first. */
export function verifyScaleCopy(image: ScaleImage, target: string): string | null {
  const fd = openSync(target, 'r');
  const buf = Buffer.alloc(EXTENT_BYTES);
  try {
    for (let i = 0; i < image.extents.length; i++) {
      const [off, len] = image.extents[i]!;
      const b = buf.subarray(0, len);
      readAll(fd, b, off);
      if (createHash('sha256').update(b).digest('hex') !== image.hashes[i]) return `extent at ${off} differs`;
    }
    // Outside the source's extents the image is a hole: the target must read zeroes there.
    let e = 0;
    for (const [start, end] of dataRanges(fd, image.bytes)) {
      for (let at = start; at < end; ) {
        while (e < image.extents.length && image.extents[e]![0] + image.extents[e]![1] <= at) e++;
        const ext = image.extents[e];
        if (ext && ext[0] <= at) { at = ext[0] + ext[1]; continue; }
        const stop = Math.min(end, ext ? ext[0] : end, at + EXTENT_BYTES);
        const b = buf.subarray(0, stop - at);
        readAll(fd, b, at);
        const nz = b.findIndex((v) => v !== 0);
        if (nz >= 0) return `non-zero byte at ${at + nz}, outside the source's data`;
        at = stop;
      }
    }
    return null;
  } finally {
    closeSync(fd);
  }
}
