import t from 'tap';
import { randomBytes } from 'node:crypto';
import * as fsSync from 'node:fs';
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { ShearError } from '@shear/base';
import { FileDriver, MemoryDriver, type BlockIO, type BlockStatusExtent } from '@shear/block';
import { fileMapping } from '../../block/src/drivers/file-mapping.js';
import { BlockCopy } from './block-copy.js';
import { CopyWorkerPool } from './pool.js';
import { RateLimiter } from './rate-limit.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** A sparse image: random data in some 64 KiB clusters, holes elsewhere. */
function makeImage(file: string, bytes: number, seed: number): Buffer {
  const content = Buffer.alloc(bytes);
  let x = seed;
  for (let c = 0; c < bytes / (64 * KiB); c++) {
    x = (x * 1103515245 + 12345) >>> 0;
    if (x % 3 !== 0) randomBytes(64 * KiB).copy(content, c * 64 * KiB);
  }
  writeFileSync(file, Buffer.alloc(0));
  // Write only the data clusters so the holes stay holes.
  const fd = fsSync.openSync(file, 'r+');
  try {
    fsSync.ftruncateSync(fd, bytes);
    for (let o = 0; o < bytes; o += 64 * KiB) {
      const piece = content.subarray(o, o + 64 * KiB);
      if (piece.some((b) => b !== 0)) fsSync.writeSync(fd, piece, 0, piece.length, o);
    }
  } finally {
    fsSync.closeSync(fd);
  }
  return content;
}

async function fileEndpoints(t: Tap, bytes: number, seed = 1) {
  const dir = t.testdir();
  const srcPath = path.join(dir, 'src.raw');
  const dstPath = path.join(dir, 'dst.raw');
  const content = makeImage(srcPath, bytes, seed);
  const src = await FileDriver.open(srcPath, { readOnly: true });
  const dst = await FileDriver.open(dstPath, { create: { size: bytes } });
  t.teardown(async () => {
    await src.close();
    await dst.close();
  });
  return {
    content,
    dstPath,
    source: { io: src as BlockIO, mapping: fileMapping(src) },
    target: { io: dst as BlockIO, mapping: fileMapping(dst) },
  };
}

type Tap = typeof t;

t.test('parallel copy on worker threads copies a sparse file exactly', async (t) => {
  const pool = new CopyWorkerPool({ workers: 2 });
  t.teardown(() => pool.destroy());
  const e = await fileEndpoints(t, 16 * MiB);
  const bc = new BlockCopy({ source: e.source, target: e.target, length: 16 * MiB, pool, maxChunkBytes: 1 * MiB, targetIsZero: true });
  bc.copyBitmap.set(0, 16 * MiB);
  let progressEvents = 0;
  bc.on('progress', () => progressEvents++);
  await bc.run();
  t.ok(readFileSync(e.dstPath).equals(e.content), 'target equals source');
  const p = bc.progress;
  t.equal(p.doneBytes, 16 * MiB);
  t.equal(p.totalBytes, 16 * MiB);
  t.ok(p.skippedBytes > 0 && p.copiedBytes > 0, `copied ${p.copiedBytes}, skipped ${p.skippedBytes} (holes)`);
  t.ok(progressEvents > 0);
  t.ok(bc.copyBitmap.isEmpty());
  const allocated = fsSync.statSync(e.dstPath).blocks * 512;
  t.ok(allocated <= p.copiedBytes + 64 * KiB, 'holes were not written on a fresh target');
});

t.test('inline mode copies between nodes that offer no host mapping', async (t) => {
  const src = new MemoryDriver({ length: 4 * MiB });
  const dst = new MemoryDriver({ length: 4 * MiB });
  const data = randomBytes(MiB);
  await src.write(MiB, data);
  await src.write(3 * MiB + 100, data.subarray(0, 1000));
  const bc = new BlockCopy({ source: { io: src }, target: { io: dst }, length: 4 * MiB, maxChunkBytes: 256 * KiB });
  bc.copyBitmap.set(0, 4 * MiB);
  await bc.run();
  const a = new Uint8Array(4 * MiB);
  const b = new Uint8Array(4 * MiB);
  await src.read(0, a);
  await dst.read(0, b);
  t.ok(Buffer.from(a).equals(Buffer.from(b)));
  t.equal(bc.progress.copiedBytes, MiB + 64 * KiB, 'only the data clusters were copied');
});

/** A source that fails reads of chosen clusters a given number of times, and counts concurrency. */
class FlakySource implements BlockIO {
  failures = new Map<number, number>();
  running = 0;
  maxRunning = 0;
  reads = 0;
  constructor(readonly inner: BlockIO, readonly gate?: () => Promise<void>) {}
  get length() { return this.inner.length; }
  async read(o: number, b: Uint8Array) {
    this.running++;
    this.maxRunning = Math.max(this.maxRunning, this.running);
    try {
      this.reads++;
      await this.gate?.();
      for (const [cluster, left] of this.failures) {
        if (left > 0 && o < (cluster + 1) * 64 * KiB && cluster * 64 * KiB < o + b.length) {
          this.failures.set(cluster, left - 1);
          throw new ShearError('ERR_IO', 'Cannot read: injected', { errno: 'EIO' });
        }
      }
      await this.inner.read(o, b);
    } finally {
      this.running--;
    }
  }
  write() { return Promise.reject(new Error('read-only')); }
  writeZeroes() { return Promise.reject(new Error('read-only')); }
  discard() { return Promise.reject(new Error('read-only')); }
  flush() { return Promise.resolve(); }
  async blockStatus(o: number, n: number): Promise<BlockStatusExtent[]> {
    return [{ offset: o, bytes: n, data: true, zero: false, allocated: true }];
  }
  async close() {}
}

async function filledMemory(bytes: number) {
  const m = new MemoryDriver({ length: bytes });
  await m.write(0, randomBytes(bytes));
  return m;
}

async function same(a: BlockIO, b: BlockIO, offset: number, bytes: number) {
  const x = new Uint8Array(bytes);
  const y = new Uint8Array(bytes);
  await a.read(offset, x);
  await b.read(offset, y);
  return Buffer.from(x).equals(Buffer.from(y));
}

t.test('a failing range is retried with back-off and then succeeds', async (t) => {
  const inner = await filledMemory(2 * MiB);
  const src = new FlakySource(inner);
  src.failures.set(5, 2); // cluster 5 fails twice
  const dst = new MemoryDriver({ length: 2 * MiB });
  const bc = new BlockCopy({ source: { io: src }, target: { io: dst }, length: 2 * MiB, maxChunkBytes: 128 * KiB, retryAttempts: 3, retryBackoffMs: 1 });
  bc.copyBitmap.set(0, 2 * MiB);
  const retries: number[] = [];
  bc.on('retry', (r: { attempt: number }) => retries.push(r.attempt));
  await bc.run();
  t.same(retries, [1, 2]);
  t.ok(await same(inner, dst, 0, 2 * MiB));
});

t.test('a range that keeps failing fails the copy and gives back exactly what was not copied', async (t) => {
  const inner = await filledMemory(4 * MiB);
  const src = new FlakySource(inner);
  src.failures.set(20, 100);
  const dst = new MemoryDriver({ length: 4 * MiB });
  const bc = new BlockCopy({ source: { io: src }, target: { io: dst }, length: 4 * MiB, maxChunkBytes: 256 * KiB, retryAttempts: 2, retryBackoffMs: 1, maxTasks: 1 });
  bc.copyBitmap.set(0, 4 * MiB);
  await t.rejects(bc.run(), { code: 'ERR_COPY_READ_FAILED', context: { errno: 'EIO' } });
  // Every cluster is either copied (equal on the target) or dirty again: none is lost.
  let lost = 0;
  for (let c = 0; c < 64; c++) {
    const dirty = bc.copyBitmap.get(c * 64 * KiB);
    if (!dirty && !(await same(inner, dst, c * 64 * KiB, 64 * KiB))) lost++;
  }
  t.equal(lost, 0, 'no cluster is both clean in the bitmap and missing from the target');
  t.ok(bc.copyBitmap.get(20 * 64 * KiB), 'the failing cluster is dirty again');
  t.equal(bc.inFlightTasks, 0);
});

t.test('cancelling stops at chunk boundaries and re-dirties every unfinished cluster', async (t) => {
  const pool = new CopyWorkerPool({ workers: 2 });
  t.teardown(() => pool.destroy());
  const e = await fileEndpoints(t, 32 * MiB, 7);
  const bc = new BlockCopy({ source: e.source, target: e.target, length: 32 * MiB, pool, maxChunkBytes: 512 * KiB, speed: 8 * MiB });
  bc.copyBitmap.set(0, 32 * MiB);
  const ac = new AbortController();
  bc.once('progress', () => ac.abort('test'));
  await t.rejects(bc.run({ signal: ac.signal }), { code: 'ERR_ABORTED' });
  t.equal(bc.inFlightTasks, 0, 'nothing left running');
  const dst = readFileSync(e.dstPath);
  let lost = 0;
  for (let c = 0; c < 32 * 16; c++) {
    const o = c * 64 * KiB;
    if (!bc.copyBitmap.get(o) && !dst.subarray(o, o + 64 * KiB).equals(e.content.subarray(o, o + 64 * KiB))) lost++;
  }
  t.equal(lost, 0, 'clean clusters are all on the target');
  t.ok(bc.copyBitmap.countBytes() > 0, 'the rest is dirty again');
  // And a second run finishes the job.
  bc.setSpeed(0);
  await bc.run();
  t.ok(readFileSync(e.dstPath).equals(e.content));
});

t.test('single-task mode runs one task at a time', async (t) => {
  const inner = await filledMemory(2 * MiB);
  const src = new FlakySource(inner);
  const dst = new MemoryDriver({ length: 2 * MiB });
  const bc = new BlockCopy({ source: { io: src }, target: { io: dst }, length: 2 * MiB, maxChunkBytes: 64 * KiB, singleTask: true });
  bc.copyBitmap.set(0, 2 * MiB);
  await bc.run();
  t.equal(src.maxRunning, 1);
  const par = new BlockCopy({ source: { io: src }, target: { io: dst }, length: 2 * MiB, maxChunkBytes: 64 * KiB, maxTasks: 4 });
  src.maxRunning = 0;
  par.copyBitmap.set(0, 2 * MiB);
  await par.run();
  t.ok(src.maxRunning > 1, `parallel mode ran ${src.maxRunning} at once`);
});

/** Reads wait at a gate the test opens one at a time, to force interleavings. */
function gated() {
  const waiting: (() => void)[] = [];
  let arrived: (() => void) | undefined;
  return {
    gate: () => new Promise<void>((resolve) => { waiting.push(resolve); arrived?.(); }),
    async nextArrival() { if (waiting.length === 0) await new Promise<void>((r) => (arrived = r)); },
    release() { waiting.shift()?.(); },
    get waiting() { return waiting.length; },
  };
}

t.test('copy-before-write goes ahead of queued background tasks and waits for a running one', async (t) => {
  const inner = await filledMemory(4 * MiB);
  const g = gated();
  const src = new FlakySource(inner, g.gate);
  const dst = new MemoryDriver({ length: 4 * MiB });
  const bc = new BlockCopy({ source: { io: src }, target: { io: dst }, length: 4 * MiB, maxChunkBytes: 64 * KiB, maxTasks: 1 });
  bc.copyBitmap.set(0, 4 * MiB);
  const order: number[] = [];
  const origRead = src.read.bind(src);
  src.read = async (o, b) => { order.push(o / (64 * KiB)); return origRead(o, b); };
  const run = bc.run();
  await g.nextArrival(); // background task for cluster 0 is running
  const cbwDone = bc.copyRange(40 * 64 * KiB, 2 * 64 * KiB);
  let cbwFinished = false;
  void cbwDone.then(() => (cbwFinished = true));
  // Copy-before-write of a range the running task covers waits for that task.
  const cbwOnRunning = bc.copyRange(100, 10);
  g.release(); // cluster 0 done
  await cbwOnRunning;
  t.equal(order[0], 0);
  await g.nextArrival();
  t.equal(order[1], 40, 'the copy-before-write cluster was next, ahead of clusters 1..39');
  g.release();
  await g.nextArrival();
  t.equal(order[2], 41);
  g.release();
  await cbwDone;
  t.ok(cbwFinished);
  t.ok(await same(inner, dst, 40 * 64 * KiB, 2 * 64 * KiB), 'the range is on the target when copyRange resolves');
  // Let the rest run.
  const drain = setInterval(() => { while (g.waiting) g.release(); }, 1);
  await run;
  clearInterval(drain);
  t.ok(await same(inner, dst, 0, 4 * MiB));
  t.equal(src.reads, 64, 'no cluster was copied twice');
});

t.test('discard drops clusters from what is left to copy, and they are never given back', async (t) => {
  const inner = await filledMemory(4 * MiB);
  const g = gated();
  const src = new FlakySource(inner, g.gate);
  const dst = new MemoryDriver({ length: 4 * MiB });
  const bc = new BlockCopy({ source: { io: src }, target: { io: dst }, length: 4 * MiB, maxChunkBytes: 64 * KiB, maxTasks: 1 });
  bc.copyBitmap.set(0, 4 * MiB);
  const run = bc.run();
  await g.nextArrival(); // cluster 0 running
  // Unaligned discard rounds inward: clusters 1..9 only.
  const dropped = bc.discard(64 * KiB - 1, 9 * 64 * KiB + 2);
  t.equal(dropped, 9 * 64 * KiB);
  // Discard the running task's cluster: it is cancelled and not given back.
  bc.discard(0, 64 * KiB);
  const drain = setInterval(() => { while (g.waiting) g.release(); }, 1);
  await run;
  clearInterval(drain);
  t.ok(bc.copyBitmap.isEmpty());
  const head = new Uint8Array(10 * 64 * KiB);
  await dst.read(0, head);
  t.ok(head.subarray(64 * KiB).every((b) => b === 0), 'discarded clusters were not copied');
  t.ok(await same(inner, dst, 10 * 64 * KiB, 4 * MiB - 10 * 64 * KiB), 'the rest was');
});

t.test('rate limiter: admits while not in debt, delays by the debt, changes speed live', async (t) => {
  const r = new RateLimiter();
  r.setSpeed(1000, 0);
  t.equal(r.take(500, 0), 0, 'a task bigger than the burst passes when not in debt');
  t.equal(r.take(500, 0), 500, 'then the bucket is 500 bytes in debt: half a second');
  t.equal(r.take(500, 500), 0, 'after the debt is paid it admits again');
  r.setSpeed(0, 500);
  t.equal(r.take(10 ** 9, 500), 0, 'unlimited');
  t.throws(() => r.setSpeed(-1), { code: 'ERR_INVALID_ARGUMENT' });
});

t.test('a worker thread that dies in the middle of a task: the range is retried on a new thread and nothing is lost', async (t) => {
  const pool = new CopyWorkerPool({ workers: 2 });
  t.teardown(() => pool.destroy());
  const e = await fileEndpoints(t, 8 * MiB, 3);
  const bc = new BlockCopy({ source: e.source, target: e.target, length: 8 * MiB, pool, maxChunkBytes: 2 * MiB, retryBackoffMs: 1, faultInjection: { killWorkerAfterBytes: 1, tasks: 2 } });
  bc.copyBitmap.set(0, 8 * MiB);
  const retries: string[] = [];
  bc.on('retry', (r: { error: { code: string } }) => retries.push(r.error.code));
  await bc.run();
  t.same(retries, ['ERR_COPY_WORKER_DIED', 'ERR_COPY_WORKER_DIED'], 'both deaths were seen and retried');
  t.ok(readFileSync(e.dstPath).equals(e.content), 'the copy is complete and exact');
  // Once the retries are spent, the copy fails cleanly and gives every cluster back.
  const e2 = await fileEndpoints(t, 4 * MiB, 4);
  const bc2 = new BlockCopy({ source: e2.source, target: e2.target, length: 4 * MiB, pool, maxChunkBytes: 4 * MiB, retryAttempts: 1, retryBackoffMs: 1, faultInjection: { killWorkerAfterBytes: 1, tasks: 5 } });
  bc2.copyBitmap.set(0, 4 * MiB);
  await t.rejects(bc2.run(), { code: 'ERR_COPY_WORKER_DIED' });
  t.equal(bc2.copyBitmap.countBytes(), 4 * MiB, 'every cluster is dirty again');
  t.equal(bc2.inFlightTasks, 0, 'nothing hangs');
});

t.test('scattered dirty clusters are copied in batches: far fewer worker requests, same bytes', async (t) => {
  const pool = new CopyWorkerPool({ workers: 2 });
  t.teardown(() => pool.destroy());
  let requests = 0;
  const run = pool.run.bind(pool);
  pool.run = (task) => {
    requests++;
    return run(task);
  };
  const e = await fileEndpoints(t, 32 * MiB, 8);
  const bc = new BlockCopy({ source: e.source, target: e.target, length: 32 * MiB, pool, maxChunkBytes: 4 * MiB });
  // Every third cluster dirty, as an incremental would have it.
  let dirty = 0;
  for (let c = 0; c < 512; c += 3) {
    bc.copyBitmap.set(c * 64 * KiB, 64 * KiB);
    dirty++;
  }
  await bc.run();
  const dst = readFileSync(e.dstPath);
  let wrong = 0;
  for (let c = 0; c < 512; c++) {
    const o = c * 64 * KiB;
    const want = c % 3 === 0 ? e.content.subarray(o, o + 64 * KiB) : Buffer.alloc(64 * KiB);
    if (!dst.subarray(o, o + 64 * KiB).equals(want)) wrong++;
  }
  t.equal(wrong, 0, 'the dirty clusters were copied, the clean ones left alone');
  t.ok(requests < dirty / 10, `${requests} worker requests for ${dirty} dirty clusters`);
  t.ok(bc.copyBitmap.isEmpty());
});

t.test('a zero-length copy finishes at once, even with "everything" set in its copy bitmap', async (t) => {
  const src = new MemoryDriver({ length: 0 });
  const dst = new MemoryDriver({ length: 0 });
  const bc = new BlockCopy({ source: { io: src }, target: { io: dst }, length: 0 });
  // What callers mean by "copy everything": the bitmap's single cluster lies past the end.
  bc.copyBitmap.set(0, 1);
  // Before the fix run() looped on resolved promises forever, starving this timer too.
  let timerRan = false;
  const timer = setTimeout(() => (timerRan = true), 0);
  await bc.run();
  clearTimeout(timer);
  t.equal(bc.progress.doneBytes, 0);
  t.equal(bc.inFlightTasks, 0);
  t.pass(`run() resolved (timer ran: ${timerRan})`);
});

t.test('a small copy-before-write copy between mapped files goes by copy_file_range, exactly and without reading the nodes', async (t) => {
  const pool = new CopyWorkerPool({ workers: 1 });
  t.teardown(() => pool.destroy());
  const e = await fileEndpoints(t, 4 * MiB, 7);
  // Reads and writes through the nodes are counted: the in-kernel path must not use them.
  let nodeIO = 0;
  const count = (io: BlockIO): BlockIO => ({
    get length() { return io.length; },
    read: (o, b) => { nodeIO++; return io.read(o, b); },
    write: (o, b, opts) => { nodeIO++; return io.write(o, b, opts); },
    writeZeroes: (o, n, opts) => io.writeZeroes(o, n, opts),
    discard: (o, n) => io.discard(o, n),
    flush: () => io.flush(),
    blockStatus: (o, n) => io.blockStatus(o, n),
    close: () => io.close(),
  });
  const bc = new BlockCopy({
    source: { io: count(e.source.io), mapping: e.source.mapping },
    target: { io: count(e.target.io), mapping: e.target.mapping },
    length: 4 * MiB, pool, maxChunkBytes: 1 * MiB,
  });
  bc.copyBitmap.set(0, 4 * MiB);
  // Every cluster's first write, unaligned ranges included, one after another and two at once.
  await bc.copyRange(5 * 64 * KiB + 100, 3 * 64 * KiB);
  await Promise.all([bc.copyRange(0, 1), bc.copyRange(30 * 64 * KiB, 64 * KiB)]);
  const dst = readFileSync(e.dstPath);
  for (const [o, b] of [[0, 64 * KiB], [5 * 64 * KiB, 4 * 64 * KiB], [30 * 64 * KiB, 64 * KiB]] as const) {
    t.ok(dst.subarray(o, o + b).equals(e.content.subarray(o, o + b)), `cluster range (${o}, ${b}) is on the target`);
  }
  t.equal(nodeIO, 0, 'no read or write went through the nodes');
  t.equal(bc.copyBitmap.nextDirtyArea(5 * 64 * KiB, 9 * 64 * KiB), null, 'the copied clusters left the copy bitmap');
  t.equal(bc.inFlightTasks, 0);
});

t.test('a copy-before-write copy between files on two filesystems (copy_file_range refuses: EXDEV) falls back to the nodes', async (t) => {
  const shm = '/dev/shm';
  if (!fsSync.existsSync(shm)) {
    t.skip('no /dev/shm (tmpfs) here to put the target on another filesystem');
    return;
  }
  const dir = t.testdir();
  const srcPath = path.join(dir, 'src.raw');
  const dstDir = fsSync.mkdtempSync(path.join(shm, 'shear-cbw-'));
  t.teardown(() => fsSync.rmSync(dstDir, { recursive: true, force: true }));
  const content = makeImage(srcPath, 1 * MiB, 3);
  const src = await FileDriver.open(srcPath, { readOnly: true });
  const dst = await FileDriver.open(path.join(dstDir, 'dst.raw'), { create: { size: 1 * MiB } });
  t.teardown(async () => {
    await src.close();
    await dst.close();
  });
  let nodeReads = 0;
  const source: BlockIO = {
    get length() { return src.length; },
    read: (o, b) => { nodeReads++; return src.read(o, b); },
    write: (o, b, opts) => src.write(o, b, opts),
    writeZeroes: (o, n, opts) => src.writeZeroes(o, n, opts),
    discard: (o, n) => src.discard(o, n),
    flush: () => src.flush(),
    blockStatus: (o, n) => src.blockStatus(o, n),
    close: async () => {},
  };
  const bc = new BlockCopy({ source: { io: source, mapping: fileMapping(src) }, target: { io: dst, mapping: fileMapping(dst) }, length: 1 * MiB });
  bc.copyBitmap.set(0, 1 * MiB);
  await bc.copyRange(0, 1 * MiB);
  t.ok(readFileSync(path.join(dstDir, 'dst.raw')).equals(content), 'the range is on the target');
  t.ok(nodeReads > 0, 'the data went through the nodes');
});
