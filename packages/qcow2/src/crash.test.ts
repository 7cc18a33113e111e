import t from 'tap';
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { requireTools } from '@shear/testkit';
import type { BlockStatusExtent, WriteOptions, WriteZeroesOptions } from '@shear/block';
import type { GrowableIO } from './growable-io.js';
import { Qcow2Image } from './index.js';
import { TestFileIO } from './test-file-io.fixture.js';
import { patternBytes, qemuCheck } from './test-qemu.fixture.js';

/**
 * Copies the image file before some of the writes the image issues: each copy is what a crash
 * at that moment would leave (with writes reaching the disk in the order issued, which the
 * image's flushes enforce on real disks).
 */
class SnapshottingIO implements GrowableIO {
  readonly snapshots: string[] = [];
  #calls = 0;
  constructor(
    readonly inner: TestFileIO,
    readonly path: string,
    readonly every: number,
    readonly max: number,
  ) {}
  get length(): number {
    return this.inner.length;
  }
  #maybeSnapshot(): void {
    if (++this.#calls % this.every !== 0 || this.snapshots.length >= this.max) return;
    const to = `${this.path}.crash${this.snapshots.length}`;
    copyFileSync(this.path, to);
    this.snapshots.push(to);
  }
  read(offset: number, buf: Uint8Array): Promise<void> {
    return this.inner.read(offset, buf);
  }
  write(offset: number, buf: Uint8Array, opts?: WriteOptions): Promise<void> {
    this.#maybeSnapshot();
    return this.inner.write(offset, buf, opts);
  }
  writeZeroes(offset: number, bytes: number, opts?: WriteZeroesOptions): Promise<void> {
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
    this.#maybeSnapshot();
    return this.inner.truncate(length);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

t.test('a crash at any write leaves at worst leaked clusters', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const path = join(dir, 'c.qcow2');
  const C = 512;
  // Create first, then wrap: the snapshots start from a valid image.
  await (await Qcow2Image.create(await TestFileIO.open(path, { create: true }), { size: 8 * 1024 * 1024, clusterBytes: C, refcountBits: 64 })).close();
  const io = new SnapshottingIO(await TestFileIO.open(path), path, 3, 80);
  const img = await Qcow2Image.open(io, { l2CacheBytes: 4 * C });
  for (let i = 0; i < 40; i++) {
    const off = ((i * 7919) % 128) * 65536 + (i % 3) * 100;
    await img.write(off, patternBytes(20000 + (i % 4) * 5000, i));
    if (i % 5 === 4) await img.discard(((i * 31) % 128) * 65536, 65536);
    if (i % 7 === 6) await img.writeCompressed(((i * 13) % 128) * 65536, new Uint8Array(C).fill(i));
    if (i % 8 === 7) await img.flush();
  }
  await img.close();
  t.ok(io.snapshots.length >= 40, `${io.snapshots.length} crash points`);
  let leaky = 0;
  for (const snap of io.snapshots) {
    const c = qemuCheck(snap);
    if (c['check-errors'] !== 0 || c.corruptions) t.fail(`${snap}: ${JSON.stringify(c)}`);
    if (c.leaks) leaky++;
  }
  t.pass(`no crash point is corrupt (${leaky} leak clusters, as allowed)`);
  const final = qemuCheck(path);
  t.equal(final['check-errors'], 0);
  t.notOk(final.leaks, 'the cleanly closed image has no leaks');
});
