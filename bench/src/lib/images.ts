// Test images for the copy benchmark, generated once into a work directory and reused while
// their size and generator version match (a marker file records what was finished).
import { randomFillSync } from 'node:crypto';
import { closeSync, existsSync, fsyncSync, ftruncateSync, openSync, readFileSync, rmSync, statSync, statfsSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';

export const BLOCK_BYTES = 65536;
const CHUNK_BYTES = 4 * 2 ** 20;
/** Bumped whenever the content an image gets changes, so old images are regenerated. */
const GENERATOR_VERSION = 1;
const MARKER = 'images.json';

export type ImageKind = 'full' | 'sparse' | 'mixed';

export interface ImageInfo {
  kind: ImageKind;
  path: string;
  bytes: number;
  /** Bytes the file system allocated for it (st_blocks * 512). */
  allocatedBytes: number;
  reused: boolean;
  generateSeconds: number;
}

/** xorshift128: fast, not cryptographic; one stream per image so every 64 KiB block differs. */
class Xorshift128 {
  private x: number; private y: number; private z: number; private w: number;
  constructor(seed: number) {
    this.x = seed >>> 0 || 1; this.y = 362436069; this.z = 521288629; this.w = 88675123;
    for (let i = 0; i < 16; i++) this.next();
  }
  next(): number {
    const t = (this.x ^ (this.x << 11)) >>> 0;
    this.x = this.y; this.y = this.z; this.z = this.w;
    this.w = (this.w ^ (this.w >>> 19) ^ (t ^ (t >>> 8))) >>> 0;
    return this.w;
  }
  fill(words: Uint32Array): void {
    let x = this.x, y = this.y, z = this.z, w = this.w;
    for (let i = 0; i < words.length; i++) {
      const t = x ^ (x << 11);
      x = y; y = z; z = w;
      w = (w ^ (w >>> 19) ^ (t ^ (t >>> 8))) >>> 0;
      words[i] = w;
    }
    this.x = x; this.y = y; this.z = z; this.w = w;
  }
  /** Integer in [lo, hi]. */
  int(lo: number, hi: number): number {
    return lo + (this.next() % (hi - lo + 1));
  }
}

function randomBuffer(rng: Xorshift128, bytes: number): Buffer {
  const words = new Uint32Array(bytes / 4);
  rng.fill(words);
  return Buffer.from(words.buffer, words.byteOffset, bytes);
}

/**
 * Text-like bytes: pseudo-words from a fixed syllable set with spaces, punctuation, numbers and
 * line breaks. DEFLATE squeezes a 64 KiB cluster of it to roughly a third.
 */
function textPool(rng: Xorshift128, bytes: number): Buffer {
  const syllables = ['ka', 'lo', 'mi', 'ne', 'ru', 'sta', 'ver', 'on', 'ex', 'tri', 'po', 'dal', 'que', 'ing', 'th', 'er', 'an', 'block', 'copy', 'disk'];
  const words: string[] = [];
  for (let i = 0; i < 3000; i++) {
    let w = '';
    for (let s = rng.int(1, 4); s > 0; s--) w += syllables[rng.next() % syllables.length]!;
    words.push(w);
  }
  const out = Buffer.alloc(bytes);
  let pos = 0;
  let col = 0;
  while (pos < bytes) {
    const r = rng.next() % 100;
    let piece = r < 3 ? String(rng.next() % 100000) : words[rng.next() % words.length]!;
    piece += r < 8 ? ', ' : r < 12 ? '. ' : ' ';
    col += piece.length;
    if (col > 72) { piece += '\n'; col = 0; }
    pos += out.write(piece, pos, 'latin1');
  }
  return out;
}

interface Marker { version: number; images: Partial<Record<ImageKind, { bytes: number }>> }

function readMarker(dir: string): Marker {
  try {
    const m = JSON.parse(readFileSync(path.join(dir, MARKER), 'utf8')) as Marker;
    if (m.version === GENERATOR_VERSION) return m;
  } catch { /* no marker yet */ }
  return { version: GENERATOR_VERSION, images: {} };
}

function writeMarker(dir: string, m: Marker): void {
  writeFileSync(path.join(dir, MARKER), JSON.stringify(m, null, 2) + '\n');
}

export function imagePath(dir: string, kind: ImageKind): string {
  return path.join(dir, `${kind}.raw`);
}

export function allocatedBytes(file: string): number {
  return statSync(file).blocks * 512;
}

/** Bytes the images still to be generated will take (an estimate; 0 for reusable ones). */
export function bytesToGenerate(dir: string, wanted: Array<{ kind: ImageKind; bytes: number }>): number {
  const m = readMarker(dir);
  let need = 0;
  for (const { kind, bytes } of wanted) {
    if (isReusable(dir, m, kind, bytes)) continue;
    need += kind === 'full' ? bytes : kind === 'sparse' ? bytes * 0.55 : bytes * 0.8;
  }
  return need;
}

function isReusable(dir: string, m: Marker, kind: ImageKind, bytes: number): boolean {
  const p = imagePath(dir, kind);
  return m.images[kind]?.bytes === bytes && existsSync(p) && statSync(p).size === bytes;
}

export function freeDiskBytes(dir: string): number {
  const s = statfsSync(dir);
  return s.bavail * s.bsize;
}

/** Returns the image, generating it unless a finished one of this size and version exists. */
export function ensureImage(dir: string, kind: ImageKind, bytes: number, log: (msg: string) => void): ImageInfo {
  if (bytes % BLOCK_BYTES !== 0) throw new Error(`Cannot create image "${kind}": size ${bytes} is not a multiple of 64 KiB`);
  const p = imagePath(dir, kind);
  const marker = readMarker(dir);
  if (isReusable(dir, marker, kind, bytes)) {
    return { kind, path: p, bytes, allocatedBytes: allocatedBytes(p), reused: true, generateSeconds: 0 };
  }
  delete marker.images[kind];
  writeMarker(dir, marker);
  log(`generating ${p} (${(bytes / 2 ** 30).toFixed(2)} GiB, ${kind})...`);
  const t0 = performance.now();
  rmSync(p, { force: true });
  const fd = openSync(p, 'w');
  try {
    ftruncateSync(fd, bytes);
    if (kind === 'full') writeFull(fd, bytes);
    else if (kind === 'sparse') writeSparse(fd, bytes);
    else writeMixed(fd, bytes);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  const seconds = (performance.now() - t0) / 1000;
  marker.images[kind] = { bytes };
  writeMarker(dir, marker);
  return { kind, path: p, bytes, allocatedBytes: allocatedBytes(p), reused: false, generateSeconds: seconds };
}

function writeAll(fd: number, buf: Uint8Array, offset: number): void {
  for (let done = 0; done < buf.length;) done += writeSync(fd, buf, done, buf.length - done, offset + done);
}

/** Fully allocated, incompressible. */
function writeFull(fd: number, bytes: number): void {
  const rng = new Xorshift128(0x5eed0001);
  const words = new Uint32Array(CHUNK_BYTES / 4);
  const buf = Buffer.from(words.buffer);
  for (let off = 0; off < bytes; off += CHUNK_BYTES) {
    rng.fill(words);
    writeAll(fd, buf.subarray(0, Math.min(CHUNK_BYTES, bytes - off)), off);
  }
}

/** Alternating data and hole regions of 64 KiB..1 MiB (random multiples of 64 KiB): about half holes. */
function writeSparse(fd: number, bytes: number): void {
  const rng = new Xorshift128(0x5eed0002);
  let data = rng.next() % 2 === 0;
  for (let off = 0; off < bytes;) {
    const len = Math.min(rng.int(1, 16) * BLOCK_BYTES, bytes - off);
    if (data) writeAll(fd, randomBuffer(rng, len), off);
    off += len;
    data = !data;
  }
}

/**
 * Runs of 64 KiB..1 MiB, each text-like (50%), random (25%), a hole (12.5%) or written zeroes
 * (12.5%): the compression workload.
 */
function writeMixed(fd: number, bytes: number): void {
  const rng = new Xorshift128(0x5eed0003);
  const pool = textPool(rng, 8 * 2 ** 20);
  const zeroes = Buffer.alloc(16 * BLOCK_BYTES);
  for (let off = 0; off < bytes;) {
    const len = Math.min(rng.int(1, 16) * BLOCK_BYTES, bytes - off);
    const kind = rng.next() % 8;
    if (kind < 4) {
      const start = rng.next() % (pool.length - len);
      writeAll(fd, pool.subarray(start, start + len), off);
    } else if (kind < 6) {
      writeAll(fd, randomBuffer(rng, len), off);
    } else if (kind === 6) {
      writeAll(fd, zeroes.subarray(0, len), off);
    } // kind 7: hole
    off += len;
  }
}

/** Deletes the images and the marker. */
export function freeImages(dir: string): void {
  for (const kind of ['full', 'sparse', 'mixed'] as const) rmSync(imagePath(dir, kind), { force: true });
  rmSync(path.join(dir, MARKER), { force: true });
}

/** An empty file of `bytes` (all hole), replacing whatever was there. */
export function sparseFile(file: string, bytes: number): void {
  rmSync(file, { force: true });
  writeFileSync(file, '');
  truncateSync(file, bytes);
}

/** A file of `bytes` of random data, fully allocated (the disk a latency bench writes to). */
export function randomImage(file: string, bytes: number): void {
  const fd = openSync(file, 'w');
  try {
    ftruncateSync(fd, bytes);
    const buf = Buffer.alloc(CHUNK_BYTES);
    for (let at = 0; at < bytes; at += buf.length) {
      randomFillSync(buf);
      writeSync(fd, buf, 0, Math.min(buf.length, bytes - at), at);
    }
  } finally {
    closeSync(fd);
  }
}
