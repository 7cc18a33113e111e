import t from 'tap';
import fc from 'fast-check';
import { existsSync, readFileSync, readdirSync, renameSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { SharedBitmap } from '@shear/bitmap';
import { loadSidecar, markSidecarInUse, removeFromSidecar, sidecarPath, storeSidecar, type SidecarBitmapToStore, type SidecarContents } from './index.js';

const MiB = 1024 * 1024;

function bitmapWith(size: number, g: number, ranges: readonly (readonly [number, number])[]): SharedBitmap {
  const bm = SharedBitmap.create(size, g);
  for (const [a, b] of ranges) {
    const offset = a % size;
    bm.set(offset, Math.min(size - offset, 1 + (b % (size - offset))));
  }
  return bm;
}

function same(a: SharedBitmap | null | undefined, b: SharedBitmap): boolean {
  if (!a || a.size !== b.size || a.granularity !== b.granularity) return false;
  const x = a.leafWords();
  const y = b.leafWords();
  return x.length === y.length && x.every((w, i) => w === y[i]);
}

function item(name: string, bits: SharedBitmap, enabled = true): SidecarBitmapToStore {
  return { name, granularity: bits.granularity, bits, enabled };
}

function image(dir: string, size: number, name = 'disk.raw'): string {
  const path = join(dir, name);
  writeFileSync(path, new Uint8Array(size));
  return path;
}

function summary(s: SidecarContents | null): unknown {
  return s?.bitmaps.map((b) => [b.name, b.granularity, b.enabled, b.inUse, b.inconsistent]);
}

t.test('bitmaps round-trip through the sidecar: any granularity, sizes not multiple of it', async (t) => {
  const dir = t.testdir();
  const size = 3 * MiB + 1536;
  const img = image(dir, size);
  t.equal(await loadSidecar(img), null, 'no sidecar yet');
  await fc.assert(
    fc.asyncProperty(
      fc.array(
        fc.record({
          g: fc.constantFrom(512, 4096, 65536, 2 * MiB, 2 ** 31),
          ranges: fc.array(fc.tuple(fc.nat(), fc.nat(2 * MiB)), { maxLength: 5 }),
          enabled: fc.boolean(),
        }),
        { minLength: 1, maxLength: 4 },
      ),
      async (specs) => {
        const items = specs.map((s, i) => item(`bm-${i}`, bitmapWith(size, s.g, s.ranges), s.enabled));
        await removeFromSidecar(img, ['bm-0', 'bm-1', 'bm-2', 'bm-3']);
        await storeSidecar(img, items, { inUse: false });
        const back = await loadSidecar(img);
        return (
          back !== null &&
          !back.imageChanged &&
          back.imageSize === size &&
          back.bitmaps.length === items.length &&
          items.every((it, i) => {
            const b = back.bitmaps[i]!;
            return b.name === it.name && b.granularity === it.granularity && b.enabled === it.enabled && !b.inUse && !b.inconsistent && same(b.bits, it.bits);
          })
        );
      },
    ),
    { numRuns: 30 },
  );
  t.same(readdirSync(dir).sort(), ['disk.raw', 'disk.raw.shear-bitmaps'], 'no temporary files are left behind');
});

t.test('stores add and replace by name, removes delete the file with the last record', async (t) => {
  const dir = t.testdir();
  const size = MiB;
  const img = image(dir, size);
  const a = bitmapWith(size, 65536, [[0, 1]]);
  const b = bitmapWith(size, 512, [[1000, 9000]]);
  await storeSidecar(img, [item('a', a), item('b', b, false)], { inUse: false });
  const a2 = bitmapWith(size, 4096, [[500000, 1]]);
  const c = SharedBitmap.create(size, 65536);
  await storeSidecar(img, [item('c', c), item('a', a2)], { inUse: false });
  const got = await loadSidecar(img);
  t.same(summary(got), [['a', 4096, true, false, false], ['b', 512, false, false, false], ['c', 65536, true, false, false]], 'replaced in place, added at the end');
  t.ok(same(got!.bitmaps[0]!.bits, a2) && same(got!.bitmaps[1]!.bits, b) && same(got!.bitmaps[2]!.bits, c));
  await removeFromSidecar(img, ['b', 'nope']);
  t.same(summary(await loadSidecar(img)), [['a', 4096, true, false, false], ['c', 65536, true, false, false]]);
  await removeFromSidecar(img, ['a', 'c']);
  t.notOk(existsSync(sidecarPath(img)), 'the sidecar is gone with its last bitmap');
  t.equal(await loadSidecar(img), null);
});

t.test('in_use: stored or marked in use, a bitmap is reported inconsistent without bits', async (t) => {
  const dir = t.testdir();
  const size = MiB;
  const img = image(dir, size);
  const a = bitmapWith(size, 65536, [[0, 1]]);
  await storeSidecar(img, [item('a', a), item('b', a, false)], { inUse: true });
  t.same(
    (await loadSidecar(img))!.bitmaps.map((b) => [b.name, b.inUse, b.inconsistent, b.bits]),
    [['a', true, true, null], ['b', true, true, null]],
  );
  await storeSidecar(img, [item('a', a), item('b', a, false)], { inUse: false });
  await markSidecarInUse(img, ['b']);
  t.same(summary(await loadSidecar(img)), [['a', 65536, true, false, false], ['b', 65536, false, true, true]]);
  await t.rejects(markSidecarInUse(img, ['zz']), { code: 'ERR_BITMAP_NOT_FOUND' });
  await markSidecarInUse(img);
  t.same((await loadSidecar(img))!.bitmaps.map((b) => b.inUse), [true, true], 'without names every bitmap is marked');
});

t.test('a change to the image behind the sidecar makes every bitmap inconsistent', async (t) => {
  const dir = t.testdir();
  const size = MiB;
  const img = image(dir, size);
  const a = bitmapWith(size, 65536, [[0, 1]]);
  await storeSidecar(img, [item('a', a), item('b', a)], { inUse: false });
  t.equal((await loadSidecar(img))!.imageChanged, false);
  utimesSync(img, new Date(2001, 1, 1), new Date(2001, 1, 1)); // another program wrote to the image
  const changed = await loadSidecar(img);
  t.equal(changed!.imageChanged, true);
  t.same(changed!.bitmaps.map((b) => [b.inUse, b.inconsistent, b.bits]), [[false, true, null], [false, true, null]]);
  t.equal((await loadSidecar(img, { checkImage: false }))!.bitmaps[0]!.inconsistent, false, 'checkImage: false trusts the flags alone');
  // Storing one bitmap again does not launder the other: carried over, it is marked in use.
  await storeSidecar(img, [item('a', a)], { inUse: false });
  t.same(summary(await loadSidecar(img)), [['a', 65536, true, false, false], ['b', 65536, true, true, true]]);
  // A different file of the same size and time (restored from elsewhere) is another image.
  writeFileSync(`${img}.new`, readFileSync(img));
  const before = statSync(img);
  renameSync(`${img}.new`, img);
  utimesSync(img, before.atime, before.mtime);
  t.equal((await loadSidecar(img))!.imageChanged, true, 'a new inode counts as a change');
  writeFileSync(img, new Uint8Array(size + 512));
  await t.rejects(storeSidecar(img, [item('a', a)], { inUse: false }), { code: 'ERR_BITMAP_SIZE_MISMATCH' });
});

t.test('any damage to the sidecar is detected, never loaded as other bitmaps', async (t) => {
  const dir = t.testdir();
  const size = 2 * MiB + 512;
  const img = image(dir, size);
  await storeSidecar(img, [item('alpha', bitmapWith(size, 512, [[1, 70000], [MiB, 3]])), item('beta', bitmapWith(size, 65536, [[0, size]]), false)], { inUse: false });
  const path = sidecarPath(img);
  const good = readFileSync(path);
  await fc.assert(
    fc.asyncProperty(fc.nat(good.length - 1), fc.integer({ min: 1, max: 255 }), async (at, xor) => {
      const bad = Buffer.from(good);
      bad[at]! ^= xor;
      writeFileSync(path, bad);
      try {
        await loadSidecar(img);
        return false;
      } catch (err) {
        return (err as { code?: string }).code === 'ERR_BITMAP_CORRUPT';
      }
    }),
    { numRuns: 300 },
  );
  for (const [what, bytes] of [
    ['truncated', good.subarray(0, good.length - 1)],
    ['trailing bytes', Buffer.concat([good, Buffer.alloc(8)])],
    ['empty', Buffer.alloc(0)],
  ] as const) {
    writeFileSync(path, bytes);
    await t.rejects(loadSidecar(img), { code: 'ERR_BITMAP_CORRUPT' }, what);
  }
  await t.rejects(storeSidecar(img, [item('x', SharedBitmap.create(size, 512))], { inUse: false }), { code: 'ERR_BITMAP_CORRUPT' }, 'a damaged sidecar is not overwritten silently');
  await t.rejects(markSidecarInUse(img), { code: 'ERR_BITMAP_CORRUPT' });
  writeFileSync(path, good);
  t.equal((await loadSidecar(img))!.bitmaps.length, 2, 'the intact file still loads');
});

t.test('bad arguments are refused before the sidecar changes', async (t) => {
  const dir = t.testdir();
  const size = MiB;
  const img = image(dir, size);
  const ok = SharedBitmap.create(size, 65536);
  await storeSidecar(img, [item('keep', ok)], { inUse: false });
  const before = readFileSync(sidecarPath(img));
  await t.rejects(storeSidecar(img, [item('a', SharedBitmap.create(size + 512, 65536))], { inUse: false }), { code: 'ERR_BITMAP_SIZE_MISMATCH' });
  await t.rejects(storeSidecar(img, [{ name: 'a', granularity: 512, bits: ok, enabled: true }], { inUse: false }), { code: 'ERR_BITMAP_GRANULARITY' });
  await t.rejects(storeSidecar(img, [item('a', SharedBitmap.create(size, 256))], { inUse: false }), { code: 'ERR_BITMAP_GRANULARITY' });
  await t.rejects(storeSidecar(img, [item('', ok)], { inUse: false }), { code: 'ERR_BITMAP_NAME' });
  await t.rejects(storeSidecar(img, [item('a', ok), item('a', ok)], { inUse: false }), { code: 'ERR_INVALID_ARGUMENT' });
  await t.rejects(storeSidecar(join(dir, 'missing.raw'), [item('a', ok)], { inUse: false }), { code: 'ERR_FILE_NOT_FOUND' });
  t.ok(readFileSync(sidecarPath(img)).equals(before), 'unchanged');
});

t.test('concurrent changes to one sidecar all land', async (t) => {
  const dir = t.testdir();
  const size = MiB;
  const img = image(dir, size);
  const names = Array.from({ length: 12 }, (_, i) => `n${i}`);
  await Promise.all(names.map((n, i) => storeSidecar(img, [item(n, bitmapWith(size, 65536, [[i * 65536, 1]]))], { inUse: false })));
  const got = await loadSidecar(img);
  t.same(got!.bitmaps.map((b) => b.name).sort(), [...names].sort());
  t.ok(got!.bitmaps.every((b) => b.bits!.countBits() === 1));
});

t.test('a temporary file left by a crash before the rename changes nothing', async (t) => {
  const dir = t.testdir();
  const size = MiB;
  const img = image(dir, size);
  const a = bitmapWith(size, 65536, [[0, 1]]);
  await storeSidecar(img, [item('a', a)], { inUse: false });
  writeFileSync(`${sidecarPath(img)}.tmp-1-deadbeef`, new Uint8Array(100).fill(0xee));
  const got = await loadSidecar(img);
  t.ok(same(got!.bitmaps[0]!.bits, a), 'the sidecar in place is the one read');
});
