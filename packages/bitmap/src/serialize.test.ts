import t from 'tap';
import fc from 'fast-check';
import { SharedBitmap } from './shared-bitmap.js';
import { deserializeBitmap, serializeBitmap } from './serialize.js';

function randomBitmap(size: number, g: number, ranges: [number, number][]): SharedBitmap {
  const bm = SharedBitmap.create(size, g);
  for (const [a, b] of ranges) {
    const offset = a % size;
    bm.set(offset, Math.min(size - offset, 1 + (b % (size - offset))));
  }
  return bm;
}

const arbBitmap = fc
  .record({
    bits: fc.constantFrom(1, 31, 32, 33, 1024, 1025, 5000),
    g: fc.constantFrom(1, 512, 65536),
    tail: fc.nat(511),
    ranges: fc.array(fc.tuple(fc.nat(), fc.nat()), { maxLength: 8 }),
  })
  .map(({ bits, g, tail, ranges }) => {
    const size = Math.max(1, bits * g - (tail % g));
    return randomBitmap(size, g, ranges);
  });

t.test('serialised form round-trips exactly', async (t) => {
  fc.assert(
    fc.property(arbBitmap, (bm) => {
      const back = deserializeBitmap(serializeBitmap(bm));
      return (
        back.size === bm.size &&
        back.granularity === bm.granularity &&
        back.countBits() === bm.countBits() &&
        back.checkInvariants() === null &&
        JSON.stringify([...back.dirtyExtents()]) === JSON.stringify([...bm.dirtyExtents()])
      );
    }),
    { numRuns: 200 },
  );
  t.pass('200 bitmaps round-tripped');
});

t.test('serialised form is little-endian words with the documented header', async (t) => {
  const bm = SharedBitmap.create(64 * 512, 512);
  bm.set(0, 1);
  bm.set(33 * 512, 512);
  const data = Buffer.from(serializeBitmap(bm));
  t.equal(data.subarray(0, 8).toString('latin1'), 'SHEARBM\0');
  t.equal(data.readUInt32LE(12), 9, 'log2 granularity');
  t.equal(data.readBigUInt64LE(16), BigInt(64 * 512), 'size');
  t.equal(data.readBigUInt64LE(24), 2n, 'count');
  t.equal(data.readBigUInt64LE(32), 2n, 'words');
  t.equal(data.readUInt32LE(40), 1, 'word 0 = bit 0');
  t.equal(data.readUInt32LE(44), 2, 'word 1 = bit 33');
  t.equal(data.length, 40 + 8 + 4);
});

t.test('any damage to the serialised form is rejected, never loaded as another bitmap', async (t) => {
  const bm = randomBitmap(100_000, 512, [[1, 900], [40_000, 20_000], [99_000, 5000]]);
  const good = serializeBitmap(bm);
  fc.assert(
    fc.property(fc.nat(good.length - 1), fc.integer({ min: 1, max: 255 }), (at, xor) => {
      const bad = Uint8Array.from(good);
      bad[at]! ^= xor;
      try {
        deserializeBitmap(bad);
        return false;
      } catch (err) {
        return (err as { code?: string }).code === 'ERR_BITMAP_CORRUPT';
      }
    }),
    { numRuns: 300 },
  );
  t.throws(() => deserializeBitmap(good.subarray(0, good.length - 1)), { code: 'ERR_BITMAP_CORRUPT' }, 'truncated');
  t.throws(() => deserializeBitmap(new Uint8Array(10)), { code: 'ERR_BITMAP_CORRUPT' }, 'too short');
  const longer = new Uint8Array(good.length + 4);
  longer.set(good);
  t.throws(() => deserializeBitmap(longer), { code: 'ERR_BITMAP_CORRUPT' }, 'trailing bytes');
});
