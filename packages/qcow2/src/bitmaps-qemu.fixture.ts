import { spawnSync } from 'node:child_process';
import { copyFileSync } from 'node:fs';
import { SharedBitmap } from '@shear/bitmap';
import type { BlockStatusExtent, WriteOptions, WriteZeroesOptions } from '@shear/block';
import type { GrowableIO } from './growable-io.js';
import type { TestFileIO } from './test-file-io.fixture.js';
import { qemuInfo } from './test-qemu.fixture.js';

/** Test helpers for the bitmap tests: QEMU's view of bitmaps, bitmap builders, crash copies. */

export interface QemuBitmapInfo {
  name: string;
  granularity: number;
  flags: string[];
}

/** The bitmaps `qemu-img info` lists (empty when none). */
export function qemuBitmaps(path: string): QemuBitmapInfo[] {
  const fs = qemuInfo(path)['format-specific'] as { data: { bitmaps?: QemuBitmapInfo[] } };
  return fs.data.bitmaps ?? [];
}

/** The stderr of `qemu-img info` (QEMU warns there about bitmaps it must ignore). */
export function qemuInfoStderr(path: string): string {
  return spawnSync('qemu-img', ['info', path], { encoding: 'utf8' }).stderr;
}

/**
 * The dirty runs of bitmap `name` as QEMU sees them: qemu-nbd exports the bitmap and nbdinfo
 * reads its block status (qemu:dirty-bitmap:NAME). Runs are merged where they touch.
 */
export function qemuDirtyRuns(path: string, name: string): [number, number][] {
  const r = spawnSync('nbdinfo', ['--json', `--map=qemu:dirty-bitmap:${name}`, '--', '[', 'qemu-nbd', '-r', '-f', 'qcow2', '-B', name, path, ']'], {
    encoding: 'utf8',
    maxBuffer: 64 * 1024 * 1024,
  });
  if (r.status !== 0) throw new Error(`nbdinfo failed (${r.status}): ${r.stderr}`);
  const extents = JSON.parse(r.stdout) as { offset: number; length: number; type: number }[];
  return mergeRuns(extents.filter((e) => e.type & 1).map((e) => [e.offset, e.length]));
}

export function mergeRuns(runs: Iterable<[number, number]>): [number, number][] {
  const out: [number, number][] = [];
  for (const [o, l] of runs) {
    const prev = out[out.length - 1];
    if (prev && prev[0] + prev[1] === o) prev[1] += l;
    else out.push([o, l]);
  }
  return out;
}

/** Shear's dirty runs of a bitmap, in the same form. */
export function dirtyRuns(bm: SharedBitmap): [number, number][] {
  return mergeRuns([...bm.dirtyExtents()].map((a) => [a.offset, a.bytes]));
}

export function sameBits(a: SharedBitmap | null | undefined, b: SharedBitmap | null | undefined): boolean {
  if (!a || !b) return false;
  if (a.size !== b.size || a.granularity !== b.granularity) return false;
  const x = a.leafWords();
  const y = b.leafWords();
  return x.length === y.length && x.every((w, i) => w === y[i]);
}

/** A bitmap with the given byte ranges set (offsets wrap into the disk). */
export function bitmapWith(size: number, granularity: number, ranges: readonly (readonly [number, number])[]): SharedBitmap {
  const bm = SharedBitmap.create(size, granularity);
  for (const [a, b] of ranges) {
    const offset = a % size;
    bm.set(offset, Math.min(size - offset, 1 + (b % (size - offset))));
  }
  return bm;
}

/**
 * Copies the image file before every write and truncate the image issues: each copy is what a
 * crash at that moment would leave, with writes reaching the disk in the order issued (which
 * the flushes enforce on real disks). `armed` turns copying on and off.
 */
export class SnapshottingIO implements GrowableIO {
  readonly snapshots: string[] = [];
  armed = false;
  constructor(
    readonly inner: TestFileIO,
    readonly path: string,
  ) {}
  get length(): number {
    return this.inner.length;
  }
  #snapshot(): void {
    if (!this.armed) return;
    const to = `${this.path}.crash${this.snapshots.length}`;
    copyFileSync(this.path, to);
    this.snapshots.push(to);
  }
  read(offset: number, buf: Uint8Array): Promise<void> {
    return this.inner.read(offset, buf);
  }
  write(offset: number, buf: Uint8Array, opts?: WriteOptions): Promise<void> {
    this.#snapshot();
    return this.inner.write(offset, buf, opts);
  }
  writeZeroes(offset: number, bytes: number, opts?: WriteZeroesOptions): Promise<void> {
    this.#snapshot();
    return this.inner.writeZeroes(offset, bytes, opts);
  }
  discard(offset: number, bytes: number): Promise<void> {
    return this.inner.discard(offset, bytes);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    return this.inner.blockStatus(offset, bytes);
  }
  truncate(length: number): Promise<void> {
    this.#snapshot();
    return this.inner.truncate(length);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}
