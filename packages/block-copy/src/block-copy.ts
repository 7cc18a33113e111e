import { EventEmitter } from 'node:events';
import { performance } from 'node:perf_hooks';
import { ShearError, alignDown, alignUp, isPowerOfTwo, MiB } from '@shear/base';
import { SharedBitmap } from '@shear/bitmap';
import { RequestTable, type InFlightRequest } from '@shear/reqlist';
import { executeParts, executeRange, type CompressTarget, type CopyEndpoint, type ExecuteContext, type RangeOutcome } from './execute-range.js';
import type { CopyWorkerPool } from './pool.js';
import { RateLimiter } from './rate-limit.js';

export const DEFAULT_CLUSTER_BYTES = 64 * 1024;
/** Task size: the measured sweet spot on these machines (bench/copy), inside QEMU's 256 KiB–4 MiB range. */
export const DEFAULT_MAX_CHUNK_BYTES = 4 * MiB;
/** Pieces a worker moves between two looks at its cancel word. */
export const DEFAULT_WORKER_CHUNK_BYTES = 1 * MiB;
/** Copy-before-write copies up to this size run on the coordinator, not on a worker. */
const INLINE_CBW_MAX_BYTES = 256 * 1024;
/** Bytes in flight at most, whatever the disk size (QEMU's BLOCK_COPY_MAX_MEM). */
export const DEFAULT_MAX_IN_FLIGHT_BYTES = 128 * MiB;
export const DEFAULT_RETRY_ATTEMPTS = 3;
export const DEFAULT_RETRY_BACKOFF_MS = 20;

/** Priority lanes, highest first. */
export type Lane = 'cbw' | 'retry' | 'background';
const LANES: Lane[] = ['cbw', 'retry', 'background'];

export interface BlockCopyOptions {
  source: CopyEndpoint;
  target: CopyEndpoint;
  /** Length of the copied range (the source's length). */
  length: number;
  /** Unit of tracking; a power of two. Default DEFAULT_CLUSTER_BYTES. */
  clusterBytes?: number;
  /** Largest task; a multiple of the cluster. Default DEFAULT_MAX_CHUNK_BYTES. */
  maxChunkBytes?: number;
  /** Worker threads; absent: the coordinator copies (slower, but works with any node). */
  pool?: CopyWorkerPool;
  /** Tasks running at once; default: twice the pool's workers (or 4 without a pool). */
  maxTasks?: number;
  maxInFlightBytes?: number;
  /** One task at a time and no read-ahead: the old single-coroutine backup loop, for comparison. */
  singleTask?: boolean;
  /** Bytes per second for background and retry lanes; 0 = unlimited. */
  speed?: number;
  skipUnallocated?: boolean;
  targetIsZero?: boolean;
  /** Keep written data out of the page cache (sync_file_range + fadvise per piece). Default true. */
  dropCache?: boolean;
  retryAttempts?: number;
  retryBackoffMs?: number;
  /** Write deflated clusters through this (a qcow2 target); the cluster size must equal clusterBytes. */
  compress?: CompressTarget;
  /**
   * Ranges to copy before the rest, when dirty (a fleecing cache's held data: draining it first
   * frees memory and keeps the cache from filling). Called whenever a background task is cut.
   */
  prefer?: () => Iterable<{ offset: number; bytes: number }>;
  /** Fault injection for tests: the worker threads running the first `tasks` tasks die after writing `afterBytes`. */
  faultInjection?: { killWorkerAfterBytes: number; tasks: number };
}

export interface CopyProgress {
  /** Bytes the copy has dealt with: copied plus skipped. */
  doneBytes: number;
  copiedBytes: number;
  skippedBytes: number;
  /** doneBytes plus what is still to do. */
  totalBytes: number;
  /** Over the last few seconds. */
  bytesPerSec: number;
}

/**
 * One claimed range. From claim to settle, its clusters are absent from the copy bitmap and
 * the task is registered in the task table, so a cluster is always either dirty in the bitmap
 * or owned by exactly one task that will give it back if it does not copy it.
 */
interface Task {
  id: number;
  offset: number;
  bytes: number;
  lane: Lane;
  attempts: number;
  notBefore: number;
  state: 'queued' | 'running';
  req: InFlightRequest;
  cancelIndex: number;
  /** Ranges a discard removed while the task held them: never given back. */
  discarded: [number, number][];
  cancelled: boolean;
  /** Aborted when the task is cancelled while it runs (see ExecuteContext.signal). */
  abort?: AbortController;
  /**
   * A batch of scattered dirty ranges inside [offset, offset + bytes), copied in one worker
   * request (incrementals: the per-request cost dominates). Only these were claimed.
   */
  parts?: [number, number][];
}

/** A batch gathers dirty ranges within this span of the disk... */
const BATCH_SPAN_BYTES = 64 * MiB;
/** ...and at most this many of them. */
const BATCH_MAX_PARTS = 128;

function taskBytes(t: Task): number {
  return t.parts ? t.parts.reduce((n, [, b]) => n + b, 0) : t.bytes;
}

/**
 * Block-copy, coordinator side (QEMU's block-copy, with worker threads).
 *
 * Coordinator-only object. The copy bitmap is a SharedBitmap (workers could read it), but only
 * this object clears its bits: a task claims clusters by clearing their bits and registering in
 * the task table, in one synchronous step, and on failure or cancellation sets the bits of
 * whatever it did not copy again. Others may set bits at any time (more to copy).
 *
 * Scheduling: three lanes (copy-before-write, retry, background). A free slot goes to the
 * highest non-empty lane; background tasks are cut from the bitmap only when a slot is free,
 * so clusters not yet claimed stay available to copy-before-write. Copy-before-write ignores
 * the rate limit. Slots are limited by task count and by bytes in flight.
 */
export class BlockCopy extends EventEmitter {
  readonly copyBitmap: SharedBitmap;
  readonly clusterBytes: number;
  readonly maxChunkBytes: number;
  readonly length: number;
  readonly #opts: Required<Pick<BlockCopyOptions, 'skipUnallocated' | 'targetIsZero' | 'dropCache' | 'retryAttempts' | 'retryBackoffMs'>>;
  readonly #source: CopyEndpoint;
  readonly #target: CopyEndpoint;
  readonly #pool: CopyWorkerPool | undefined;
  readonly #compress: CompressTarget | undefined;
  #faultsLeft: number;
  readonly #prefer: (() => Iterable<{ offset: number; bytes: number }>) | undefined;
  readonly #faultAfterBytes: number;
  readonly #maxTasks: number;
  readonly #maxInFlightBytes: number;
  readonly #rate: RateLimiter;
  readonly #tasks = new RequestTable();
  readonly #lanes: Record<Lane, Task[]> = { cbw: [], retry: [], background: [] };
  readonly #running = new Set<Task>();
  readonly #cancelWords: Int32Array;
  readonly #freeCancel: number[] = [];
  #nextId = 1;
  #inFlightBytes = 0;
  #scanAt = 0;
  #wakeTimer: NodeJS.Timeout | undefined;
  #wakeAt = Infinity;
  /** Background copying is on while run() is active. */
  #background = false;
  /** While paused, no background or retry task starts; copy-before-write still does. */
  #paused = false;
  #resumeWaiters: (() => void)[] = [];
  #failure: ShearError | undefined;
  #idleWaiters: (() => void)[] = [];
  #copiedBytes = 0;
  #skippedBytes = 0;
  #rateWindow: { t: number; bytes: number }[] = [];

  constructor(opts: BlockCopyOptions) {
    super();
    this.clusterBytes = opts.clusterBytes ?? DEFAULT_CLUSTER_BYTES;
    if (!isPowerOfTwo(this.clusterBytes)) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot copy with cluster size ${this.clusterBytes}: it must be a power of two`);
    }
    const chunk = opts.maxChunkBytes ?? DEFAULT_MAX_CHUNK_BYTES;
    if (!Number.isSafeInteger(chunk) || chunk < this.clusterBytes) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot copy with max-chunk ${chunk}: it must be at least the cluster size ${this.clusterBytes}`);
    }
    this.maxChunkBytes = alignDown(chunk, this.clusterBytes);
    this.length = opts.length;
    this.copyBitmap = SharedBitmap.create(Math.max(1, opts.length), this.clusterBytes);
    if (opts.compress && opts.compress.clusterBytes !== this.clusterBytes) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot copy compressed: the copy cluster size ${this.clusterBytes} must equal the target's cluster size ${opts.compress.clusterBytes}`);
    }
    this.#compress = opts.compress;
    this.#faultsLeft = opts.faultInjection?.tasks ?? 0;
    this.#prefer = opts.prefer;
    this.#faultAfterBytes = opts.faultInjection?.killWorkerAfterBytes ?? 0;
    this.#source = opts.source;
    this.#target = opts.target;
    this.#pool = opts.singleTask && opts.pool && opts.pool.workers !== 1 ? undefined : opts.pool;
    if (opts.singleTask && opts.pool && opts.pool.workers !== 1) {
      throw new ShearError('ERR_INVALID_ARGUMENT', 'Cannot run single-task mode on a pool of several workers: give it a pool of one');
    }
    this.#maxTasks = opts.singleTask ? 1 : (opts.maxTasks ?? (opts.pool ? opts.pool.workers * 2 : 4));
    this.#maxInFlightBytes = opts.maxInFlightBytes ?? DEFAULT_MAX_IN_FLIGHT_BYTES;
    this.#rate = new RateLimiter(opts.speed ?? 0);
    this.#opts = {
      skipUnallocated: opts.skipUnallocated ?? false,
      targetIsZero: opts.targetIsZero ?? false,
      dropCache: opts.dropCache ?? true,
      retryAttempts: opts.retryAttempts ?? DEFAULT_RETRY_ATTEMPTS,
      retryBackoffMs: opts.retryBackoffMs ?? DEFAULT_RETRY_BACKOFF_MS,
    };
    // One cancel word per task slot; copy-before-write tasks may exceed the slot count, so
    // leave room for them.
    const words = this.#maxTasks + 64;
    this.#cancelWords = new Int32Array(new SharedArrayBuffer(4 * words));
    for (let i = words - 1; i >= 0; i--) this.#freeCancel.push(i);
  }

  get speed(): number {
    return this.#rate.speed;
  }

  /** Changes the background rate while running. */
  setSpeed(bytesPerSec: number): void {
    this.#rate.setSpeed(bytesPerSec);
    this.#pump();
  }

  get paused(): boolean {
    return this.#paused;
  }

  /** Stops starting background and retry tasks; running ones finish. Copy-before-write goes on. */
  pause(): void {
    this.#paused = true;
  }

  resume(): void {
    if (!this.#paused) return;
    this.#paused = false;
    for (const w of this.#resumeWaiters.splice(0)) w();
    this.#pump();
  }

  get progress(): CopyProgress {
    const done = this.#copiedBytes + this.#skippedBytes;
    let pending = this.copyBitmap.countBytes();
    for (const t of this.#allTasks()) pending += taskBytes(t);
    return {
      doneBytes: done,
      copiedBytes: this.#copiedBytes,
      skippedBytes: this.#skippedBytes,
      totalBytes: done + pending,
      bytesPerSec: this.#currentRate(),
    };
  }

  /** Tasks claimed and not settled, for diagnostics and tests. */
  get inFlightTasks(): number {
    return this.#running.size + LANES.reduce((n, l) => n + this.#lanes[l].length, 0);
  }

  /**
   * Copies every cluster set in the copy bitmap (and any set while it runs) until none is
   * left. On failure (after retries) or cancellation it stops cutting new tasks, lets running
   * ones finish, gives back every cluster not copied to the copy bitmap, and rejects.
   * @throws ERR_ABORTED, ERR_COPY_READ_FAILED, ERR_COPY_WRITE_FAILED, ERR_NO_SPACE, ERR_COPY_WORKER_DIED
   */
  async run(opts: { signal?: AbortSignal } = {}): Promise<void> {
    const { signal } = opts;
    signal?.throwIfAborted();
    if (this.#background) throw new ShearError('ERR_INVALID_ARGUMENT', 'Cannot run block-copy: it is already running');
    this.#background = true;
    this.#failure = undefined;
    this.#scanAt = 0;
    const onAbort = () => {
      this.#stop(new ShearError('ERR_ABORTED', 'Cannot finish block-copy: it was cancelled', {}, { cause: signal!.reason }));
      // A paused copy wakes up to see the cancellation.
      for (const w of this.#resumeWaiters.splice(0)) w();
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      for (;;) {
        this.#pump();
        await this.#idle();
        if (this.#failure) throw this.#failure;
        if (this.#paused) {
          await new Promise<void>((resolve) => this.#resumeWaiters.push(resolve));
          continue;
        }
        if (!this.#workLeft()) break;
      }
      await this.#target.io.flush();
    } finally {
      signal?.removeEventListener('abort', onAbort);
      this.#background = false;
      this.#clearWake();
    }
  }

  /**
   * Copies the dirty clusters of (offset, bytes) now, in the copy-before-write lane, and waits
   * for any task already copying part of the range (instead of copying twice). Resolves when
   * no cluster of the range is left to copy. Used by copy-before-write before a guest write.
   * @throws the failure of a task covering the range
   */
  async copyRange(offset: number, bytes: number, opts: { signal?: AbortSignal } = {}): Promise<void> {
    const start = alignDown(offset, this.clusterBytes);
    const end = Math.min(this.length, alignUp(offset + bytes, this.clusterBytes));
    const mine: Promise<void>[] = [];
    let failed: ShearError | undefined;
    for (;;) {
      opts.signal?.throwIfAborted();
      for (let area = this.copyBitmap.nextDirtyArea(start, end, this.maxChunkBytes); area; area = this.copyBitmap.nextDirtyArea(area.offset + area.bytes, end, this.maxChunkBytes)) {
        const task = this.#claim(area.offset, area.bytes, 'cbw');
        mine.push(new Promise((resolve) => this.once(`settled:${task.id}`, (o: RangeOutcome) => {
          if (!o.ok && !failed) failed = o.error;
          resolve();
        })));
      }
      // Tasks of others in the range that are still waiting get promoted, so the guest does
      // not wait behind background work or a retry back-off.
      for (const t of [...this.#lanes.retry, ...this.#lanes.background]) {
        if (t.offset < end && start < t.offset + t.bytes) this.#promote(t);
      }
      this.#pump();
      // Between the claims above and this check nothing else ran: no conflict means every
      // cluster of the range is copied (or was discarded).
      const waited = await this.#tasks.waitOne(start, end - start, 'cbw-copy', opts.signal ? { signal: opts.signal } : {});
      if (failed) break;
      if (!waited) return;
    }
    await Promise.all(mine);
    throw failed;
  }

  /**
   * Drops (offset, bytes), rounded inward to whole clusters, from what is left to copy:
   * their bits are cleared, queued tasks inside are dropped, running ones cancelled, and none
   * of it is ever given back. Returns the bytes dropped from the bitmap and queues.
   */
  discard(offset: number, bytes: number): number {
    const start = alignUp(offset, this.clusterBytes);
    const end = offset + bytes >= this.length ? this.length : alignDown(offset + bytes, this.clusterBytes);
    if (end <= start) return 0;
    let dropped = 0;
    for (const area of [...this.copyBitmap.dirtyExtents(start, end - start)]) {
      this.copyBitmap.reset(area.offset, area.bytes);
      dropped += area.bytes;
    }
    for (const t of this.#allTasks()) {
      const from = Math.max(start, t.offset);
      const to = Math.min(end, t.offset + t.bytes);
      if (to <= from) continue;
      t.discarded.push([from, to - from]);
      if (from === t.offset && to === t.offset + t.bytes) {
        if (t.state === 'queued') {
          this.#dequeue(t);
          dropped += t.bytes;
          this.#settle(t, { ok: true, copiedBytes: 0, skippedBytes: 0 }, true);
        } else {
          t.cancelled = true;
          Atomics.store(this.#cancelWords, t.cancelIndex, 1);
          t.abort?.abort();
        }
      }
    }
    this.#pump();
    return dropped;
  }

  // ---- claiming and settling ----

  #claim(offset: number, bytes: number, lane: Lane, parts?: [number, number][]): Task {
    if (parts) for (const [o, b] of parts) this.copyBitmap.reset(o, b);
    else this.copyBitmap.reset(offset, bytes);
    const task: Task = {
      ...(parts ? { parts } : {}),
      id: this.#nextId++,
      offset,
      bytes,
      lane,
      attempts: 0,
      notBefore: 0,
      state: 'queued',
      req: this.#tasks.add(offset, bytes, 'copy-task'),
      cancelIndex: -1,
      discarded: [],
      cancelled: false,
    };
    this.#lanes[lane].push(task);
    return task;
  }

  #promote(t: Task): void {
    this.#dequeue(t);
    t.lane = 'cbw';
    t.notBefore = 0;
    this.#lanes.cbw.push(t);
  }

  #dequeue(t: Task): void {
    const lane = this.#lanes[t.lane];
    const i = lane.indexOf(t);
    if (i >= 0) lane.splice(i, 1);
  }

  *#allTasks(): Generator<Task> {
    yield* this.#running;
    for (const l of LANES) yield* this.#lanes[l];
  }

  /** Gives back the clusters of [from, to) that no discard took away. */
  #giveBack(t: Task, from: number, to: number): void {
    const start = alignUp(from, this.clusterBytes);
    if (to <= start) return;
    const keep: [number, number][] = [[start, to]];
    for (const [o, b] of t.discarded) {
      for (let i = keep.length - 1; i >= 0; i--) {
        const [s, e] = keep[i]!;
        if (o >= e || o + b <= s) continue;
        keep.splice(i, 1, ...([[s, o], [o + b, e]] as [number, number][]).filter(([x, y]) => y > x));
      }
    }
    for (const [s, e] of keep) {
      if (!t.parts) {
        this.copyBitmap.set(s, e - s);
        continue;
      }
      // A batch gives back only what it claimed, not the clean gaps between its parts.
      for (const [o, b] of t.parts) {
        const from = Math.max(s, o);
        const to = Math.min(e, o + b);
        if (to > from) this.copyBitmap.set(from, to - from);
      }
    }
  }

  #settle(t: Task, outcome: RangeOutcome, discarded = false): void {
    if (t.cancelIndex >= 0) {
      Atomics.store(this.#cancelWords, t.cancelIndex, 0);
      this.#freeCancel.push(t.cancelIndex);
      t.cancelIndex = -1;
    }
    this.#copiedBytes += outcome.copiedBytes;
    this.#skippedBytes += outcome.skippedBytes;
    this.#noteRate(outcome.copiedBytes + outcome.skippedBytes);
    // Which clusters now hold their data on the target (copy-before-write reads them there).
    if (outcome.ok && t.parts && !discarded) {
      for (const [o, b] of t.parts) this.emit('range-done', o, b);
    } else {
      const doneBytes = outcome.ok ? t.bytes : alignDown(outcome.doneBytes, this.clusterBytes);
      if (doneBytes > 0 && !discarded) this.emit('range-done', t.offset, doneBytes);
    }
    // A discard does not stop a task mid-write: what it wrote into a discarded range may have
    // landed after the owner freed that range on the target, so the owner frees it again.
    for (const [o, b] of t.discarded) this.emit('discarded-written', o, b);
    if (!outcome.ok && !discarded) {
      // Clusters wholly before doneBytes are in place; the rest go back (or are retried). A
      // batch reports nothing done on failure: it is given back or retried whole.
      const doneEnd = t.parts ? t.offset : t.offset + alignDown(outcome.doneBytes, this.clusterBytes);
      // Only I/O errors are worth retrying (a flaky disk, a worker that died); a full disk or a
      // refused request fails the same way again.
      const retry = outcome.error.kind === 'io' && !t.cancelled && t.attempts < this.#opts.retryAttempts && !this.#failure;
      if (retry && doneEnd < t.offset + t.bytes) {
        t.attempts++;
        t.bytes = t.offset + t.bytes - doneEnd;
        t.offset = doneEnd;
        t.req.remove();
        t.req = this.#tasks.add(t.offset, t.bytes, 'copy-task');
        t.state = 'queued';
        t.lane = t.lane === 'cbw' ? 'cbw' : 'retry';
        t.notBefore = performance.now() + this.#opts.retryBackoffMs * 2 ** (t.attempts - 1);
        this.emit('retry', { offset: t.offset, bytes: t.bytes, attempt: t.attempts, error: outcome.error });
        this.#lanes[t.lane].push(t);
        this.#pump();
        return;
      }
      this.#giveBack(t, doneEnd, t.offset + t.bytes);
      if (outcome.error.code !== 'ERR_ABORTED' && !t.cancelled) this.#stop(outcome.error);
    }
    t.req.remove();
    // A task cancelled because a discard took its whole range has nothing left to copy: whoever
    // waits for the range (a guest write's copy-before-write) may go on, whatever the cancel
    // made the executor report.
    this.emit(`settled:${t.id}`, discarded ? { ok: true, copiedBytes: 0, skippedBytes: 0 } : outcome);
    this.emit('progress', this.progress);
    this.#pump();
    this.#checkIdle();
  }

  /** Stops background work after a failure or cancel; running tasks finish or are cancelled. */
  #stop(reason: ShearError): void {
    if (!this.#failure) this.#failure = reason;
    const aborting = reason.code === 'ERR_ABORTED';
    for (const lane of ['retry', 'background'] as const) {
      for (const t of this.#lanes[lane].splice(0)) {
        this.#giveBack(t, t.offset, t.offset + t.bytes);
        t.req.remove();
        this.emit(`settled:${t.id}`, { ok: false, error: reason, doneBytes: 0, copiedBytes: 0, skippedBytes: 0 });
      }
    }
    if (aborting) for (const t of this.#running) if (t.lane !== 'cbw') Atomics.store(this.#cancelWords, t.cancelIndex, 1);
    this.#checkIdle();
  }

  // ---- the scheduler ----

  #pump(): void {
    const now = performance.now();
    while (this.#running.size < this.#maxTasks) {
      const task = this.#nextTask(now);
      if (!task) break;
      this.#start(task);
    }
  }

  #nextTask(now: number): Task | undefined {
    const budgetOk = (t: Task) => this.#running.size === 0 || this.#inFlightBytes + taskBytes(t) <= this.#maxInFlightBytes;
    const cbw = this.#lanes.cbw[0];
    if (cbw) return budgetOk(cbw) ? this.#lanes.cbw.shift() : undefined;
    if (this.#paused) return undefined;
    const retry = this.#lanes.retry.find((t) => t.notBefore <= now);
    const waitingRetry = this.#lanes.retry.reduce((m, t) => Math.min(m, t.notBefore), Infinity);
    if (waitingRetry !== Infinity && !retry) this.#wakeIn(waitingRetry - now);
    // A background task claimed earlier but held back (budget, rate) goes before a new claim.
    let candidate: Task | undefined = retry ?? this.#lanes.background[0];
    if (!candidate && this.#background && !this.#failure) {
      const area = this.#nextBackgroundArea();
      if (area) {
        const parts = this.#gatherBatch(area);
        candidate = parts ? this.#claim(parts[0]![0], parts.at(-1)![0] + parts.at(-1)![1] - parts[0]![0], 'background', parts) : this.#claim(area.offset, area.bytes, 'background');
      }
    }
    if (!candidate) return undefined;
    if (!budgetOk(candidate)) return undefined;
    const delay = this.#rate.take(taskBytes(candidate), now);
    if (delay > 0) {
      this.#wakeIn(delay);
      return undefined;
    }
    this.#dequeue(candidate);
    return candidate;
  }

  #nextBackgroundArea() {
    if (this.#prefer) {
      for (const r of this.#prefer()) {
        const area = this.copyBitmap.nextDirtyArea(r.offset, Math.min(this.length, r.offset + r.bytes), this.maxChunkBytes);
        if (area) return area;
      }
    }
    let area = this.copyBitmap.nextDirtyArea(this.#scanAt, this.length, this.maxChunkBytes);
    if (!area && this.#scanAt > 0) area = this.copyBitmap.nextDirtyArea(0, this.length, this.maxChunkBytes);
    if (area) this.#scanAt = area.offset + area.bytes;
    return area;
  }

  /**
   * Extends a small dirty area with the next ones nearby into one batch, when worker threads
   * move the data (the batch becomes one worker request). Returns undefined for a single area.
   */
  #gatherBatch(first: { offset: number; bytes: number }): [number, number][] | undefined {
    if (!this.#pool || this.#compress || !this.#source.mapping?.mapRead || !this.#target.mapping?.mapWrite) return undefined;
    if (first.bytes >= this.maxChunkBytes) return undefined;
    const parts: [number, number][] = [[first.offset, first.bytes]];
    let total = first.bytes;
    const limit = Math.min(this.length, first.offset + BATCH_SPAN_BYTES);
    let at = first.offset + first.bytes;
    while (total < this.maxChunkBytes && parts.length < BATCH_MAX_PARTS && at < limit) {
      const next = this.copyBitmap.nextDirtyArea(at, limit, this.maxChunkBytes - total);
      if (!next) break;
      parts.push([next.offset, next.bytes]);
      total += next.bytes;
      at = next.offset + next.bytes;
    }
    if (parts.length === 1) return undefined;
    this.#scanAt = Math.max(this.#scanAt, at);
    return parts;
  }

  #start(t: Task): void {
    t.state = 'running';
    t.cancelIndex = this.#freeCancel.pop()!;
    Atomics.store(this.#cancelWords, t.cancelIndex, t.cancelled ? 1 : 0);
    this.#running.add(t);
    const bytes = taskBytes(t);
    this.#inFlightBytes += bytes;
    // A guest waits on a small copy-before-write copy: done here, it skips the round trip to a
    // worker thread and the queue behind background tasks there (writer p99 with the filter
    // halved, and during a push backup 0.8x with twice the guest throughput; nbd bench, latency
    // part). Big copies still go to the workers.
    const inline = !this.#pool || (t.lane === 'cbw' && taskBytes(t) <= INLINE_CBW_MAX_BYTES);
    // Only a copy run here can wait inside its target (a full fleecing cache); a worker's copy
    // sees the cancel word.
    if (inline) t.abort = new AbortController();
    const ctx: ExecuteContext = {
        source: this.#source,
        target: this.#target,
        pool: inline ? undefined : this.#pool,
        ...(t.abort ? { signal: t.abort.signal } : {}),
        chunkBytes: Math.min(DEFAULT_WORKER_CHUNK_BYTES, this.maxChunkBytes),
        // A guest write waits on copy-before-write tasks: they do not wait for writeback (and
        // what they preserve is often read back soon, by a pull), so only background copies
        // pace the page cache.
        dropCache: this.#opts.dropCache && t.lane !== 'cbw',
        skipUnallocated: this.#opts.skipUnallocated,
        targetIsZero: this.#opts.targetIsZero,
        cancel: this.#cancelWords,
        cancelIndex: t.cancelIndex,
        compress: this.#compress,
        faultExitAfterBytes: this.#faultsLeft-- > 0 ? this.#faultAfterBytes : undefined,
      };
    (t.parts ? executeParts(ctx, t.parts) : executeRange(ctx, t.offset, t.bytes))
      // Executors report failures as outcomes; a throw is a bug, settled as one so nothing hangs.
      .catch((err: unknown): RangeOutcome => ({
        ok: false,
        error: new ShearError('ERR_INTERNAL', `Cannot copy (${t.offset}, ${t.bytes}): ${(err as Error)?.stack ?? String(err)}`, { offset: t.offset, bytes: t.bytes }, { cause: err }),
        doneBytes: 0,
        copiedBytes: 0,
        skippedBytes: 0,
      }))
      .then((outcome) => {
        this.#running.delete(t);
        this.#inFlightBytes -= bytes;
        this.#settle(t, outcome, t.cancelled && t.discarded.length > 0);
      });
  }

  #wakeIn(ms: number): void {
    const at = performance.now() + Math.max(1, ms);
    if (at >= this.#wakeAt) return;
    this.#clearWake();
    this.#wakeAt = at;
    this.#wakeTimer = setTimeout(() => {
      this.#wakeTimer = undefined;
      this.#wakeAt = Infinity;
      this.#pump();
      this.#checkIdle();
    }, Math.max(1, ms));
  }

  #clearWake(): void {
    if (this.#wakeTimer) clearTimeout(this.#wakeTimer);
    this.#wakeTimer = undefined;
    this.#wakeAt = Infinity;
  }

  // A zero-length copy's bitmap still has one cluster, which no task can take: counted as work,
  // it made run() loop on resolved promises forever, deaf to signals.
  #workLeft = (): boolean => this.length > 0 && !this.copyBitmap.isEmpty();

  /** Resolves when nothing runs or waits and (while copying) no background work can start. */
  #idle(): Promise<void> {
    return new Promise((resolve) => {
      this.#idleWaiters.push(resolve);
      this.#checkIdle();
    });
  }

  #checkIdle(): void {
    if (this.inFlightTasks > 0) return;
    if (this.#background && !this.#failure && !this.#paused && this.#workLeft()) {
      // Work is left but nothing could start now (rate limit): the wake timer will pump.
      if (this.#wakeTimer) return;
      this.#pump();
      if (this.inFlightTasks > 0) return;
    }
    for (const w of this.#idleWaiters.splice(0)) w();
  }

  #noteRate(bytes: number): void {
    const now = performance.now();
    this.#rateWindow.push({ t: now, bytes });
    while (this.#rateWindow.length > 0 && this.#rateWindow[0]!.t < now - 3000) this.#rateWindow.shift();
  }

  #currentRate(): number {
    const w = this.#rateWindow;
    if (w.length < 2) return 0;
    const span = (w.at(-1)!.t - w[0]!.t) / 1000;
    const bytes = w.slice(1).reduce((s, x) => s + x.bytes, 0);
    return span > 0 ? bytes / span : 0;
  }
}
