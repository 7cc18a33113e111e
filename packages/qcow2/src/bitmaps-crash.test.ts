import t from 'tap';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { SharedBitmap } from '@shear/bitmap';
import { requireTools } from '@shear/testkit';
import { Qcow2Image, type BitmapToStore, type StoredBitmap } from './index.js';
import { TestFileIO, backingOpener, openTestImage } from './test-file-io.fixture.js';
import { qemuCheck } from './test-qemu.fixture.js';
import { SnapshottingIO, bitmapWith, dirtyRuns, qemuBitmaps } from './bitmaps-qemu.fixture.js';

const MiB = 1024 * 1024;

/** A comparable picture of the stored bitmaps: name, flags and bits (null when in use). */
type State = string;
function stateOf(list: readonly { name: string; inUse: boolean; auto: boolean; bits: SharedBitmap | null }[]): State {
  return JSON.stringify(list.map((b) => [b.name, b.inUse, b.auto, b.inUse ? null : b.bits && dirtyRuns(b.bits)]));
}
function loaded(list: readonly StoredBitmap[]): State {
  return stateOf(list.map((b) => ({ name: b.name, inUse: b.flags.inUse, auto: b.flags.auto, bits: b.bits })));
}

interface Model {
  name: string;
  inUse: boolean;
  auto: boolean;
  bits: SharedBitmap;
}

t.test('a crash at any write of a store or remove leaves the old or the new bitmaps, never garbage', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const size = 4 * MiB;
  writeFileSync(join(dir, 'base.raw'), new Uint8Array(2 * MiB).fill(9));
  const path = join(dir, 'top.qcow2');
  // 512-byte clusters: tables and data span several clusters; the backing file name must move.
  const created = await Qcow2Image.create(await TestFileIO.open(path, { create: true }), {
    size,
    clusterBytes: 512,
    backingFile: 'base.raw',
    backingFormat: 'raw',
    backing: null,
  });
  await created.write(MiB, new Uint8Array(5000).fill(1));
  await created.close();

  const io = new SnapshottingIO(await TestFileIO.open(path), path);
  const img = await Qcow2Image.open(io, { openBacking: backingOpener(dir) });
  let model: Model[] = [];
  const checks: { snap: string; phase: string; old: State; now: State }[] = [];
  const phase = async (name: string, op: () => Promise<void>, next: Model[]): Promise<void> => {
    const old = stateOf(model);
    const first = io.snapshots.length;
    io.armed = true;
    await op();
    io.armed = false;
    model = next;
    for (const snap of io.snapshots.slice(first)) checks.push({ snap, phase: name, old, now: stateOf(model) });
    t.ok(io.snapshots.length > first, `${name}: ${io.snapshots.length - first} crash points`);
  };
  const store = (items: Model[], inUse: boolean): Promise<void> =>
    img.storeBitmaps(
      items.map((m): BitmapToStore => ({ name: m.name, granularity: m.bits.granularity, bits: m.bits, enabled: m.auto })),
      { inUse },
    );
  const upsert = (items: Model[]): Model[] => [...model.map((m) => items.find((x) => x.name === m.name) ?? m), ...items.filter((x) => !model.some((m) => m.name === x.name))];

  const a1: Model = { name: 'a', inUse: false, auto: true, bits: bitmapWith(size, 512, [[0, 3 * MiB], [size - 1, 0]]) };
  const b1: Model = { name: 'b', inUse: false, auto: false, bits: bitmapWith(size, 4096, [[12345, 600000]]) };
  await phase('add the extension', () => store([a1, b1], false), [a1, b1]);
  const a2: Model = { name: 'a', inUse: false, auto: true, bits: bitmapWith(size, 1024, [[MiB, 1]]) };
  const c1: Model = { name: 'c', inUse: false, auto: true, bits: bitmapWith(size, 65536, [[0, size]]) };
  await phase('replace one, add one', () => store([a2, c1], false), upsert([a2, c1]));
  const b2: Model = { ...b1, inUse: true };
  await phase('store in use', () => store([b2], true), upsert([b2]));
  await phase('remove one', () => img.removeBitmaps(['a']), model.filter((m) => m.name !== 'a'));
  await phase('remove all', () => img.removeBitmaps(['b', 'c']), []);
  const d1: Model = { name: 'd', inUse: false, auto: true, bits: bitmapWith(size, 512, [[0, 1]]) };
  await phase('add the extension again', () => store([d1], false), [d1]);

  // The first write after an enabled bitmap was stored consistent marks it in use first.
  const guardFirst = io.snapshots.length;
  io.armed = true;
  await img.write(3 * MiB, new Uint8Array(4096).fill(7));
  d1.bits.set(3 * MiB, 4096);
  await img.flush();
  await img.write(0, new Uint8Array(512).fill(8)); // so that a crash point follows the first flush
  d1.bits.set(0, 512);
  await img.flush();
  io.armed = false;
  const guardSnaps = io.snapshots.slice(guardFirst);
  await img.close();

  let corrupt = 0;
  for (const c of checks) {
    const r = qemuCheck(c.snap);
    if (r['check-errors'] !== 0 || r.corruptions) corrupt++;
    const ro = await openTestImage(c.snap, { readOnly: true });
    const got = loaded(await ro.loadBitmaps());
    await ro.close();
    if (got !== c.old && got !== c.now) t.fail(`${c.phase}, ${c.snap}: ${got} is neither ${c.old} nor ${c.now}`);
    const qemuNames = qemuBitmaps(c.snap).map((b) => b.name);
    const shearNames = (JSON.parse(got) as [string][]).map((x) => x[0]);
    if (JSON.stringify(qemuNames) !== JSON.stringify(shearNames)) t.fail(`${c.phase}, ${c.snap}: QEMU lists ${qemuNames}, Shear ${shearNames}`);
  }
  t.equal(corrupt, 0, `no corruption at any of ${checks.length} crash points`);

  t.ok(guardSnaps.length > 0, 'the guest write left crash points');
  for (const snap of guardSnaps) {
    const ro = await openTestImage(snap, { readOnly: true });
    const [d] = await ro.loadBitmaps();
    const buf = new Uint8Array(1);
    await ro.read(3 * MiB, buf);
    await ro.close();
    if (buf[0] === 7 && !d!.flags.inUse) t.fail(`${snap}: the write reached the disk while the bitmap was still consistent`);
  }
  const final = await openTestImage(path, { readOnly: true });
  const [d] = await final.loadBitmaps();
  t.equal(d!.flags.inUse, true, 'after the write the bitmap is in use');
  await final.close();
  const r = qemuCheck(path);
  t.equal(r['check-errors'], 0);
  t.notOk(r.leaks, 'the closed image has no leaks');
});

t.test('an extension whose 24 bytes straddle a sector is switched with autoclear bit 0 cleared around the write', async (t) => {
  const dir = t.testdir();
  const size = MiB;
  const path = join(dir, 's.qcow2');
  // A backing format name of 485 bytes puts the extension's data at 1008..1031, across the sector boundary at 1024.
  const created = await Qcow2Image.create(await TestFileIO.open(path, { create: true }), { size, backingFile: 'b', backingFormat: 'f'.repeat(485), backing: null });
  const a1: BitmapToStore = { name: 'a', granularity: 65536, bits: bitmapWith(size, 65536, [[0, 1]]), enabled: false };
  await created.storeBitmaps([a1], { inUse: false });
  const ext = created.info.extensionTypes;
  await created.close();
  t.same(ext.slice(-1), [0x23852875]);

  const io = new SnapshottingIO(await TestFileIO.open(path), path);
  const img = await Qcow2Image.open(io, { backing: null });
  const a2: BitmapToStore = { ...a1, bits: bitmapWith(size, 65536, [[size - 1, 0]]) };
  io.armed = true;
  await img.storeBitmaps([a2], { inUse: false });
  io.armed = false;
  await img.close();
  const state = (bits: SharedBitmap | null): State => stateOf(bits ? [{ name: 'a', inUse: false, auto: false, bits }] : []);
  const seen = new Set<string>();
  for (const snap of io.snapshots) {
    const ro = await Qcow2Image.open(await TestFileIO.open(snap, { readOnly: true }), { readOnly: true, backing: null });
    const got = loaded(await ro.loadBitmaps());
    await ro.close();
    if (got === state(a1.bits)) seen.add('old');
    else if (got === state(null)) seen.add('none');
    else if (got === state(a2.bits)) seen.add('new');
    else t.fail(`${snap}: ${got}`);
  }
  t.same([...seen].sort(), ['new', 'none', 'old'], 'old, then none (bit 0 clear), then new: never a torn extension trusted');
  const ro = await Qcow2Image.open(await TestFileIO.open(path, { readOnly: true }), { readOnly: true, backing: null });
  t.equal(loaded(await ro.loadBitmaps()), state(a2.bits));
  await ro.close();
});
