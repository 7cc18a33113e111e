import { promisify } from 'node:util';
import { deflateRaw } from 'node:zlib';
import { ShearError, fromWire } from '@shear/base';
import type { BlockIO, BlockStatusExtent, HostExtent, HostMappable, WriteMapping } from '@shear/block';
import { getNative } from '@shear/native';
import type { CopyWorkerPool } from './pool.js';
import type { CopyTaskMessage } from './protocol.js';
import type { StatusWindow } from './status-window.js';

/** One side of a copy: the node's I/O, and direct host access when the node offers it. */
export interface CopyEndpoint {
  io: BlockIO;
  mapping?: HostMappable | undefined;
}

export interface ExecuteContext {
  source: CopyEndpoint;
  target: CopyEndpoint;
  /** Absent: the coordinator moves the bytes itself (inline mode, or unmappable nodes). */
  pool?: CopyWorkerPool | undefined;
  chunkBytes: number;
  dropCache: boolean;
  /** Workers may copy file-to-file pieces with copy_file_range (see CopyTaskMessage). */
  inKernelCopy: boolean;
  /** The source's block status by windows (background copies of one run); absent: ask per range. */
  statusWindow?: StatusWindow | undefined;
  /** sync=top: ranges the source does not allocate itself are left out. */
  skipUnallocated: boolean;
  /** The target already reads as zeroes (freshly created): zero ranges need no write at all. */
  targetIsZero: boolean;
  cancel: Int32Array;
  cancelIndex: number;
  /** Aborted with the cancel word: ends waits inside the target's writes (inline copies). */
  signal?: AbortSignal | undefined;
  /** Store whole clusters deflated (qcow2 compressed clusters), as QEMU's backup `compress`. */
  compress?: CompressTarget | undefined;
  /**
   * A guest waits on this copy (copy-before-write lane): a copy between mapped files is made by
   * one synchronous copy_file_range here, with no trip to the thread pool (see copyInKernel).
   */
  guestWaiting?: boolean | undefined;
  /** Fault injection: the worker running this task dies after writing this many bytes. */
  faultExitAfterBytes?: number | undefined;
}

export interface CompressTarget {
  clusterBytes: number;
  /** zlib window the format's readers inflate with (qcow2: 12, QEMU's 4 KiB window). */
  windowBits: number;
  /** Stores one whole cluster already deflated (smaller than a cluster). */
  writeDeflated(offset: number, packed: Uint8Array): Promise<void>;
}

const deflateRawAsync = promisify(deflateRaw);

export type RangeOutcome =
  | { ok: true; copiedBytes: number; skippedBytes: number }
  | { ok: false; error: ShearError; doneBytes: number; copiedBytes: number; skippedBytes: number };

type Run = { offset: number; bytes: number; action: 'skip' | 'zero' | 'data' };

/**
 * Copies one claimed range: asks the source which parts hold data, skips or zeroes the rest in
 * one request per run, and moves the data runs through a worker (when both sides are
 * mappable) or through the coordinator. Never throws: the outcome says how far it got, so the
 * caller can give back exactly the clusters that were not copied.
 */
export async function executeRange(ctx: ExecuteContext, offset: number, bytes: number): Promise<RangeOutcome> {
  let done = 0;
  let copiedBytes = 0;
  let skippedBytes = 0;
  try {
    for (const run of await planRuns(ctx, offset, bytes)) {
      if (Atomics.load(ctx.cancel, ctx.cancelIndex) !== 0) {
        throw new ShearError('ERR_ABORTED', 'Cannot finish copy task: it was cancelled', { offset: run.offset });
      }
      if (run.action === 'skip') {
        skippedBytes += run.bytes;
      } else if (run.action === 'zero') {
        await writeZeroes(ctx.target.io, run.offset, run.bytes);
        skippedBytes += run.bytes;
      } else {
        const r = await copyData(ctx, run.offset, run.bytes);
        if (!r.ok) {
          return { ok: false, error: r.error, doneBytes: run.offset - offset + r.doneBytes, copiedBytes: copiedBytes + r.doneBytes, skippedBytes };
        }
        copiedBytes += run.bytes;
      }
      done = run.offset + run.bytes - offset;
    }
  } catch (err) {
    const error = err instanceof ShearError ? err : new ShearError('ERR_INTERNAL', `Cannot copy (${offset}, ${bytes}): ${(err as Error).message}`, { offset, bytes }, { cause: err });
    return { ok: false, error, doneBytes: done, copiedBytes, skippedBytes };
  }
  return { ok: true, copiedBytes, skippedBytes };
}

async function planRuns(ctx: ExecuteContext, offset: number, bytes: number): Promise<Run[]> {
  const runs: Run[] = [];
  let at = offset;
  const end = offset + bytes;
  while (at < end) {
    let extents: BlockStatusExtent[];
    try {
      extents = await (ctx.statusWindow ?? ctx.source.io).blockStatus(at, end - at);
    } catch (err) {
      throw readError(err, at, end - at, 'block-status');
    }
    if (extents.length === 0) throw new ShearError('ERR_INTERNAL', `Cannot copy (${at}, ${end - at}): the source reported no block status`);
    for (const e of extents) {
      const from = Math.max(e.offset, at);
      const to = Math.min(e.offset + e.bytes, end);
      if (to <= from) continue;
      const action: Run['action'] =
        ctx.skipUnallocated && !e.allocated ? 'skip' : e.zero ? (ctx.targetIsZero ? 'skip' : 'zero') : 'data';
      const last = runs.at(-1);
      if (last && last.action === action && last.offset + last.bytes === from) last.bytes += to - from;
      else runs.push({ offset: from, bytes: to - from, action });
      at = to;
    }
  }
  return runs;
}

function readError(err: unknown, offset: number, bytes: number, op: string): ShearError {
  if (err instanceof ShearError && err.kind !== 'io') return err;
  return new ShearError('ERR_COPY_READ_FAILED', `Cannot copy (${offset}, ${bytes}): reading the source failed: ${(err as Error).message}`, { offset, bytes, op, ...errnoOf(err) }, { cause: err });
}

function writeError(err: unknown, offset: number, bytes: number): ShearError {
  if (err instanceof ShearError && err.kind !== 'io') return err;
  return new ShearError('ERR_COPY_WRITE_FAILED', `Cannot copy (${offset}, ${bytes}): writing the target failed: ${(err as Error).message}`, { offset, bytes, op: 'write', ...errnoOf(err) }, { cause: err });
}

function errnoOf(err: unknown): { errno?: string } {
  const e = (err as ShearError)?.context?.errno;
  return typeof e === 'string' ? { errno: e } : {};
}

async function writeZeroes(target: BlockIO, offset: number, bytes: number): Promise<void> {
  try {
    await target.writeZeroes(offset, bytes, { mayUnmap: true });
  } catch (err) {
    throw writeError(err, offset, bytes);
  }
}

type DataOutcome = { ok: true } | { ok: false; error: ShearError; doneBytes: number };

async function copyData(ctx: ExecuteContext, offset: number, bytes: number): Promise<DataOutcome> {
  if (ctx.compress) return copyCompressed(ctx, ctx.compress, offset, bytes);
  if (ctx.pool && ctx.source.mapping?.mapRead && ctx.target.mapping?.mapWrite) return copyThroughWorker(ctx, ctx.pool, offset, bytes);
  return copyInline(ctx, offset, bytes);
}

async function copyThroughWorker(ctx: ExecuteContext, pool: CopyWorkerPool, offset: number, bytes: number): Promise<DataOutcome> {
  let src;
  try {
    src = await ctx.source.mapping!.mapRead!(offset, bytes);
  } catch (err) {
    // Some ranges cannot be mapped (qcow2 compressed clusters): copy those through the node.
    if ((err as ShearError).code === 'ERR_NOT_IMPLEMENTED') return copyInline(ctx, offset, bytes);
    return { ok: false, error: readError(err, offset, bytes, 'map'), doneBytes: 0 };
  }
  let dst;
  try {
    dst = await ctx.target.mapping!.mapWrite!(offset, bytes);
  } catch (err) {
    return { ok: false, error: writeError(err, offset, bytes), doneBytes: 0 };
  }
  const task: CopyTaskMessage = {
    offset,
    bytes,
    src,
    dst: dst.extents,
    chunkBytes: ctx.chunkBytes,
    dropCache: ctx.dropCache,
    inKernelCopy: ctx.inKernelCopy,
    cancel: ctx.cancel.buffer as SharedArrayBuffer,
    cancelIndex: ctx.cancelIndex,
    ...(ctx.faultExitAfterBytes !== undefined ? { faultExitAfterBytes: ctx.faultExitAfterBytes } : {}),
  };
  const result = await pool.run(task);
  if (result.ok) {
    try {
      await dst.commit();
    } catch (err) {
      return { ok: false, error: writeError(err, offset, bytes), doneBytes: 0 };
    }
    return { ok: true };
  }
  // Data written before the failure is in place; a format links it only on commit, so a
  // partial result is given back whole unless the mapping needs no commit. Keep it simple:
  // abort the mapping and report nothing done.
  await dst.abort().catch(() => {});
  return { ok: false, error: fromWire(result.error), doneBytes: 0 };
}

async function copyInline(ctx: ExecuteContext, offset: number, bytes: number): Promise<DataOutcome> {
  if (ctx.guestWaiting && ctx.source.mapping?.mapRead && ctx.target.mapping?.mapWrite && getNative().supports.copyFileRange) {
    const r = await copyInKernel(ctx, offset, bytes);
    if (r) return r;
  }
  const buf = new Uint8Array(Math.min(ctx.chunkBytes, bytes));
  let done = 0;
  while (done < bytes) {
    if (Atomics.load(ctx.cancel, ctx.cancelIndex) !== 0) {
      return { ok: false, error: new ShearError('ERR_ABORTED', 'Cannot finish copy task: it was cancelled', { offset: offset + done }), doneBytes: done };
    }
    const n = Math.min(buf.length, bytes - done);
    const piece = buf.subarray(0, n);
    try {
      await ctx.source.io.read(offset + done, piece);
    } catch (err) {
      return { ok: false, error: readError(err, offset + done, n, 'read'), doneBytes: done };
    }
    try {
      await ctx.target.io.write(offset + done, piece, ctx.signal ? { signal: ctx.signal } : undefined);
    } catch (err) {
      return { ok: false, error: writeError(err, offset + done, n), doneBytes: done };
    }
    done += n;
  }
  return { ok: true };
}

/**
 * A copy a guest waits on (copy-before-write, at most INLINE_CBW_MAX_BYTES) between two mapped
 * files: one synchronous copy_file_range on the coordinator, no buffer and no trip to the thread
 * pool, where pread then pwrite take two trips. On a loaded machine each trip costs the
 * coordinator a wake-up and often its CPU (bench guest, stages: the copy's p99 1.5 ms through
 * the pool, 0.15 ms this way), while 64 KiB in the page cache copy in some 40 µs. A cold source
 * blocks the coordinator for one read; so does every block-status call already (lseek, planRuns).
 * Returns undefined, having written nothing, when the kernel cannot do it (EXDEV, EOPNOTSUPP)
 * or a side has no plain file extents here; the caller then copies through the nodes.
 */
async function copyInKernel(ctx: ExecuteContext, offset: number, bytes: number): Promise<DataOutcome | undefined> {
  if (Atomics.load(ctx.cancel, ctx.cancelIndex) !== 0) {
    return { ok: false, error: new ShearError('ERR_ABORTED', 'Cannot finish copy task: it was cancelled', { offset }), doneBytes: 0 };
  }
  let src: HostExtent[];
  try {
    src = await ctx.source.mapping!.mapRead!(offset, bytes);
  } catch (err) {
    if ((err as ShearError).code === 'ERR_NOT_IMPLEMENTED') return undefined;
    return { ok: false, error: readError(err, offset, bytes, 'map'), doneBytes: 0 };
  }
  if (src.length !== 1 || src[0]!.kind !== 'fd') return undefined;
  let dst: WriteMapping;
  try {
    dst = await ctx.target.mapping!.mapWrite!(offset, bytes);
  } catch (err) {
    return { ok: false, error: writeError(err, offset, bytes), doneBytes: 0 };
  }
  const from = src[0]!;
  const to = dst.extents[0];
  if (dst.extents.length !== 1 || to?.kind !== 'fd') {
    await dst.abort().catch(() => {});
    return undefined;
  }
  try {
    const n = getNative().copyFileRange(from.fd, from.hostOffset, to.fd, to.hostOffset, bytes);
    if (n !== bytes) throw new ShearError('ERR_IO', `Cannot copy (${offset}, ${bytes}): the source ended after ${n} bytes`, { offset, bytes, op: 'copy-file-range' });
  } catch (err) {
    await dst.abort().catch(() => {});
    if ((err as ShearError).code === 'ERR_IO_UNSUPPORTED') return undefined;
    // One call moved the bytes: which side failed is not told apart, so it counts as the write.
    return { ok: false, error: writeError(err, offset, bytes), doneBytes: 0 };
  }
  try {
    await dst.commit();
  } catch (err) {
    return { ok: false, error: writeError(err, offset, bytes), doneBytes: 0 };
  }
  return { ok: true };
}

/**
 * Compressed copy: whole clusters are deflated (in a worker when the source is mappable: the
 * CPU-bound case where more cores pay off), then stored by the target format in the coordinator,
 * which owns the image metadata. Clusters deflate cannot shrink are written as they are.
 */
async function copyCompressed(ctx: ExecuteContext, compress: CompressTarget, offset: number, bytes: number): Promise<DataOutcome> {
  let clusters: { offset: number; data: Uint8Array; compressed: boolean }[];
  let src: HostExtent[] | undefined;
  if (ctx.pool && ctx.source.mapping?.mapRead) {
    try {
      src = await ctx.source.mapping.mapRead(offset, bytes);
    } catch (err) {
      if ((err as ShearError).code !== 'ERR_NOT_IMPLEMENTED') return { ok: false, error: readError(err, offset, bytes, 'map'), doneBytes: 0 };
      src = undefined;
    }
  }
  if (src && ctx.pool) {
    const result = await ctx.pool.run({
      offset, bytes, src, dst: [], chunkBytes: Math.max(compress.clusterBytes, Math.min(ctx.chunkBytes, bytes)), dropCache: false,
      cancel: ctx.cancel.buffer as SharedArrayBuffer, cancelIndex: ctx.cancelIndex, compressClusterBytes: compress.clusterBytes, compressWindowBits: compress.windowBits,
    });
    if (!result.ok) return { ok: false, error: fromWire(result.error), doneBytes: 0 };
    clusters = result.compressed ?? [];
  } else {
    const buf = new Uint8Array(bytes);
    try {
      await ctx.source.io.read(offset, buf);
    } catch (err) {
      return { ok: false, error: readError(err, offset, bytes, 'read'), doneBytes: 0 };
    }
    clusters = await Promise.all(
      Array.from({ length: Math.ceil(bytes / compress.clusterBytes) }, async (_, i) => {
        const data = buf.subarray(i * compress.clusterBytes, Math.min(bytes, (i + 1) * compress.clusterBytes));
        const deflated = data.length === compress.clusterBytes ? await deflateRawAsync(data, { windowBits: compress.windowBits }) : undefined;
        return deflated && deflated.length < compress.clusterBytes
          ? { offset: offset + i * compress.clusterBytes, data: new Uint8Array(deflated), compressed: true }
          : { offset: offset + i * compress.clusterBytes, data, compressed: false };
      }),
    );
  }
  let done = 0;
  for (const c of clusters) {
    try {
      if (c.compressed) await compress.writeDeflated(c.offset, c.data);
      else await ctx.target.io.write(c.offset, c.data);
    } catch (err) {
      return { ok: false, error: writeError(err, c.offset, c.data.length), doneBytes: done };
    }
    done = c.offset + compress.clusterBytes - offset;
  }
  return { ok: true };
}

/**
 * Copies a batch of scattered ranges (an incremental's dirty clusters) with one block-status
 * pass over their span and one worker request for all their data: the per-request cost, which
 * dominates scattered copies, is paid once per batch. Ranges are whole clusters. On failure
 * nothing of the batch counts as done (it is given back or retried whole).
 */
export async function executeParts(ctx: ExecuteContext, parts: [number, number][]): Promise<RangeOutcome> {
  // A batch promoted to the copy-before-write lane may be small enough to run inline, without a
  // pool (task-lifecycle): then each part goes through the nodes like any inline range.
  if (!ctx.pool || !ctx.source.mapping?.mapRead || !ctx.target.mapping?.mapWrite) return copyPartsOneByOne(ctx, parts);
  const start = parts[0]![0];
  const end = parts.at(-1)![0] + parts.at(-1)![1];
  let copiedBytes = 0;
  let skippedBytes = 0;
  const fail = (error: ShearError): RangeOutcome => ({ ok: false, error, doneBytes: 0, copiedBytes: 0, skippedBytes: 0 });
  let runs: Run[];
  try {
    runs = await planRuns(ctx, start, end - start);
  } catch (err) {
    return fail(err as ShearError);
  }
  // A part with any data is copied whole: parts are whole clusters, so every write mapping
  // covers whole clusters and no two mappings share one (a format locks a mapped cluster until
  // it is committed). Parts without data are zeroed or skipped run by run.
  const data: [number, number][] = [];
  let r = 0;
  for (const [o, b] of parts) {
    while (runs[r]!.offset + runs[r]!.bytes <= o) r++;
    const covering: Run[] = [];
    for (let i = r; i < runs.length && runs[i]!.offset < o + b; i++) covering.push(runs[i]!);
    if (covering.some((run) => run.action === 'data')) {
      const last = data.at(-1);
      if (last && last[0] + last[1] === o) last[1] += b;
      else data.push([o, b]);
      continue;
    }
    for (const run of covering) {
      const from = Math.max(o, run.offset);
      const to = Math.min(o + b, run.offset + run.bytes);
      if (run.action === 'zero') {
        try {
          await writeZeroes(ctx.target.io, from, to - from);
        } catch (err) {
          return fail(err as ShearError);
        }
      }
      skippedBytes += to - from;
    }
  }
  if (data.length === 0) return { ok: true, copiedBytes, skippedBytes };
  const src: HostExtent[] = [];
  const dst: HostExtent[] = [];
  const mappings: WriteMapping[] = [];
  const abortAll = async () => {
    for (const m of mappings) await m.abort().catch(() => {});
  };
  try {
    for (const [o, b] of data) {
      src.push(...(await ctx.source.mapping!.mapRead!(o, b)));
      const m = await ctx.target.mapping!.mapWrite!(o, b);
      mappings.push(m);
      dst.push(...m.extents);
    }
  } catch (err) {
    await abortAll();
    // Some ranges cannot be mapped (qcow2 compressed clusters): copy the batch part by part.
    if ((err as ShearError).code === 'ERR_NOT_IMPLEMENTED') return copyPartsOneByOne(ctx, parts);
    return fail(err instanceof ShearError ? err : readError(err, start, end - start, 'map'));
  }
  const total = data.reduce((n, [, b]) => n + b, 0);
  const result = await ctx.pool!.run({
    offset: data[0]![0],
    bytes: total,
    src,
    dst,
    chunkBytes: ctx.chunkBytes,
    dropCache: ctx.dropCache,
    inKernelCopy: ctx.inKernelCopy,
    cancel: ctx.cancel.buffer as SharedArrayBuffer,
    cancelIndex: ctx.cancelIndex,
    ...(ctx.faultExitAfterBytes !== undefined ? { faultExitAfterBytes: ctx.faultExitAfterBytes } : {}),
  });
  if (!result.ok) {
    await abortAll();
    return fail(fromWire(result.error));
  }
  try {
    for (const m of mappings) await m.commit();
  } catch (err) {
    return fail(writeError(err, start, end - start));
  }
  copiedBytes += total;
  return { ok: true, copiedBytes, skippedBytes };
}

async function copyPartsOneByOne(ctx: ExecuteContext, parts: [number, number][]): Promise<RangeOutcome> {
  let copiedBytes = 0;
  let skippedBytes = 0;
  for (const [o, b] of parts) {
    const r = await executeRange(ctx, o, b);
    copiedBytes += r.copiedBytes;
    skippedBytes += r.skippedBytes;
    if (!r.ok) return { ok: false, error: r.error, doneBytes: 0, copiedBytes, skippedBytes };
  }
  return { ok: true, copiedBytes, skippedBytes };
}
