import t from 'tap';
import fc from 'fast-check';
import { runBlockIOConformance } from '@shear/testkit';
import { MemoryDriver } from './memory.js';

const KiB = 1024;
const TiB = 1024 ** 4;

void runBlockIOConformance(t, 'memory', {
  open: async (_t, length) => new MemoryDriver({ length }),
  persistsData: true,
  discardReadsZero: true,
});

void runBlockIOConformance(t, 'memory, 4 KiB chunks', {
  open: async (_t, length) => new MemoryDriver({ length, chunkBytes: 4 * KiB }),
  persistsData: true,
  discardReadsZero: true,
});

t.test('a huge node costs nothing until written, and block status skips the gaps', async (t) => {
  const io = new MemoryDriver({ length: TiB + 123 });
  t.equal(io.storedBytes, 0);
  await io.write(TiB / 2, new Uint8Array([1, 2, 3]));
  await io.write(TiB + 100, new Uint8Array(23).fill(9));
  t.equal(io.storedBytes, 64 * KiB + (TiB + 123 - (TiB + 100 - ((TiB + 100) % (64 * KiB)))), 'two chunks, the last one short');
  const extents = await io.blockStatus(0, io.length);
  t.same(
    extents.map((e) => [e.offset, e.bytes, e.data, e.zero]),
    [
      [0, TiB / 2, false, true],
      [TiB / 2, 64 * KiB, true, false],
      [TiB / 2 + 64 * KiB, TiB - (TiB / 2 + 64 * KiB), false, true],
      [TiB, 123, true, false],
    ],
  );
  const back = new Uint8Array(3);
  await io.read(TiB / 2, back);
  t.same([...back], [1, 2, 3]);
  await io.close();
});

t.test('status flags: unwritten, written, zeroed without and with unmap', async (t) => {
  const io = new MemoryDriver({ length: 4 * 64 * KiB });
  const c = 64 * KiB;
  await io.write(c, new Uint8Array(c).fill(1));
  await io.write(2 * c, new Uint8Array(c).fill(1));
  await io.write(3 * c, new Uint8Array(c).fill(1));
  await io.writeZeroes(2 * c, c); // stays allocated: data + zero
  await io.writeZeroes(3 * c, c, { mayUnmap: true }); // dropped: a hole again
  t.same(
    (await io.blockStatus(0, 4 * c)).map((e) => [e.offset, e.bytes, e.data, e.zero, e.allocated]),
    [
      [0, c, false, true, true],
      [c, c, true, false, true],
      [2 * c, c, true, true, true],
      [3 * c, c, false, true, true],
    ],
  );
  t.equal(io.storedBytes, c, 'only the written chunk holds memory');
  await io.discard(c + 10, c - 10);
  const buf = new Uint8Array(c);
  await io.read(c, buf);
  t.equal(buf.findIndex((b, i) => (i < 10 ? b !== 1 : b !== 0)), -1, 'partial discard zeroes its part only');
  await io.close();
});

t.test('property: any sequence of writes, zeroes and discards reads back like a flat array', async (t) => {
  const length = 300 * KiB + 7;
  const op = fc.record({
    kind: fc.constantFrom('write', 'zeroes', 'zeroes-unmap', 'discard'),
    offset: fc.nat({ max: length - 1 }),
    bytes: fc.integer({ min: 1, max: 140 * KiB }),
    fill: fc.integer({ min: 1, max: 255 }),
  });
  await fc.assert(
    fc.asyncProperty(fc.array(op, { maxLength: 30 }), fc.constantFrom(1 * KiB, 4 * KiB, 64 * KiB), async (ops, chunkBytes) => {
      const io = new MemoryDriver({ length, chunkBytes });
      const model = new Uint8Array(length);
      for (const o of ops) {
        const bytes = Math.min(o.bytes, length - o.offset);
        if (o.kind === 'write') {
          const buf = new Uint8Array(bytes).fill(o.fill);
          await io.write(o.offset, buf);
          model.set(buf, o.offset);
        } else {
          if (o.kind === 'discard') await io.discard(o.offset, bytes);
          else await io.writeZeroes(o.offset, bytes, { mayUnmap: o.kind === 'zeroes-unmap' });
          model.fill(0, o.offset, o.offset + bytes);
        }
      }
      const all = new Uint8Array(length);
      await io.read(0, all);
      if (Buffer.compare(all, model) !== 0) return false;
      // every extent flagged zero reads zero, every data=false extent reads zero
      for (const e of await io.blockStatus(0, length)) {
        if ((e.zero || !e.data) && model.subarray(e.offset, e.offset + e.bytes).some((b) => b !== 0)) return false;
      }
      return true;
    }),
    { numRuns: 150 },
  );
  t.pass('property held');
});

t.test('options are checked', async (t) => {
  t.throws(() => new MemoryDriver({ length: -1 }), { code: 'ERR_INVALID_ARGUMENT' });
  t.throws(() => new MemoryDriver({ length: 10, chunkBytes: 1000 }), { code: 'ERR_INVALID_ARGUMENT' });
  const io = new MemoryDriver({ length: 0 });
  t.same(await io.blockStatus(0, 0), []);
  await io.close();
  await t.rejects(io.read(0, new Uint8Array(0)), { code: 'ERR_CLOSED' });
});
