// npm run bench -- bitmap
// The bitmap layer against a naive flat bitmap (one Int32Array of bits, plain loops: what one
// writes without summary levels or Atomics), measured in the same process.
import { Worker } from 'node:worker_threads';
import { SharedBitmap } from '@shear/bitmap';
import { getBitmapKernels } from '@shear/native';
import { machineFacts, printMachineFacts } from './lib/machine.js';
import { median, timePerCall, timeRuns } from './lib/measure.js';
import { printTable, writeResults, type Row } from './lib/report.js';

const TiB = 2 ** 40;
const G = 65536;
const RUNS = Number(process.env['BENCH_RUNS'] ?? 7);

function rng(seed: number) {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    return x / 2 ** 32;
  };
}

/** Fills both a SharedBitmap and a naive word array with the same random clusters. */
function filled(size: number, fraction: number, seed: number) {
  const shared = SharedBitmap.create(size, G);
  const clusters = size / G;
  const naive = new Int32Array(Math.ceil(clusters / 32));
  const r = rng(seed);
  const n = Math.round(clusters * fraction);
  if (fraction >= 0.5) {
    for (let w = 0; w < naive.length; w++) naive[w] = (r() * 2 ** 32) | 0;
  } else {
    for (let i = 0; i < n; i++) {
      const c = Math.floor(r() * clusters);
      naive[c >>> 5]! |= 1 << (c & 31);
    }
  }
  // The shared bitmap gets exactly the naive bits, through its loader.
  return { shared: SharedBitmap.fromLeafWords(size, G, naive), naive };
}

function naiveMerge(dst: Int32Array, src: Int32Array): void {
  for (let i = 0; i < src.length; i++) dst[i]! |= src[i]!;
}
function naiveCount(words: Int32Array): number {
  let c = 0;
  for (let i = 0; i < words.length; i++) {
    let v = words[i]!;
    v = v - ((v >>> 1) & 0x55555555);
    v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
    c += Math.imul((v + (v >>> 4)) & 0x0f0f0f0f, 0x01010101) >>> 24;
  }
  return c;
}
function naiveNextDirty(words: Int32Array, fromBit: number): number {
  for (let w = Math.floor(fromBit / 32); w < words.length; w++) {
    const v = words[w]!;
    if (v !== 0) return w * 32 + (31 - Math.clz32(v & -v));
  }
  return -1;
}

const rows: Row[] = [];
function row(op: string, ours: number, naive: number, extra: Row = {}) {
  rows.push({ operation: op, 'shear ms (median)': ours, 'naive ms (median)': naive, 'speedup x': naive / ours, ...extra });
}

async function benchMerge(label: string, fraction: number, sharedTarget = false) {
  const src = filled(TiB, fraction, 42);
  // Targets are existing (memory already touched) bitmaps, emptied before each run, as a
  // merge target in a running daemon would be; first-touch page faults would otherwise
  // dominate both sides.
  const dst = SharedBitmap.create(TiB, G);
  // A target handed to another thread takes the atomic path (an Atomics.or per changed word);
  // one that never was, the plain word-wide pass (see SharedBitmap's class comment).
  if (sharedTarget) void dst.handle;
  dst.set(0, TiB);
  const naiveDst = new Int32Array(src.naive.length).fill(-1);
  const ours = await timeRuns(() => dst.merge(src.shared), { runs: RUNS, setup: () => dst.clear() });
  const naive = await timeRuns(() => naiveMerge(naiveDst, src.naive), { runs: RUNS, setup: () => naiveDst.fill(0) });
  if (dst.countBits() !== naiveCount(naiveDst)) throw new Error('merge results differ');
  const bitmapMiB = (src.naive.length * 4) / 2 ** 20;
  row(`merge 1 TiB @64K, ${label}`, median(ours), median(naive), { 'shear bitmap MiB/s': bitmapMiB / (median(ours) / 1000) });
}

/** QEMU's measurement in seed 003: two full bitmaps of a 1 TiB disk at 64 KiB. */
async function benchFullIntoFull() {
  const a = SharedBitmap.create(TiB, G);
  const b = SharedBitmap.create(TiB, G);
  a.set(0, TiB);
  b.set(0, TiB);
  const na = new Int32Array(TiB / G / 32).fill(-1);
  const nb = new Int32Array(TiB / G / 32).fill(-1);
  const ours = await timeRuns(() => b.merge(a), { runs: RUNS });
  const naive = await timeRuns(() => naiveMerge(nb, na), { runs: RUNS });
  row('merge 1 TiB @64K, both full (seed 003)', median(ours), median(naive), { 'shear bitmap MiB/s': (na.length * 4) / 2 ** 20 / (median(ours) / 1000) });
}

/** One measurement: `workers` threads each doing `opsPerWorker` random sets at once; sets/s. */
async function setRate(workers: number, opsPerWorker: number, seed: number): Promise<number> {
  const bitmap = SharedBitmap.create(TiB, G);
  const gate = new SharedArrayBuffer(4);
  const url = new URL('./lib/bitmap-set-worker.js', import.meta.url);
  const ws = Array.from({ length: workers }, (_, i) => new Worker(url, { workerData: { handle: bitmap.handle, gate, workers, ops: opsPerWorker, seed: seed + i * 1000, clusterBytes: G } }));
  try {
    const times = await Promise.all(ws.map((w) => new Promise<number>((res, rej) => { w.once('message', res); w.once('error', rej); })));
    if (bitmap.checkInvariants() !== null) throw new Error('bitmap inconsistent after concurrent sets');
    return (workers * opsPerWorker) / (Math.max(...times) / 1000);
  } finally {
    await Promise.all(ws.map((w) => w.terminate()));
  }
}

/**
 * 1 and 2 workers measured alternately, so that drift in what the shared machine gives us
 * hits both; the ratio is the median of the per-pair ratios.
 */
async function benchSetScaling(opsPerWorker: number) {
  const one: number[] = [];
  const two: number[] = [];
  const ratios: number[] = [];
  for (let run = 0; run < Math.max(5, RUNS); run++) {
    one.push(await setRate(1, opsPerWorker, 7 + run));
    two.push(await setRate(2, opsPerWorker, 7 + run));
    ratios.push(two.at(-1)! / one.at(-1)!);
  }
  return { one: median(one), two: median(two), ratio: median(ratios) };
}

async function main() {
  const facts = machineFacts();
  printMachineFacts(facts);
  console.log(`runs per measurement: ${RUNS} (BENCH_RUNS to change); bitmaps cover 1 TiB at 64 KiB (16 Mi bits, 2 MiB) unless noted\n`);

  await benchMerge('empty source', 0);
  await benchMerge('sparse source (0.1% dirty)', 0.001);
  await benchMerge('dense source (50% dirty)', 0.5);
  await benchMerge('dense source, target shared with workers', 0.5, true);
  await benchFullIntoFull();

  const dense = filled(TiB, 0.5, 9);
  row('count, 50% dirty', timePerCall(() => dense.shared.countBits()), timePerCall(() => naiveCount(dense.naive), 20));

  const huge = SharedBitmap.create(64 * TiB, G);
  const hugeNaive = new Int32Array(Math.ceil((64 * TiB) / G / 32));
  row('next-dirty, empty 64 TiB', timePerCall(() => huge.nextDirty(0)), timePerCall(() => naiveNextDirty(hugeNaive, 0), 200));
  const last = 64 * TiB - 5 * G;
  huge.set(last, 1);
  hugeNaive[Math.floor(last / G / 32)]! |= 1 << ((last / G) % 32);
  if (huge.nextDirty(0) !== last || naiveNextDirty(hugeNaive, 0) * G !== last) throw new Error('next-dirty results differ');
  row('next-dirty, 64 TiB, one bit near the end', timePerCall(() => huge.nextDirty(0)), timePerCall(() => naiveNextDirty(hugeNaive, 0), 200));

  printTable(rows);
  console.log(`bitmap kernels: ${getBitmapKernels().kind} (SHEAR_NATIVE=0 for the plain-JS ones)`);

  const scaling = await benchSetScaling(2_000_000);
  const setRows: Row[] = [
    { workers: '1', 'random cluster sets/s (median)': scaling.one, 'vs 1 worker x (median of pairs)': 1 },
    { workers: '2', 'random cluster sets/s (median)': scaling.two, 'vs 1 worker x (median of pairs)': scaling.ratio },
  ];
  console.log('\nset throughput: random single-cluster sets into one shared 1 TiB bitmap');
  printTable(setRows);
  const file = writeResults('bitmap', { machine: facts, runs: RUNS, rows, setScaling: setRows });
  console.log(`\nresults: ${file}`);
}

await main();
