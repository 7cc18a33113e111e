import t from 'tap';
import fc from 'fast-check';
import { SharedBitmap } from '@shear/bitmap';
import { NodeBitmaps } from './node-bitmaps.js';
import { concludeBitmapSync, parseBitmapSyncMode, type BitmapSyncMode, type JobOutcome } from './sync-mode.js';

const G = 512;
const CLUSTERS = 256;
const SIZE = CLUSTERS * G;

function setOf(bm: SharedBitmap): Set<number> {
  const s = new Set<number>();
  for (const e of bm.dirtyExtents()) for (let o = e.offset; o < e.offset + e.bytes; o += G) s.add(o / G);
  return s;
}

/** What the bitmap must hold after the job, computed from sets (DESIGN.md, seed 004). */
function expected(mode: BitmapSyncMode, outcome: JobOutcome, initial: Set<number>, copied: Set<number>, written: Set<number>): Set<number> {
  const union = (...sets: Set<number>[]) => new Set(sets.flatMap((s) => [...s]));
  if (outcome === 'success') return mode === 'never' ? union(initial, written) : written;
  if (mode === 'always') return union(new Set([...initial].filter((c) => !copied.has(c))), written);
  return union(initial, written);
}

interface Scenario {
  initial: number[];
  copiedFraction: number;
  written: number[];
  mode: BitmapSyncMode;
  outcome: JobOutcome;
  recording: boolean;
}

/** Runs a job's bitmap lifecycle the way a backup job will: freeze, copy, write, conclude. */
function runJob(s: Scenario) {
  const node = new NodeBitmaps('disk0', SIZE);
  const bm = node.add({ name: 'b0', granularity: G, disabled: !s.recording });
  for (const c of s.initial) bm.bits.set(c * G, G);
  const initial = setOf(bm.bits);

  const successor = node.createSuccessor(bm);
  const copy = bm.bits.copy(); // the job's copy bitmap: what it still has to copy
  const during = { parentBusy: bm.busy, parentRecording: bm.recording, successorRecording: successor.recording, listed: node.list().length };

  // The job copies clusters in order and stops part-way unless it succeeds.
  const todo = [...initial].sort((a, b) => a - b);
  const stopAt = s.outcome === 'success' ? todo.length : Math.floor(todo.length * s.copiedFraction);
  const copied = new Set<number>();
  for (const c of todo.slice(0, stopAt)) {
    copy.reset(c * G, G);
    copied.add(c);
  }
  // Writes during the job reach the node's recording bitmaps.
  for (const c of s.written) node.markDirty(c * G, 1);
  const written = s.recording ? new Set(s.written) : new Set<number>();

  const result = concludeBitmapSync(node, bm, s.mode, s.outcome, copy);
  return { node, result, initial, copied, written, during };
}

const arbScenario: fc.Arbitrary<Scenario> = fc.record({
  initial: fc.array(fc.nat(CLUSTERS - 1), { maxLength: 120 }),
  copiedFraction: fc.double({ min: 0, max: 1, noNaN: true }),
  written: fc.array(fc.nat(CLUSTERS - 1), { maxLength: 40 }),
  mode: fc.constantFrom<BitmapSyncMode>('on-success', 'never', 'always'),
  outcome: fc.constantFrom<JobOutcome>('success', 'failure', 'cancel'),
  recording: fc.boolean(),
});

t.test('every sync mode and outcome leaves exactly the bits the model says', async (t) => {
  let runs = 0;
  fc.assert(
    fc.property(arbScenario, (s) => {
      runs++;
      const r = runJob(s);
      const want = expected(s.mode, s.outcome, r.initial, r.copied, r.written);
      const got = setOf(r.result.bits);
      if (got.size !== want.size || [...want].some((c) => !got.has(c))) return false;
      // The bitmap keeps its name, is free again, records as before, and the successor is gone.
      return (
        r.result.name === 'b0' &&
        !r.result.busy &&
        r.result.recording === s.recording &&
        r.node.list().length === 1 &&
        r.node.get('b0') === r.result &&
        r.during.parentBusy &&
        !r.during.parentRecording &&
        r.during.successorRecording === s.recording &&
        r.during.listed === 2
      );
    }),
    { numRuns: 500 },
  );
  t.ok(runs >= 500);
});

t.test("seed 004's example, scaled down: a failed 'always' backup leaves the uncopied third plus new writes", async (t) => {
  // 4 "TB" disk = 4096 clusters; 3 "TB" dirty; 2 "TB" copied before the failure.
  const clusters = 4096;
  const node = new NodeBitmaps('disk0', clusters * G);
  const bm = node.add({ name: 'inc', granularity: G });
  bm.bits.set(0, 3072 * G);
  node.createSuccessor(bm);
  const copy = bm.bits.copy();
  copy.reset(0, 2048 * G); // copied the first 2/3 of the dirty part, then failed
  node.markDirty(100 * G, G); // a write into the copied part
  node.markDirty(2500 * G, G); // into the uncopied part
  node.markDirty(4000 * G, 3 * G); // into the clean part
  const result = concludeBitmapSync(node, bm, 'always', 'failure', copy);
  t.equal(result.bits.countBits(), 1024 + 1 + 3, 'the uncopied 1024 clusters plus the 4 written ones');
  t.same([...result.bits.dirtyExtents()], [
    { offset: 100 * G, bytes: G },
    { offset: 2048 * G, bytes: 1024 * G },
    { offset: 4000 * G, bytes: 3 * G },
  ]);
  // The same failure under on-success keeps all 3072 plus the writes: the retry copies 3 "TB" again.
  const node2 = new NodeBitmaps('disk1', clusters * G);
  const bm2 = node2.add({ name: 'inc', granularity: G });
  bm2.bits.set(0, 3072 * G);
  node2.createSuccessor(bm2);
  const copy2 = bm2.bits.copy();
  copy2.reset(0, 2048 * G);
  node2.markDirty(4000 * G, 3 * G);
  t.equal(concludeBitmapSync(node2, bm2, 'on-success', 'failure', copy2).bits.countBits(), 3072 + 3);
});

t.test('a copy bitmap of another granularity merges into an always-mode failure', async (t) => {
  const node = new NodeBitmaps('disk0', 64 * 4096);
  const bm = node.add({ name: 'b', granularity: 4096 });
  bm.bits.set(0, 64 * 4096);
  node.createSuccessor(bm);
  const copy = SharedBitmap.create(64 * 4096, 65536); // block-copy clusters are bigger
  copy.set(65536, 65536);
  const result = concludeBitmapSync(node, bm, 'always', 'cancel', copy);
  t.same([...result.bits.dirtyExtents()], [{ offset: 65536, bytes: 65536 }]);
});

t.test('parseBitmapSyncMode accepts QEMU names and the conditional alias', async (t) => {
  t.equal(parseBitmapSyncMode('conditional'), 'on-success');
  t.equal(parseBitmapSyncMode('on-success'), 'on-success');
  t.equal(parseBitmapSyncMode('never'), 'never');
  t.equal(parseBitmapSyncMode('always'), 'always');
  t.throws(() => parseBitmapSyncMode('sometimes'), { code: 'ERR_BITMAP_SYNC_MODE' });
});
