// Sets random clusters in a shared bitmap as fast as it can, starting when every worker is
// ready, and reports how long its share took.
import { parentPort, workerData } from 'node:worker_threads';
import { performance } from 'node:perf_hooks';
import { SharedBitmap, type BitmapHandle } from '@shear/bitmap';

const { handle, gate, workers, ops, seed, clusterBytes } = workerData as {
  handle: BitmapHandle; gate: SharedArrayBuffer; workers: number; ops: number; seed: number; clusterBytes: number;
};
const bitmap = SharedBitmap.attach(handle);
const clusters = bitmap.size / clusterBytes;
const offsets = new Float64Array(ops);
let x = seed >>> 0 || 1;
for (let i = 0; i < ops; i++) {
  x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
  offsets[i] = (x % clusters) * clusterBytes;
}
const g = new Int32Array(gate);
Atomics.add(g, 0, 1);
while (Atomics.load(g, 0) < workers) Atomics.wait(g, 0, Atomics.load(g, 0), 10);
const t0 = performance.now();
for (let i = 0; i < ops; i++) bitmap.set(offsets[i]!, clusterBytes);
parentPort!.postMessage(performance.now() - t0);
