import t, { type Test } from 'tap';
import fc from 'fast-check';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { SharedBitmap } from '@shear/bitmap';
import { requireTools } from '@shear/testkit';
import { Qcow2Image, type BitmapToStore, type StoredBitmap } from './index.js';
import { TestFileIO, openTestImage } from './test-file-io.fixture.js';
import { qemuCheck, qemuImg, qemuInfo, qemuIo } from './test-qemu.fixture.js';
import { bitmapWith, dirtyRuns, qemuBitmaps, qemuDirtyRuns, qemuInfoStderr, sameBits } from './bitmaps-qemu.fixture.js';

const KiB = 1024;
const MiB = 1024 * KiB;

function clean(t: Test, path: string, what = ''): void {
  const c = qemuCheck(path);
  t.equal(c['check-errors'], 0, `${what} no check errors`);
  t.notOk(c.corruptions, `${what} no corruptions`);
  t.notOk(c.leaks, `${what} no leaks`);
}

async function newImage(path: string, size: number, clusterBytes = 65536, extra: { backingFile?: string; backingFormat?: string } = {}): Promise<Qcow2Image> {
  const opts = { size, clusterBytes, ...extra, ...(extra.backingFile ? { backing: null } : {}) };
  const img = await Qcow2Image.create(await TestFileIO.open(path, { create: true }), opts);
  await img.write(0, new Uint8Array(3000).fill(5));
  return img;
}

async function loadRo(path: string): Promise<StoredBitmap[]> {
  const img = await openTestImage(path, { readOnly: true });
  try {
    return await img.loadBitmaps();
  } finally {
    await img.close();
  }
}

function toStore(name: string, bits: SharedBitmap, enabled = true): BitmapToStore {
  return { name, granularity: bits.granularity, bits, enabled };
}

t.test('Shear writes, Shear and QEMU read: granularities 512 B to 2 MiB, clusters 512 B to 2 MiB', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-nbd', 'nbdinfo')) return;
  const dir = t.testdir();
  const size = 10 * MiB + 1536; // a multiple of no granularity above 512
  for (const C of [512, 65536, 2 * MiB]) {
    const path = join(dir, `c${C}.qcow2`);
    const img = await newImage(path, size, C);
    const maps: BitmapToStore[] = [
      toStore('g512', bitmapWith(size, 512, [[0, 1], [3000, 70000], [2 * MiB, 2 * MiB + 5], [size - 1, 0]])),
      toStore('g4k', bitmapWith(size, 4096, [[4095, 2], [5 * MiB, 12345]]), false),
      toStore('g64k', bitmapWith(size, 65536, [[MiB, 1], [size - 600, 600]])),
      toStore('g2m', bitmapWith(size, 2 * MiB, [[7 * MiB, 1]]), false),
      toStore('empty', SharedBitmap.create(size, 65536)),
      toStore('full', bitmapWith(size, 512, [[0, size]])),
    ];
    await img.storeBitmaps(maps, { inUse: false });
    await img.close();

    const got = await loadRo(path);
    t.same(
      got.map((b) => [b.name, b.granularity, b.flags]),
      maps.map((m) => [m.name, m.granularity, { inUse: false, auto: m.enabled }]),
      `C=${C}: names, granularities, flags`,
    );
    for (const m of maps) t.ok(sameBits(got.find((b) => b.name === m.name)?.bits, m.bits), `C=${C} ${m.name}: Shear reads the bits back`);
    t.same(
      qemuBitmaps(path),
      maps.map((m) => ({ flags: m.enabled ? ['auto'] : [], name: m.name, granularity: m.granularity })),
      `C=${C}: qemu-img info lists them`,
    );
    t.equal(qemuInfoStderr(path), '', `C=${C}: no warnings`);
    clean(t, path, `C=${C}:`);
    for (const m of maps) t.same(qemuDirtyRuns(path, m.name), dirtyRuns(m.bits), `C=${C} ${m.name}: QEMU sees the same bits`);
  }
});

t.test('Shear writes and reads back any bitmap; replacing leaves no leaks', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const path = join(dir, 'p.qcow2');
  const size = 6 * MiB + 512 * 7;
  await (await newImage(path, size, 512)).close();
  const img = await openTestImage(path);
  await fc.assert(
    fc.asyncProperty(
      fc.constantFrom(512, 1024, 4096, 65536, 2 * MiB, 2 ** 31),
      fc.array(fc.tuple(fc.nat(), fc.nat(3 * MiB)), { maxLength: 6 }),
      fc.constantFrom('a', 'b', 'c'),
      fc.boolean(),
      async (g, ranges, name, enabled) => {
        const bits = bitmapWith(size, g, ranges);
        await img.storeBitmaps([toStore(name, bits, enabled)], { inUse: false });
        const back = (await img.loadBitmaps()).find((b) => b.name === name);
        return back !== undefined && back.flags.auto === enabled && sameBits(back.bits, bits);
      },
    ),
    { numRuns: 40 },
  );
  await img.close();
  clean(t, path);
});

t.test('QEMU writes, Shear reads the same bits', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo')) return;
  const dir = t.testdir();
  const path = join(dir, 'q.qcow2');
  const size = 12 * MiB + 1536;
  qemuImg('create', '-q', '-f', 'qcow2', path, String(size));
  qemuImg('bitmap', '--add', '-g', '512', path, 'g512');
  qemuImg('bitmap', '--add', '-g', '65536', path, 'g64k');
  qemuImg('bitmap', '--add', '-g', '2M', path, 'g2m');
  qemuImg('bitmap', '--add', path, 'frozen');
  const writes: [number, number][] = [[0, 4096], [MiB + 100, 70000], [3 * MiB, 4 * MiB], [size - 512, 512]];
  qemuIo(path, writes.slice(0, 1).map(([o, l]) => `write ${o} ${l}`));
  qemuImg('bitmap', '--disable', path, 'frozen');
  qemuIo(path, writes.slice(1).map(([o, l]) => `write ${o} ${l}`));

  const got = await loadRo(path);
  t.same(got.map((b) => [b.name, b.granularity, b.flags.auto, b.flags.inUse]), [
    ['g512', 512, true, false],
    ['g64k', 65536, true, false],
    ['g2m', 2 * MiB, true, false],
    ['frozen', 65536, false, false],
  ]);
  for (const b of got) {
    const model = SharedBitmap.create(size, b.granularity);
    for (const [o, l] of b.name === 'frozen' ? writes.slice(0, 1) : writes) model.set(o, l);
    t.ok(sameBits(b.bits, model), `${b.name}: the writes QEMU recorded`);
    t.same(dirtyRuns(b.bits!), qemuDirtyRuns(path, b.name), `${b.name}: as QEMU exports it`);
  }
});

t.test('QEMU keeps recording in a bitmap Shear stored; Shear reads QEMU\'s update', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = t.testdir();
  const path = join(dir, 'k.qcow2');
  const size = 4 * MiB;
  const img = await newImage(path, size);
  const live = bitmapWith(size, 4096, [[100, 10]]);
  const frozen = bitmapWith(size, 4096, [[MiB, 10]]);
  await img.storeBitmaps([toStore('live', live, true), toStore('frozen', frozen, false)], { inUse: false });
  await img.close();
  qemuIo(path, ['write 2M 8k']);
  live.set(2 * MiB, 8192);
  const got = await loadRo(path);
  t.ok(sameBits(got.find((b) => b.name === 'live')?.bits, live), 'the enabled bitmap gained the write');
  t.ok(sameBits(got.find((b) => b.name === 'frozen')?.bits, frozen), 'the disabled bitmap did not');
  clean(t, path);
});

t.test('store and remove cycles keep qemu-img check clean and the extension tidy', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const path = join(dir, 'r.qcow2');
  const size = 8 * MiB;
  const img = await newImage(path, size, 4096);
  await img.flush(); // the guest write's metadata, so that qemu-img check sees no leaks while the image is open
  const names = (): string[] => qemuBitmaps(path).map((b) => b.name);
  for (let round = 0; round < 3; round++) {
    await img.storeBitmaps([toStore('a', bitmapWith(size, 512, [[round * 1000, 5 * MiB]])), toStore('b', bitmapWith(size, 65536, [[round, 3]]))], { inUse: false });
    t.same(names(), ['a', 'b'], `round ${round}: stored`);
    clean(t, path, `round ${round} stored:`);
    await img.storeBitmaps([toStore('c', bitmapWith(size, 4096, [[0, size]])), toStore('a', SharedBitmap.create(size, 4096))], { inUse: false });
    t.same(names(), ['a', 'b', 'c'], `round ${round}: replaced in place, added at the end`);
    t.equal(qemuBitmaps(path)[0]!.granularity, 4096, 'the replacement has its own granularity');
    clean(t, path, `round ${round} replaced:`);
    await img.removeBitmaps(['b', 'nonexistent']);
    t.same(names(), ['a', 'c'], `round ${round}: removed one`);
    clean(t, path, `round ${round} removed one:`);
    await img.removeBitmaps(['a', 'c']);
    t.same(names(), [], `round ${round}: removed all`);
    t.equal(qemuInfoStderr(path), '', 'no warning: the extension is gone with autoclear bit 0');
    clean(t, path, `round ${round} removed all:`);
  }
  t.equal(img.info.extensionTypes.includes(0x23852875), false, 'the image no longer lists the extension');
  await img.close();
  const ro = await openTestImage(path, { readOnly: true });
  t.same(await ro.loadBitmaps(), []);
  await ro.close();
});

t.test('in_use: bitmaps stored in use are inconsistent for QEMU and Shear', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const path = join(dir, 'u.qcow2');
  const size = 4 * MiB;
  const img = await newImage(path, size);
  const bits = bitmapWith(size, 65536, [[0, 100]]);
  await img.storeBitmaps([toStore('x', bits), toStore('y', bits, false)], { inUse: true });
  await img.close();
  t.same(qemuBitmaps(path).map((b) => [b.name, b.flags]), [['x', ['in-use', 'auto']], ['y', ['in-use']]], 'qemu-img info: in-use');
  clean(t, path);
  const got = await loadRo(path);
  t.same(got.map((b) => [b.name, b.flags, b.bits]), [['x', { inUse: true, auto: true }, null], ['y', { inUse: true, auto: false }, null]], 'Shear: in use, no bits');
  // Bitmaps in use need no tracking: a plain writable open works and leaves them as they are.
  const rw = await openTestImage(path);
  await rw.write(0, new Uint8Array(10));
  await rw.close();
  t.same(qemuBitmaps(path).map((b) => b.flags), [['in-use', 'auto'], ['in-use']]);
  const fix = await openTestImage(path);
  await fix.storeBitmaps([toStore('x', bits)], { inUse: false });
  await fix.close();
  t.same(qemuBitmaps(path).map((b) => [b.name, b.flags]), [['x', ['auto']], ['y', ['in-use']]], 'storing again makes it consistent');
  clean(t, path);
});

t.test("enabledBitmaps 'take': loads, marks in use, and a crash before storing leaves them inconsistent", async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo')) return;
  const dir = t.testdir();
  const path = join(dir, 't.qcow2');
  const size = 4 * MiB;
  qemuImg('create', '-q', '-f', 'qcow2', path, String(size));
  qemuImg('bitmap', '--add', path, 'on');
  qemuImg('bitmap', '--add', '--disable', '-g', '4096', path, 'off');
  qemuIo(path, ['write 0 64k']);

  const ro = await openTestImage(path, { readOnly: true, enabledBitmaps: 'take' });
  t.same(ro.takenBitmaps, [], 'a read-only open takes nothing');
  await ro.close();

  const img = await openTestImage(path, { enabledBitmaps: 'take' });
  t.same(img.takenBitmaps.map((b) => [b.name, b.flags, b.bits?.countBits()]), [['on', { inUse: false, auto: true }, 1], ['off', { inUse: false, auto: false }, 0]]);
  t.same(qemuBitmaps(path).map((b) => b.flags), [['in-use', 'auto'], ['in-use']], 'both are in use on disk while Shear owns them');
  const copy = join(dir, 'crashed.qcow2');
  writeFileSync(copy, readFileSync(path)); // what a crash now would leave
  const on = img.takenBitmaps[0]!.bits!;
  await img.write(MiB, new Uint8Array(4096).fill(1));
  on.set(MiB, 4096); // the node layer records the write
  await img.storeBitmaps(
    img.takenBitmaps.map((b) => ({ name: b.name, granularity: b.granularity, bits: b.bits!, enabled: b.flags.auto })),
    { inUse: false },
  );
  await img.close();
  t.same(qemuBitmaps(path).map((b) => b.flags), [['auto'], []], 'stored cleanly: consistent again');
  t.same(qemuDirtyRuns(path, 'on'), [[0, 65536], [MiB, 65536]], 'QEMU sees the write Shear recorded');
  clean(t, path);

  t.same(qemuBitmaps(copy).map((b) => b.flags), [['in-use', 'auto'], ['in-use']], 'the crash copy: inconsistent for QEMU');
  t.same((await loadRo(copy)).map((b) => [b.flags.inUse, b.bits]), [[true, null], [true, null]], 'and for Shear');
  const again = await openTestImage(copy, { enabledBitmaps: 'take' });
  t.same(again.takenBitmaps.map((b) => b.flags.inUse), [true, true], 'taking an inconsistent bitmap does not make it consistent');
  await again.close();
});

t.test('markBitmapsInUse sets the flag in place', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const path = join(dir, 'm.qcow2');
  const size = 2 * MiB;
  const img = await newImage(path, size);
  await img.storeBitmaps([toStore('a', bitmapWith(size, 65536, [[0, 1]])), toStore('b', SharedBitmap.create(size, 65536), false)], { inUse: false });
  await img.markBitmapsInUse(['b']);
  t.same(qemuBitmaps(path).map((b) => b.flags), [['auto'], ['in-use']]);
  await t.rejects(img.markBitmapsInUse(['zzz']), { code: 'ERR_BITMAP_NOT_FOUND' });
  await img.markBitmapsInUse(['a', 'b']);
  t.same(qemuBitmaps(path).map((b) => b.flags), [['in-use', 'auto'], ['in-use']]);
  await img.close();
  clean(t, path);
});

t.test('bad arguments are refused before anything changes', async (t) => {
  const dir = t.testdir();
  const path = join(dir, 'e.qcow2');
  const size = 2 * MiB;
  const img = await newImage(path, size);
  const ok = SharedBitmap.create(size, 65536);
  const before = readFileSync(path);
  await t.rejects(img.storeBitmaps([toStore('a', SharedBitmap.create(size + 512, 65536))], { inUse: false }), { code: 'ERR_BITMAP_SIZE_MISMATCH' });
  await t.rejects(img.storeBitmaps([{ name: 'a', granularity: 4096, bits: ok, enabled: true }], { inUse: false }), { code: 'ERR_BITMAP_GRANULARITY' });
  await t.rejects(img.storeBitmaps([toStore('a', SharedBitmap.create(size, 256))], { inUse: false }), { code: 'ERR_BITMAP_GRANULARITY' });
  await t.rejects(img.storeBitmaps([toStore('a', SharedBitmap.create(size, 2 ** 32))], { inUse: false }), { code: 'ERR_BITMAP_GRANULARITY' });
  await t.rejects(img.storeBitmaps([toStore('', ok)], { inUse: false }), { code: 'ERR_BITMAP_NAME' });
  await t.rejects(img.storeBitmaps([toStore('x'.repeat(1024), ok)], { inUse: false }), { code: 'ERR_BITMAP_NAME' });
  await t.rejects(img.storeBitmaps([toStore('a', ok), toStore('a', ok)], { inUse: false }), { code: 'ERR_INVALID_ARGUMENT', message: /twice/ });
  t.ok(readFileSync(path).equals(before), 'the file is unchanged');
  await img.close();
  const ro = await openTestImage(path, { readOnly: true });
  await t.rejects(ro.storeBitmaps([toStore('a', ok)], { inUse: false }), { code: 'ERR_QCOW2_READ_ONLY' });
  await t.rejects(ro.removeBitmaps(['a']), { code: 'ERR_QCOW2_READ_ONLY' });
  await ro.close();
  await t.rejects(ro.loadBitmaps(), { code: 'ERR_QCOW2_CLOSED' });
});

t.test('adding the extension moves the backing file name out of the way', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  writeFileSync(join(dir, 'base.raw'), new Uint8Array(MiB).fill(3));
  const path = join(dir, 'top.qcow2');
  const size = 2 * MiB;
  const img = await newImage(path, size, 512, { backingFile: 'base.raw', backingFormat: 'raw' });
  await img.storeBitmaps([toStore('a', bitmapWith(size, 512, [[0, 1000]]))], { inUse: false });
  await img.close();
  const info = qemuInfo(path);
  t.equal(info['backing-filename'], 'base.raw');
  t.equal(info['backing-filename-format'], 'raw');
  t.same(qemuBitmaps(path).map((b) => b.name), ['a']);
  clean(t, path);
  const again = await openTestImage(path, { readOnly: true });
  t.equal(again.info.backingFile, 'base.raw');
  const b = new Uint8Array(4);
  await again.read(MiB - 2, b);
  t.same([...b], [3, 3, 0, 0], 'reads through the backing file');
  await again.close();

  // A name that fills the 512-byte header cluster leaves no room: refused, nothing changed.
  const tight = join(dir, 'tight.qcow2');
  const long = `${'d/'.repeat(170)}x`;
  const timg = await newImage(tight, size, 512, { backingFile: long, backingFormat: 'raw' });
  const before = readFileSync(tight);
  await t.rejects(timg.storeBitmaps([toStore('a', SharedBitmap.create(size, 512))], { inUse: false }), { code: 'ERR_NOT_IMPLEMENTED', message: /header cluster/ });
  await timg.close();
  t.equal(qemuInfo(tight)['backing-filename'], long);
  t.equal(before.subarray(0, 512).equals(readFileSync(tight).subarray(0, 512)), true, 'the header is unchanged');
});

t.test('an extension another writer left inconsistent is ignored, then replaced', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const path = join(dir, 'i.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', path, '4M');
  qemuImg('bitmap', '--add', path, 'old');
  const bytes = readFileSync(path);
  bytes[95] = bytes[95]! & ~1; // autoclear bit 0 cleared, as by a program without bitmap support
  writeFileSync(path, bytes);
  t.same(await loadRo(path), [], 'Shear ignores it, as QEMU does');
  const img = await openTestImage(path);
  const bits = bitmapWith(4 * MiB, 65536, [[0, 1]]);
  await img.storeBitmaps([toStore('new', bits)], { inUse: false });
  await img.close();
  t.same(qemuBitmaps(path).map((b) => b.name), ['new']);
  t.equal(qemuInfoStderr(path), '', 'no warning any more');
  const c = qemuCheck(path);
  t.equal(c['check-errors'], 0);
  t.notOk(c.corruptions, 'the old directory is leaked, never reused while referenced');
  t.ok(sameBits((await loadRo(path))[0]!.bits, bits));
});

t.test('after enabled bitmaps are stored consistent, the next change marks them in use first', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-nbd', 'nbdinfo')) return;
  const dir = t.testdir();
  const path = join(dir, 'g.qcow2');
  const size = 4 * MiB;
  const img = await newImage(path, size);
  const on = bitmapWith(size, 65536, [[0, 1]]);
  const off = SharedBitmap.create(size, 65536);
  await img.storeBitmaps([toStore('on', on, true), toStore('off', off, false)], { inUse: false });
  t.same(qemuBitmaps(path).map((b) => b.flags), [['auto'], []], 'consistent while nothing changes');
  await img.write(MiB, new Uint8Array(10));
  t.same(qemuBitmaps(path).map((b) => b.flags), [['in-use', 'auto'], []], 'the write marked the enabled one in use; the disabled one needs no tracking');

  // Disabled bitmaps stored consistent stay so across writes.
  await img.storeBitmaps([toStore('on', on, false)], { inUse: false });
  await img.discard(0, 65536);
  await img.writeZeroes(2 * MiB, 65536);
  t.same(qemuBitmaps(path).map((b) => b.flags), [[], []]);

  // A consistent store of an enabled bitmap waits for an outstanding write mapping.
  const m = await img.mapForWrite(3 * MiB, 4096);
  let stored = false;
  const storing = img.storeBitmaps([toStore('on', on, true)], { inUse: false }).then(() => (stored = true));
  for (let i = 0; i < 20; i++) await new Promise((resolve) => setImmediate(resolve));
  t.equal(stored, false, 'the store waits while the mapping is outstanding');
  on.set(3 * MiB, 4096);
  await img.commitMapping(m);
  await storing;
  t.same(qemuBitmaps(path).map((b) => b.flags), [['auto'], []], 'stored once the mapping was committed');
  t.same(qemuDirtyRuns(path, 'on'), dirtyRuns(on), 'QEMU sees the bits of the committed write');
  const m2 = await img.mapForWrite(0, 512);
  t.same(qemuBitmaps(path).map((b) => b.flags), [['in-use', 'auto'], []], 'a new mapping marks it in use before its data can land');
  await img.abortMapping(m2);
  await img.close();
  clean(t, path);
});

