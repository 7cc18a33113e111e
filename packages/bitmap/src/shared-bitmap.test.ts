import t from 'tap';
import fc from 'fast-check';
import { SharedBitmap } from './shared-bitmap.js';
import { NaiveBitmap } from './naive-bitmap.fixture.js';

// Bit counts at and around word (32) and summary-level (1024, 32768) boundaries.
const BIT_COUNTS = [1, 2, 31, 32, 33, 63, 64, 65, 1023, 1024, 1025, 2047, 32767, 32768, 32769, 40000];
const GRANULARITIES = [1, 512, 4096, 65536];

/** A bit index biased toward boundaries where bugs live. */
function arbBit(bits: number): fc.Arbitrary<number> {
  const near = (b: number) => fc.integer({ min: -2, max: 2 }).map((d) => Math.min(bits - 1, Math.max(0, b + d)));
  return fc.oneof(
    fc.integer({ min: 0, max: bits - 1 }),
    fc.constantFrom(0, bits - 1).chain(near),
    fc.integer({ min: 0, max: Math.floor((bits - 1) / 32) }).chain((w) => near(w * 32)),
    fc.integer({ min: 0, max: Math.floor((bits - 1) / 1024) }).chain((w) => near(w * 1024)),
  );
}

interface Geometry {
  bits: number;
  granularity: number;
  size: number;
}

const arbGeometry: fc.Arbitrary<Geometry> = fc
  .record({ bits: fc.constantFrom(...BIT_COUNTS), granularity: fc.constantFrom(...GRANULARITIES), partial: fc.boolean() })
  .map(({ bits, granularity, partial }) => ({
    bits,
    granularity,
    // A size that ends inside the last granule exercises the partial tail.
    size: bits * granularity - (partial && granularity > 1 ? Math.floor(granularity / 2) : 0),
  }));

type Op =
  | { op: 'set'; offset: number; bytes: number }
  | { op: 'reset'; offset: number; bytes: number }
  | { op: 'clear' }
  | { op: 'merge'; ranges: [number, number][]; coarser: boolean };

function arbByteRange(g: Geometry, aligned: boolean): fc.Arbitrary<[number, number]> {
  return fc.tuple(arbBit(g.bits), arbBit(g.bits), fc.nat(g.granularity - 1), fc.nat(g.granularity - 1)).map(([a, b, da, db]) => {
    const lo = Math.min(a, b);
    const hi = Math.max(a, b);
    if (aligned) {
      const offset = lo * g.granularity;
      const end = Math.min(g.size, (hi + 1) * g.granularity);
      return [offset, end - offset];
    }
    const offset = Math.min(g.size - 1, lo * g.granularity + da);
    const end = Math.min(g.size, Math.max(offset + 1, hi * g.granularity + db));
    return [offset, end - offset];
  });
}

function arbOps(g: Geometry): fc.Arbitrary<Op[]> {
  const op: fc.Arbitrary<Op> = fc.oneof(
    { weight: 5, arbitrary: arbByteRange(g, false).map(([offset, bytes]) => ({ op: 'set' as const, offset, bytes })) },
    { weight: 4, arbitrary: arbByteRange(g, true).map(([offset, bytes]) => ({ op: 'reset' as const, offset, bytes })) },
    { weight: 1, arbitrary: fc.constant({ op: 'clear' as const }) },
    {
      weight: 2,
      arbitrary: fc.record({ ranges: fc.array(arbByteRange(g, false), { maxLength: 4 }), coarser: fc.boolean() }).map((r) => ({ op: 'merge' as const, ...r })),
    },
  );
  return fc.array(op, { minLength: 1, maxLength: 25 });
}

function apply(bm: SharedBitmap, model: NaiveBitmap, o: Op): void {
  switch (o.op) {
    case 'set':
      bm.set(o.offset, o.bytes);
      model.set(o.offset, o.bytes);
      return;
    case 'reset':
      bm.reset(o.offset, o.bytes);
      model.reset(o.offset, o.bytes);
      return;
    case 'clear':
      bm.clear();
      model.reset(0, model.size);
      return;
    case 'merge': {
      // Merge from a source of the same size, at the same or a coarser granularity.
      const g = o.coarser ? bm.granularity * 4 : bm.granularity;
      const src = SharedBitmap.create(bm.size, g);
      const srcModel = new NaiveBitmap(bm.size, g);
      for (const [offset, bytes] of o.ranges) {
        src.set(offset, bytes);
        srcModel.set(offset, bytes);
      }
      bm.merge(src);
      model.merge(srcModel);
      return;
    }
  }
}

function sameAsModel(t: Tap.Test, bm: SharedBitmap, model: NaiveBitmap, probes: number[]): boolean {
  const invariant = bm.checkInvariants();
  if (invariant) return t.fail(invariant);
  if (bm.countBits() !== model.count()) return t.fail(`count ${bm.countBits()} != ${model.count()}`);
  for (let i = 0; i < model.bits.length; i++) {
    if (bm.get(i * bm.granularity) !== (model.bits[i] === 1)) return t.fail(`bit ${i} differs`);
  }
  for (const p of probes) {
    const offset = Math.min(p, bm.size - 1);
    const bytes = bm.size - offset;
    if (bm.nextDirty(offset, bytes) !== model.nextDirty(offset, bytes)) return t.fail(`nextDirty(${offset})`);
    if (bm.nextClear(offset, bytes) !== model.nextClear(offset, bytes)) return t.fail(`nextClear(${offset})`);
    const max = 1 + (p % (5 * bm.granularity));
    const a = bm.nextDirtyArea(offset, bm.size, max);
    const b = model.nextDirtyArea(offset, bm.size, max);
    if (JSON.stringify(a) !== JSON.stringify(b)) return t.fail(`nextDirtyArea(${offset}, max ${max}): ${JSON.stringify(a)} != ${JSON.stringify(b)}`);
  }
  const extents = [...bm.dirtyExtents()];
  let covered = 0;
  for (const e of extents) covered += e.bytes;
  let modelCovered = 0;
  for (let i = 0; i < model.bits.length; i++) if (model.bits[i]) modelCovered += Math.min(bm.granularity, bm.size - i * bm.granularity);
  if (covered !== modelCovered) return t.fail(`extents cover ${covered} bytes, model ${modelCovered}`);
  return true;
}

declare namespace Tap {
  type Test = { fail(msg: string): boolean };
}

t.test('SharedBitmap matches the naive model under random operation sequences', async (t) => {
  let runs = 0;
  fc.assert(
    fc.property(
      arbGeometry.chain((g) => fc.tuple(fc.constant(g), arbOps(g), fc.array(fc.nat(g.size - 1), { minLength: 3, maxLength: 6 }), fc.boolean())),
      ([g, ops, probes, shared]) => {
        runs++;
        const bm = SharedBitmap.create(g.size, g.granularity);
        // A bitmap whose handle was taken uses the atomic paths; one never handed out the plain ones.
        if (shared) void bm.handle;
        const model = new NaiveBitmap(g.size, g.granularity);
        for (const o of ops) apply(bm, model, o);
        const silent = { fail: (m: string) => { throw new Error(m); } };
        return sameAsModel(silent, bm, model, probes);
      },
    ),
    { numRuns: 400 },
  );
  t.ok(runs >= 400, `ran ${runs} sequences`);
});

t.test('taking the handle marks a bitmap shared, in every view and for good', async (t) => {
  const bm = SharedBitmap.create(1 << 20, 512);
  t.equal(bm.shared, false, 'a new bitmap is not shared');
  t.equal(bm.copy().shared, false, 'nor is a copy');
  const attached = SharedBitmap.attach(bm.handle);
  t.equal(bm.shared, true, 'the handle marks it');
  t.equal(attached.shared, true, 'an attached view sees the mark');
  bm.set(0, 4096);
  bm.clear();
  t.equal(attached.shared, true, 'clear does not unmark it');
});

t.test('merge and clear give the same bits, count and summaries on the plain and the atomic paths', async (t) => {
  const size = 40_000 * 512;
  fc.assert(
    fc.property(fc.array(fc.nat(39_999), { maxLength: 3000 }), fc.array(fc.nat(39_999), { maxLength: 3000 }), (a, b) => {
      const plain = SharedBitmap.create(size, 512);
      const atomic = SharedBitmap.create(size, 512);
      void atomic.handle;
      const src = SharedBitmap.create(size, 512);
      for (const bit of a) { plain.set(bit * 512, 1); atomic.set(bit * 512, 1); }
      for (const bit of b) src.set(bit * 512, 1);
      plain.merge(src);
      atomic.merge(src);
      const same = plain.checkInvariants() === null && atomic.checkInvariants() === null && plain.countBits() === atomic.countBits()
        && Buffer.compare(Buffer.from(plain.leafWords().slice().buffer), Buffer.from(atomic.leafWords().slice().buffer)) === 0;
      plain.clear();
      atomic.clear();
      return same && plain.countBits() === 0 && plain.checkInvariants() === null && atomic.checkInvariants() === null;
    }),
    { numRuns: 60 },
  );
  t.pass('60 random pairs agree');
});

t.test('copy, copyFrom and attach share or duplicate exactly as documented', async (t) => {
  const bm = SharedBitmap.create(100_000, 512);
  bm.set(0, 1);
  bm.set(50_000, 7000);
  const copy = bm.copy();
  t.same([...copy.dirtyExtents()], [...bm.dirtyExtents()]);
  t.equal(copy.countBits(), bm.countBits());
  copy.set(99_999, 1);
  t.equal(bm.get(99_999), false, 'a copy does not share words');
  const attached = SharedBitmap.attach(bm.handle);
  attached.set(99_999, 1);
  t.equal(bm.get(99_999), true, 'an attached handle shares words');
  t.equal(bm.countBits(), attached.countBits());
  const other = SharedBitmap.create(100_000, 512);
  other.set(10, 10);
  bm.copyFrom(other);
  t.same([...bm.dirtyExtents()], [{ offset: 0, bytes: 512 }], 'whole granules');
  t.equal(bm.checkInvariants(), null);
});

t.test('argument errors name the problem and change nothing', async (t) => {
  t.throws(() => SharedBitmap.create(1000, 3), { code: 'ERR_BITMAP_GRANULARITY' });
  t.throws(() => SharedBitmap.create(0, 512), { code: 'ERR_INVALID_ARGUMENT' });
  const bm = SharedBitmap.create(4096, 512);
  bm.set(0, 4096);
  t.throws(() => bm.reset(1, 512), { code: 'ERR_INVALID_ARGUMENT' }, 'unaligned reset');
  t.throws(() => bm.set(4000, 200), { code: 'ERR_OUT_OF_BOUNDS' });
  t.throws(() => bm.set(-1, 2), { code: 'ERR_INVALID_ARGUMENT' });
  t.throws(() => bm.merge(SharedBitmap.create(8192, 512)), { code: 'ERR_BITMAP_SIZE_MISMATCH' });
  t.throws(() => SharedBitmap.attach({ buffer: new SharedArrayBuffer(64) }), { code: 'ERR_BITMAP_CORRUPT' });
  t.equal(bm.countBits(), 8, 'no failed call changed a bit');
  bm.reset(3584, 512);
  t.equal(bm.countBits(), 7);
  // A range that ends at size may end inside the last granule.
  const odd = SharedBitmap.create(1000, 512);
  odd.set(999, 1);
  odd.reset(512, 488);
  t.equal(odd.countBits(), 0);
});

t.test('searches on a huge sparse bitmap use the summaries', async (t) => {
  const TiB = 2 ** 40;
  const bm = SharedBitmap.create(64 * TiB, 65536);
  t.equal(bm.nextDirty(0), -1);
  bm.set(64 * TiB - 65536, 1);
  t.equal(bm.nextDirty(0), 64 * TiB - 65536);
  t.same(bm.nextDirtyArea(0, bm.size, 1 << 20), { offset: 64 * TiB - 65536, bytes: 65536 });
  t.equal(bm.countBytes(), 65536);
  bm.set(12345 * 65536 * 33, 3 * 65536);
  t.same([...bm.dirtyExtents()].length, 2);
  bm.clear();
  t.equal(bm.nextDirty(0), -1);
  t.equal(bm.checkInvariants(), null);
});
