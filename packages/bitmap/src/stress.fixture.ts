// Worker entry for the concurrency tests: waits at a shared gate so every worker starts
// hammering the same words at the same moment, then applies its list of operations.
import { parentPort, workerData } from 'node:worker_threads';
import { SharedBitmap, type BitmapHandle } from './index.js';

interface Job {
  handle: BitmapHandle;
  gate: SharedArrayBuffer;
  workers: number;
  ops: number[]; // triples: kind (1 set, 0 reset), offset, bytes
}

const job = workerData as Job;
const bitmap = SharedBitmap.attach(job.handle);
const gate = new Int32Array(job.gate);
Atomics.add(gate, 0, 1);
Atomics.notify(gate, 0);
while (Atomics.load(gate, 0) < job.workers) Atomics.wait(gate, 0, Atomics.load(gate, 0), 50);
const ops = job.ops;
for (let i = 0; i < ops.length; i += 3) {
  if (ops[i] === 1) bitmap.set(ops[i + 1]!, ops[i + 2]!);
  else bitmap.reset(ops[i + 1]!, ops[i + 2]!);
}
parentPort!.postMessage('done');
