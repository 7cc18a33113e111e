import t from 'tap';
import fc from 'fast-check';
import { SharedBitmap } from '@shear/bitmap';
import { clusterImage, wordsFromData } from './bitmaps-data.js';
import {
  BITMAP_AUTO,
  BITMAP_IN_USE,
  decodeTableEntry,
  encodeBitmapsExt,
  encodeEntry,
  encodeTableEntry,
  parseBitmapsExt,
  parseDirectory,
  tableEntriesFor,
} from './bitmaps-format.js';

/** The model: bit n of the bitmap is bit n % 8 of byte n / 8 (the spec's bit_offset formula). */
function qcowBytes(bm: SharedBitmap): Uint8Array {
  const out = new Uint8Array(Math.ceil(bm.bits / 8));
  for (let n = 0; n < bm.bits; n++) if (bm.get(n * bm.granularity)) out[n >> 3]! |= 1 << (n & 7);
  return out;
}

t.test('cluster images hold the spec bit order, with zero and all-ones clusters recognised', async (t) => {
  fc.assert(
    fc.property(
      fc.constantFrom(512, 1024),
      fc.integer({ min: 1, max: 20000 }),
      fc.array(fc.tuple(fc.nat(), fc.nat(9000)), { maxLength: 6 }),
      fc.boolean(),
      (C, bits, ranges, fill) => {
        const bm = SharedBitmap.create(bits * 512 - 100, 512);
        if (fill) bm.set(0, bm.size);
        for (const [a, b] of ranges) {
          const off = (a % bits) * 512;
          bm.set(off, Math.min(bm.size - off, b * 512 + 1));
        }
        const model = qcowBytes(bm);
        const data = new Uint8Array(Math.ceil(bits / 32) * 4 + C);
        const n = Math.ceil(model.length / C);
        for (let k = 0; k < n; k++) {
          const img = clusterImage(bm.leafWords(), k, C, bm.bits);
          const want = model.subarray(k * C, Math.min(model.length, (k + 1) * C));
          if (img.kind === 'zeroes') {
            if (want.some((x) => x !== 0)) return false;
          } else if (img.kind === 'ones') {
            if (want.length !== C || want.some((x) => x !== 0xff)) return false;
          } else {
            if (!Buffer.from(img.bytes.subarray(0, want.length)).equals(want)) return false;
            if (img.bytes.subarray(want.length).some((x) => x !== 0)) return false;
            data.set(img.bytes, k * C);
          }
          if (img.kind === 'ones') data.fill(0xff, k * C, (k + 1) * C);
        }
        const back = SharedBitmap.fromLeafWords(bm.size, 512, wordsFromData(data, bm.bits));
        return back.leafWords().every((w, i) => w === bm.leafWords()[i]);
      },
    ),
    { numRuns: 150 },
  );
  t.pass('150 bitmaps encoded and decoded');
});

t.test('tail bits past the end are dropped on load', async (t) => {
  const data = new Uint8Array(8).fill(0xff);
  const words = wordsFromData(data, 37);
  t.same([...words], [-1, 0x1f]);
  t.same([...wordsFromData(new Uint8Array(4).fill(0xff), 31)], [0x7fffffff]);
});

t.test('directory entries and the extension round-trip; damaged ones are refused', async (t) => {
  const C = 65536;
  const disk = 10 * 1024 * 1024;
  const a = encodeEntry({ tableOffset: 3 * C, tableSize: 1, flags: BITMAP_AUTO, granularityBits: 16, name: 'first' });
  const b = encodeEntry({ tableOffset: 9 * C, tableSize: 1, flags: BITMAP_IN_USE, granularityBits: 9, name: 'é'.repeat(20) });
  t.equal(a.length % 8, 0, 'entries are padded to 8 bytes');
  const dir = new Uint8Array(a.length + b.length);
  dir.set(a);
  dir.set(b, a.length);
  const entries = parseDirectory(dir, 2, C, disk);
  t.same(
    entries.map((e) => [e.name, e.tableOffset, e.tableSize, e.flags, e.granularityBits, e.at]),
    [
      ['first', 3 * C, 1, BITMAP_AUTO, 16, 0],
      ['é'.repeat(20), 9 * C, 1, BITMAP_IN_USE, 9, a.length],
    ],
  );
  t.same(parseBitmapsExt(encodeBitmapsExt({ count: 2, directoryBytes: dir.length, directoryOffset: 5 * C })), { count: 2, directoryBytes: dir.length, directoryOffset: 5 * C });
  t.throws(() => parseDirectory(dir, 3, C, disk), { code: 'ERR_QCOW2_CORRUPT' }, 'count mismatch');
  t.throws(() => parseDirectory(dir, 1, C, disk), { code: 'ERR_QCOW2_CORRUPT' }, 'more entries than announced');
  t.throws(() => parseDirectory(dir.subarray(0, dir.length - 8), 2, C, disk), { code: 'ERR_QCOW2_CORRUPT' }, 'truncated');
  const twice = new Uint8Array(a.length * 2);
  twice.set(a);
  twice.set(a, a.length);
  t.throws(() => parseDirectory(twice, 2, C, disk), { code: 'ERR_QCOW2_CORRUPT', message: /twice/ });
  const patched = (at: number, v: number): Uint8Array => {
    const x = Uint8Array.from(a);
    x[at] = v;
    return x;
  };
  t.throws(() => parseDirectory(patched(15, 0x0a), 1, C, disk), { message: /reserved flags/ });
  t.throws(() => parseDirectory(patched(16, 2), 1, C, disk), { message: /unknown type/ });
  t.throws(() => parseDirectory(patched(17, 8), 1, C, disk), { code: 'ERR_NOT_IMPLEMENTED' });
  t.throws(() => parseDirectory(patched(7, 1), 1, C, disk), { message: /unaligned/ });
  t.throws(() => parseDirectory(patched(17, 9), 1, C, 2 ** 40), { message: /too small/ }, 'a table too small for the disk');
  t.equal(tableEntriesFor(disk, 9, 512), 5, '20480 bits = 2560 bytes = 5 clusters of 512');
});

t.test('bitmap table entries: zeroes, ones, data; reserved bits refused', async (t) => {
  const C = 512;
  const v = new DataView(new ArrayBuffer(32));
  encodeTableEntry(v, 0, { kind: 'zeroes' });
  encodeTableEntry(v, 1, { kind: 'ones' });
  encodeTableEntry(v, 2, { kind: 'data', offset: 2 ** 40 + 7 * C });
  t.same(decodeTableEntry(v, 0, C, 'x'), { kind: 'zeroes' });
  t.same(decodeTableEntry(v, 1, C, 'x'), { kind: 'ones' });
  t.same(decodeTableEntry(v, 2, C, 'x'), { kind: 'data', offset: 2 ** 40 + 7 * C });
  v.setUint32(3 * 8 + 4, 0x200 | 1);
  t.throws(() => decodeTableEntry(v, 3, C, 'x'), { message: /both an offset and the all-ones flag/ });
  v.setUint32(3 * 8 + 4, 2);
  t.throws(() => decodeTableEntry(v, 3, C, 'x'), { message: /reserved bits/ });
  v.setUint32(3 * 8 + 4, 0);
  v.setUint32(3 * 8, 0x01000000);
  t.throws(() => decodeTableEntry(v, 3, C, 'x'), { message: /reserved bits/ });
  v.setUint32(3 * 8, 0);
  v.setUint32(3 * 8 + 4, 0x400);
  t.throws(() => decodeTableEntry(v, 3, 2048, 'x'), { message: /unaligned/ });
});
