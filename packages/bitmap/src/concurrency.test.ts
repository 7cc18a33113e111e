import t from 'tap';
import { Worker } from 'node:worker_threads';
import { SharedBitmap } from './shared-bitmap.js';
import { NaiveBitmap } from './naive-bitmap.fixture.js';

const G = 512;
const BITS = 70_000; // > 2 summary levels, so summary races are exercised too
const SIZE = BITS * G;

function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = Math.imul(a ^ (a >>> 15), 1 | a);
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x;
    return ((x ^ (x >>> 14)) >>> 0) / 2 ** 32;
  };
}

async function runWorkers(bitmap: SharedBitmap, opLists: number[][]): Promise<void> {
  const gate = new SharedArrayBuffer(4);
  const workers = opLists.map(
    (ops) => new Worker(new URL('./stress.fixture.ts', import.meta.url), { workerData: { handle: bitmap.handle, gate, workers: opLists.length, ops } }),
  );
  try {
    await Promise.all(
      workers.map((w) => new Promise<void>((resolve, reject) => {
        w.once('message', () => resolve());
        w.once('error', reject);
      })),
    );
  } finally {
    await Promise.all(workers.map((w) => w.terminate()));
  }
}

/** Random ranges of up to `maxBits` granules; resets are granule-aligned. */
function randomOps(seed: number, n: number, kind: 'set' | 'reset' | 'mixed', maxBits: number, filter?: (bit: number) => boolean): number[] {
  const r = rng(seed);
  const ops: number[] = [];
  while (ops.length < n * 3) {
    const first = Math.floor(r() * BITS);
    const count = 1 + Math.floor(r() * maxBits);
    const bits = Math.min(count, BITS - first);
    if (filter && !filter(first)) continue;
    const isSet = kind === 'set' || (kind === 'mixed' && r() < 0.5);
    ops.push(isSet ? 1 : 0, first * G, bits * G);
  }
  return ops;
}

function applyToModel(model: NaiveBitmap, ops: number[]): void {
  for (let i = 0; i < ops.length; i += 3) {
    if (ops[i] === 1) model.set(ops[i + 1]!, ops[i + 2]!);
    else model.reset(ops[i + 1]!, ops[i + 2]!);
  }
}

function compare(t: Tap.Test, bitmap: SharedBitmap, model: NaiveBitmap): void {
  t.equal(bitmap.checkInvariants(), null, 'summaries and count agree with the words');
  t.equal(bitmap.countBits(), model.count(), 'count equals the model');
  let diffs = 0;
  for (let i = 0; i < BITS; i++) if (bitmap.get(i * G) !== (model.bits[i] === 1)) diffs++;
  t.equal(diffs, 0, 'every bit equals the model');
}

declare namespace Tap {
  type Test = { equal(a: unknown, b: unknown, m?: string): void };
}

t.test('two workers setting and resetting their own granules inside shared words lose no update', async (t) => {
  // Worker 0 owns even granules, worker 1 odd ones: every word is contended, but each bit's
  // final value is decided by one worker's program order, so the result is deterministic.
  const bitmap = SharedBitmap.create(SIZE, G);
  const lists = [0, 1].map((parity) => randomOps(100 + parity, 150_000, 'mixed', 1, (b) => b % 2 === parity));
  await runWorkers(bitmap, lists);
  const model = new NaiveBitmap(SIZE, G);
  for (const ops of lists) applyToModel(model, ops);
  compare(t, bitmap, model);
});

t.test('two workers setting overlapping ranges, then resetting overlapping ranges, end at the model', async (t) => {
  const bitmap = SharedBitmap.create(SIZE, G);
  const sets = [0, 1].map((w) => randomOps(200 + w, 20_000, 'set', 200));
  await runWorkers(bitmap, sets);
  const model = new NaiveBitmap(SIZE, G);
  for (const ops of sets) applyToModel(model, ops);
  compare(t, bitmap, model);
  const resets = [0, 1].map((w) => randomOps(300 + w, 20_000, 'reset', 150));
  await runWorkers(bitmap, resets);
  for (const ops of resets) applyToModel(model, ops);
  compare(t, bitmap, model);
});

t.test('mixed overlapping sets and resets from two workers keep the summaries and count exact', async (t) => {
  // The final value of a bit touched by both kinds depends on timing; bits only ever set must
  // be set, bits only ever reset must be clear, and the structure must stay consistent.
  const bitmap = SharedBitmap.create(SIZE, G);
  const lists = [0, 1].map((w) => randomOps(400 + w, 30_000, 'mixed', 64));
  await runWorkers(bitmap, lists);
  t.equal(bitmap.checkInvariants(), null, 'summaries and count agree with the words');
  const everSet = new NaiveBitmap(SIZE, G);
  const everReset = new NaiveBitmap(SIZE, G);
  for (const ops of lists) {
    for (let i = 0; i < ops.length; i += 3) (ops[i] === 1 ? everSet : everReset).set(ops[i + 1]!, ops[i + 2]!);
  }
  let wrong = 0;
  for (let i = 0; i < BITS; i++) {
    const s = everSet.bits[i] === 1;
    const r = everReset.bits[i] === 1;
    const v = bitmap.get(i * G);
    if ((s && !r && !v) || (!s && v)) wrong++;
  }
  t.equal(wrong, 0, 'no bit differs from what every interleaving allows');
  // A full scan through the summaries finds exactly the set bits.
  let found = 0;
  for (const e of bitmap.dirtyExtents()) found += e.bytes / G;
  t.equal(found, bitmap.countBits(), 'search through the summaries finds every set bit');
});
