import t, { type Test } from 'tap';
import { readSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { requireTools } from '@shear/testkit';
import { Qcow2Image, type Qcow2WriteMapping } from './index.js';
import { TestFileIO, backingOpener, openTestImage } from './test-file-io.fixture.js';
import { patternBytes, qemuCheck, qemuCompare, qemuImg, qemuIo } from './test-qemu.fixture.js';

const C = 65536;

const qemuTools = new Map<Test, boolean>();
function useQemu(t: Test): boolean {
  const ok = requireTools(t, 'qemu-img');
  qemuTools.set(t, ok);
  return ok;
}

/** qemu-img check and compare, when qemu-img is installed (requireTools reports it missing). */
function verify(t: Test, path: string, model: Uint8Array): void {
  if (!qemuTools.get(t)) return;
  const c = qemuCheck(path);
  t.equal(c['check-errors'], 0, 'qemu-img check: no errors');
  t.notOk(c.leaks, 'qemu-img check: no leaks');
  writeFileSync(`${path}.raw`, model);
  t.ok(qemuCompare(path, 'qcow2', `${path}.raw`, 'raw').same, 'qemu-img compare: equal');
}

/** Writes the mapped data through a second handle on the file, as a worker thread would. */
async function fill(path: string, m: Qcow2WriteMapping, data: Uint8Array): Promise<void> {
  const worker = await TestFileIO.open(path);
  try {
    for (const x of m.extents) await worker.write(x.hostOffset, data.subarray(x.offset - m.offset, x.offset - m.offset + x.bytes));
  } finally {
    await worker.close();
  }
}

t.test('map, write through another handle, commit', async (t) => {
  useQemu(t);
  const dir = t.testdir();
  const path = join(dir, 'm.qcow2');
  const size = 40 * C + 4096; // short last cluster
  const img = await Qcow2Image.create(await TestFileIO.open(path, { create: true }), { size });
  const model = new Uint8Array(img.length);
  const pre = patternBytes(2 * C, 1);
  await img.write(4 * C, pre); // clusters 4-5 are allocated: mapped in place
  model.set(pre, 4 * C);

  const m1 = await img.mapForWrite(2 * C, 6 * C);
  t.equal(m1.extents.reduce((s, x) => s + x.bytes, 0), 6 * C, 'extents cover the range');
  t.ok(m1.extents.length <= 3, `few extents (${m1.extents.length})`);
  const d1 = patternBytes(6 * C, 2);
  await fill(path, m1, d1);
  await img.commitMapping(m1);
  model.set(d1, 2 * C);

  const m2 = await img.mapForWrite(39 * C, C + 4096);
  t.equal(m2.extents[m2.extents.length - 1]!.bytes % C, 4096, 'the last extent ends at the virtual size');
  const d2 = patternBytes(C + 4096, 3);
  await fill(path, m2, d2);
  await img.commitMapping(m2);
  model.set(d2, 39 * C);
  await t.rejects(img.commitMapping(m2), { code: 'ERR_INVALID_ARGUMENT' }, 'a mapping commits once');

  const all = new Uint8Array(img.length);
  await img.read(0, all);
  t.ok(Buffer.from(all).equals(Buffer.from(model)), 'reads what was written through the mapping');
  await img.close();
  verify(t, path, model);
});

t.test('aborted and abandoned mappings leave nothing behind', async (t) => {
  useQemu(t);
  const dir = t.testdir();
  const path = join(dir, 'a.qcow2');
  const img = await Qcow2Image.create(await TestFileIO.open(path, { create: true }), { size: 16 * C });
  const model = new Uint8Array(img.length);
  await t.rejects(img.mapForWrite(-1, C), { code: 'ERR_INVALID_ARGUMENT' });
  await t.rejects(img.mapForWrite(0, 17 * C), { code: 'ERR_OUT_OF_BOUNDS' });
  const m = await img.mapForWrite(0, 4 * C);
  await fill(path, m, patternBytes(4 * C, 4));
  await img.abortMapping(m);
  const z = new Uint8Array(4 * C);
  await img.read(0, z);
  t.ok(z.every((b) => b === 0), 'aborted data is not visible');
  await img.mapForWrite(8 * C, 2 * C); // never committed: close aborts it
  await img.close();
  verify(t, path, model);
});

t.test('I/O to a mapped range waits for the commit', async (t) => {
  useQemu(t);
  const dir = t.testdir();
  const path = join(dir, 'w.qcow2');
  const img = await Qcow2Image.create(await TestFileIO.open(path, { create: true }), { size: 8 * C });
  const m = await img.mapForWrite(0, 2 * C);
  let writeDone = false;
  const over = img.write(C + 10, new Uint8Array([7, 7, 7])).then(() => {
    writeDone = true;
  });
  const d = patternBytes(2 * C, 5);
  await fill(path, m, d);
  for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
  t.equal(writeDone, false, 'the overlapping write is held by the mapping');
  await img.commitMapping(m);
  await over;
  const model = new Uint8Array(img.length);
  model.set(d);
  model.set([7, 7, 7], C + 10);
  await img.close();
  verify(t, path, model);
  const again = await openTestImage(path, { readOnly: true });
  const b = new Uint8Array(5);
  await again.read(C + 9, b);
  t.same([...b], [d[C + 9], 7, 7, 7, d[C + 13]], 'the later write applied after the mapped data');
  await again.close();
});

t.test('an unaligned mapping copies the rest of its edge clusters from the backing file', async (t) => {
  useQemu(t);
  const dir = t.testdir();
  const base = patternBytes(5 * C, 6);
  writeFileSync(join(dir, 'base.raw'), base);
  const path = join(dir, 'u.qcow2');
  const img = await Qcow2Image.create(await TestFileIO.open(path, { create: true }), {
    size: 8 * C,
    backingFile: 'base.raw',
    backingFormat: 'raw',
    openBacking: backingOpener(dir),
  });
  const model = new Uint8Array(img.length);
  model.set(base);
  const m = await img.mapForWrite(C / 2 + 7, 2 * C);
  t.equal(m.extents[0]!.offset, C / 2 + 7, 'extents start at the requested offset');
  const d = patternBytes(2 * C, 7);
  await fill(path, m, d);
  await img.commitMapping(m);
  model.set(d, C / 2 + 7);
  const empty = await img.mapForWrite(3 * C, 0);
  t.same(empty.extents, []);
  await img.commitMapping(empty);
  await img.close();
  verify(t, path, model);
});

/** Reads what a worker would see through host extents. */
function readExtents(extents: readonly { kind: string; fd?: number; hostOffset?: number; bytes: number }[]): Uint8Array {
  const out = new Uint8Array(extents.reduce((s, x) => s + x.bytes, 0));
  let at = 0;
  for (const x of extents) {
    if (x.kind === 'fd') readSync(x.fd!, out, at, x.bytes, x.hostOffset!);
    else if (x.kind !== 'zero') throw new Error(`unexpected extent ${x.kind}`);
    at += x.bytes;
  }
  return out;
}

t.test('hostMapping: worker-thread reads and writes through fd extents', async (t) => {
  if (!useQemu(t)) return;
  const dir = t.testdir();
  writeFileSync(join(dir, 'base.raw'), patternBytes(3 * C + 100, 8));
  const path = join(dir, 'h.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', path, `${10 * C}`);
  qemuIo(path, [`write -P 1 ${C} ${C}`, `write -z ${2 * C} ${C}`, `write -P 2 ${6 * C} 1000`, `write -c -P 3 ${8 * C} ${C}`]);
  const img = await openTestImage(path);
  const hm = img.hostMapping()!;
  t.ok(hm.mapRead && hm.mapWrite, 'both directions are offered');
  const all = new Uint8Array(8 * C);
  await img.read(0, all);
  const extents = await hm.mapRead!(0, 8 * C);
  t.ok(extents.some((x) => x.kind === 'zero') && extents.some((x) => x.kind === 'fd'), 'zero and fd extents');
  t.ok(Buffer.from(readExtents(extents)).equals(Buffer.from(all)), 'mapped reads equal image reads');
  await t.rejects(hm.mapRead!(8 * C, C), { code: 'ERR_NOT_IMPLEMENTED' }, 'compressed clusters cannot be mapped');

  const model = new Uint8Array(img.length);
  await img.read(0, model);
  const w = await hm.mapWrite!(C + 100, 3 * C);
  const d = patternBytes(3 * C, 9);
  let at = 0;
  for (const x of w.extents) {
    if (x.kind !== 'fd') throw new Error('write extents are fd extents');
    writeSync(x.fd, d, at, x.bytes, x.hostOffset);
    at += x.bytes;
  }
  await w.commit();
  model.set(d, C + 100);
  const aborted = await hm.mapWrite!(5 * C, C);
  await aborted.abort();
  await img.close();
  verify(t, path, model);

  const ro = await openTestImage(path, { readOnly: true });
  const roMap = ro.hostMapping()!;
  t.ok(roMap.mapRead && !roMap.mapWrite, 'a read-only image maps reads only');
  await ro.close();
  const none = await Qcow2Image.open(await TestFileIO.open(path), { fileMapping: null, openBacking: backingOpener(dir) });
  t.equal(none.hostMapping(), undefined, 'no mapping without a mappable file');
  await none.close();
});
