import t, { type Test } from 'tap';
import { statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { requireTools } from '@shear/testkit';
import { Qcow2Image } from './index.js';
import { TestFileIO, openTestImage } from './test-file-io.fixture.js';
import { patternBytes, qemuCheck, qemuCompare } from './test-qemu.fixture.js';

const KiB = 1024;
const MiB = 1024 * KiB;

async function create(path: string, opts: Parameters<typeof Qcow2Image.create>[1]): Promise<Qcow2Image> {
  return Qcow2Image.create(await TestFileIO.open(path, { create: true }), opts);
}

function clean(t: Test, path: string): void {
  const c = qemuCheck(path);
  t.equal(c['check-errors'], 0, 'no check errors');
  t.notOk(c.leaks, 'no leaks');
  t.notOk(c.corruptions, 'no corruptions');
}

function sameAs(t: Test, path: string, model: Uint8Array): void {
  const raw = `${path}.model.raw`;
  writeFileSync(raw, model);
  const r = qemuCompare(path, 'qcow2', raw, 'raw');
  t.ok(r.same, `equal to the model (${r.output.trim()})`);
}

async function readAll(img: Qcow2Image): Promise<Uint8Array> {
  const buf = new Uint8Array(img.length);
  await img.read(0, buf);
  return buf;
}

t.test('writes persist across close and reopen', async (t) => {
  const dir = t.testdir();
  const path = join(dir, 'p.qcow2');
  const img = await create(path, { size: 3 * MiB, clusterBytes: 4096 });
  const model = new Uint8Array(img.length);
  const a = patternBytes(70000, 1);
  await img.write(12345, a, { fua: true });
  model.set(a, 12345);
  await img.close();
  await img.close(); // idempotent
  const again = await openTestImage(path, { readOnly: true });
  t.ok(Buffer.from(await readAll(again)).equals(Buffer.from(model)));
  await again.close();
});

t.test('writeZeroes: preallocated zero clusters, unmap, fastOnly', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const path = join(dir, 'z.qcow2');
  const C = 65536;
  const img = await create(path, { size: 4 * MiB, clusterBytes: C });
  const model = new Uint8Array(img.length);
  const data = patternBytes(16 * C, 2);
  await img.write(0, data);
  model.set(data);
  await img.flush();
  const allocatedBefore = qemuCheck(path)['allocated-clusters'] as number;

  await img.writeZeroes(0, 4 * C); // keeps the clusters, sets the zero flag
  model.fill(0, 0, 4 * C);
  await img.writeZeroes(4 * C, 4 * C, { mayUnmap: true }); // frees them
  model.fill(0, 4 * C, 8 * C);
  await t.rejects(img.writeZeroes(8 * C + 1, C, { fastOnly: true }), { code: 'ERR_NOT_IMPLEMENTED' }, 'fastOnly refuses partial clusters');
  await img.writeZeroes(8 * C, 2 * C, { fastOnly: true });
  model.fill(0, 8 * C, 10 * C);
  await img.writeZeroes(10 * C + 100, 1000); // inside one cluster: written as zero bytes
  model.fill(0, 10 * C + 100, 10 * C + 1100);
  const status = await img.blockStatus(0, 10 * C);
  t.same(status, [{ offset: 0, bytes: 10 * C, data: false, zero: true, allocated: true }], 'zeroed clusters read as allocated zeroes');

  // A partial write into a preallocated zero cluster keeps the rest zero.
  const small = patternBytes(100, 3);
  await img.write(C + 50, small);
  model.set(small, C + 50);
  t.ok(Buffer.from(await readAll(img)).equals(Buffer.from(model)), 'reads back');
  await img.close();
  clean(t, path);
  sameAs(t, path, model);
  const allocatedAfter = qemuCheck(path)['allocated-clusters'] as number;
  t.ok(allocatedAfter <= allocatedBefore - 4, `unmapped clusters were freed (${allocatedBefore} -> ${allocatedAfter})`);
});

t.test('discarded clusters are reused after a flush', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const path = join(dir, 'd.qcow2');
  const img = await create(path, { size: 8 * MiB, clusterBytes: 65536 });
  await img.write(0, patternBytes(2 * MiB, 4));
  await img.flush();
  const sizeAfterFirst = statSync(path).size;
  await img.discard(0, 2 * MiB);
  await img.flush();
  await img.write(4 * MiB, patternBytes(2 * MiB, 5));
  await img.flush();
  t.ok(statSync(path).size <= sizeAfterFirst, `the file did not grow (${sizeAfterFirst} -> ${statSync(path).size})`);
  const model = new Uint8Array(img.length);
  model.set(patternBytes(2 * MiB, 5), 4 * MiB);
  t.ok(Buffer.from(await readAll(img)).equals(Buffer.from(model)));
  await img.close();
  clean(t, path);
  sameAs(t, path, model);
});

t.test('refcount table growth and L2 cache eviction keep the image clean', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const path = join(dir, 'g.qcow2');
  // 512-byte clusters with 64-bit refcounts: a refcount block covers 64 clusters and the first
  // table covers only 2 MiB of file, so 3 MiB of data moves the table.
  const img = await create(path, { size: 16 * MiB, clusterBytes: 512, refcountBits: 64, l2CacheBytes: 4 * 512 });
  const model = new Uint8Array(img.length);
  for (let i = 0; i < 48; i++) {
    const off = ((i * 7919) % 256) * 65536 + (i % 5) * 333;
    const d = patternBytes(65536, i);
    await img.write(off, d);
    model.set(d, off);
  }
  t.ok(Buffer.from(await readAll(img)).equals(Buffer.from(model)), 'reads back');
  await img.close();
  clean(t, path);
  sameAs(t, path, model);
  const again = await openTestImage(path, { l2CacheBytes: 4 * 512 });
  t.ok(Buffer.from(await readAll(again)).equals(Buffer.from(model)), 'reads back after reopen');
  const d = patternBytes(3 * MiB, 99);
  await again.write(5 * MiB + 7, d);
  model.set(d, 5 * MiB + 7);
  await again.close();
  clean(t, path);
  sameAs(t, path, model);
});

t.test('argument, read-only and closed errors', async (t) => {
  const dir = t.testdir();
  const path = join(dir, 'e.qcow2');
  const img = await create(path, { size: MiB });
  await t.rejects(img.read(MiB - 1, new Uint8Array(2)), { code: 'ERR_OUT_OF_BOUNDS' });
  await t.rejects(img.write(-1, new Uint8Array(2)), { code: 'ERR_INVALID_ARGUMENT' });
  await t.rejects(img.writeZeroes(0.5, 1), { code: 'ERR_INVALID_ARGUMENT' });
  await t.rejects(img.discard(0, MiB + 1), { code: 'ERR_OUT_OF_BOUNDS' });
  await img.write(0, new Uint8Array(0));
  await img.discard(100, 200); // no whole cluster: nothing to do
  t.same(await img.blockStatus(0, 0), []);
  await img.close();
  await t.rejects(img.read(0, new Uint8Array(1)), { code: 'ERR_QCOW2_CLOSED' });
  await t.rejects(img.flush(), { code: 'ERR_QCOW2_CLOSED' });

  const ro = await openTestImage(path, { readOnly: true });
  t.equal(ro.readOnly, true);
  await t.rejects(ro.write(0, new Uint8Array(1)), { code: 'ERR_QCOW2_READ_ONLY' });
  await t.rejects(ro.writeZeroes(0, 1), { code: 'ERR_QCOW2_READ_ONLY' });
  await t.rejects(ro.discard(0, 65536), { code: 'ERR_QCOW2_READ_ONLY' });
  await t.rejects(ro.mapForWrite(0, 65536), { code: 'ERR_QCOW2_READ_ONLY' });
  await t.rejects(ro.writeCompressed(0, new Uint8Array(65536)), { code: 'ERR_QCOW2_READ_ONLY' });
  await ro.flush();
  await ro.close();
});
