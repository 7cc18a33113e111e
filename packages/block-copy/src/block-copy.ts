import { EventEmitter } from 'node:events';
import { ShearError, alignDown, alignUp, isPowerOfTwo, MiB } from '@shear/base';
import { SharedBitmap } from '@shear/bitmap';
import type { CompressTarget, CopyEndpoint, RangeOutcome } from './execute-range.js';
import { LaneScheduler } from './lane-scheduler.js';
import type { CopyWorkerPool } from './pool.js';
import { RateLimiter } from './rate-limit.js';
import { StatusWindow } from './status-window.js';
import { TaskLifecycle, type CopyProgress } from './task-lifecycle.js';
import { TaskQueue, type Task } from './task-queue.js';

export const DEFAULT_CLUSTER_BYTES = 64 * 1024;
/** Task size: the measured sweet spot on these machines (bench/copy), inside QEMU's 256 KiB–4 MiB range. */
export const DEFAULT_MAX_CHUNK_BYTES = 4 * MiB;
/** Pieces a worker moves between two looks at its cancel word. */
export const DEFAULT_WORKER_CHUNK_BYTES = 1 * MiB;
/** Bytes in flight at most, whatever the disk size (QEMU's BLOCK_COPY_MAX_MEM). */
export const DEFAULT_MAX_IN_FLIGHT_BYTES = 128 * MiB;
export const DEFAULT_RETRY_ATTEMPTS = 3;
export const DEFAULT_RETRY_BACKOFF_MS = 20;

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
  /**
   * Let workers copy file-to-file data in the kernel (copy_file_range) when nothing transforms
   * it (not compressed). Default true; false forces pread/pwrite (for comparison).
   */
  inKernelCopy?: boolean;
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

/**
 * Block-copy, coordinator side (QEMU's block-copy, with worker threads): the public face of a
 * copy, composed of the task queue (claims against the copy bitmap, `task-queue.ts`), the lane
 * scheduler (`lane-scheduler.ts`) and the task lifecycle (start, settle, retry, stop;
 * `task-lifecycle.ts`). This object holds the run state: run() and its waiters, pause.
 *
 * Coordinator-only object. The copy bitmap is a SharedBitmap (workers could read it), but only
 * this copy clears its bits (a claim in the task queue, discard()): a task claims clusters by clearing their bits and registering
 * in the task table, in one synchronous step, and on failure or cancellation sets the bits of
 * whatever it did not copy again. Others may set bits at any time (more to copy).
 *
 * Events: `progress` (CopyProgress), `range-done` (offset, bytes: on the target now),
 * `discarded-written` (offset, bytes), `retry` ({ offset, bytes, attempt, error }) and
 * `settled:<task id>` (RangeOutcome).
 */
export class BlockCopy extends EventEmitter {
  readonly copyBitmap: SharedBitmap;
  readonly clusterBytes: number;
  readonly maxChunkBytes: number;
  readonly length: number;
  readonly #target: CopyEndpoint;
  readonly #statusWindow: StatusWindow;
  readonly #queue: TaskQueue;
  readonly #scheduler: LaneScheduler;
  readonly #lifecycle: TaskLifecycle;
  /** Background copying is on while run() is active. */
  #background = false;
  /** While paused, no background or retry task starts; copy-before-write still does. */
  #paused = false;
  #resumeWaiters: (() => void)[] = [];
  #idleWaiters: (() => void)[] = [];

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
    const { source, target, pool, compress } = opts;
    this.#target = target;
    this.#statusWindow = new StatusWindow(source.io, this.length);
    if (compress && compress.clusterBytes !== this.clusterBytes) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot copy compressed: the copy cluster size ${this.clusterBytes} must equal the target's cluster size ${compress.clusterBytes}`);
    }
    if (opts.singleTask && pool && pool.workers !== 1) {
      throw new ShearError('ERR_INVALID_ARGUMENT', 'Cannot run single-task mode on a pool of several workers: give it a pool of one');
    }
    const maxTasks = opts.singleTask ? 1 : (opts.maxTasks ?? (pool ? pool.workers * 2 : 4));
    const rate = new RateLimiter(opts.speed ?? 0);
    // One cancel word per task slot; copy-before-write tasks may exceed the slot count, so
    // leave room for them.
    this.#queue = new TaskQueue(this.copyBitmap, this.clusterBytes, maxTasks + 64);
    const copy = this;
    this.#scheduler = new LaneScheduler(
      this.#queue,
      {
        bitmap: this.copyBitmap,
        length: this.length,
        maxChunkBytes: this.maxChunkBytes,
        maxTasks,
        maxInFlightBytes: opts.maxInFlightBytes ?? DEFAULT_MAX_IN_FLIGHT_BYTES,
        rate,
        prefer: opts.prefer,
        batchable: () => !!pool && !compress && !!source.mapping?.mapRead && !!target.mapping?.mapWrite,
      },
      {
        get paused() {
          return copy.#paused;
        },
        get cutting() {
          return copy.#background && !copy.#lifecycle.failure;
        },
        start: (t: Task) => this.#lifecycle.start(t),
        woke: () => this.#checkIdle(),
      },
    );
    this.#lifecycle = new TaskLifecycle(
      this.#queue,
      this,
      {
        source,
        target,
        pool,
        compress,
        bitmap: this.copyBitmap,
        clusterBytes: this.clusterBytes,
        chunkBytes: Math.min(DEFAULT_WORKER_CHUNK_BYTES, this.maxChunkBytes),
        dropCache: opts.dropCache ?? true,
        inKernelCopy: (opts.inKernelCopy ?? true) && !compress,
        statusWindow: this.#statusWindow,
        skipUnallocated: opts.skipUnallocated ?? false,
        targetIsZero: opts.targetIsZero ?? false,
        retryAttempts: opts.retryAttempts ?? DEFAULT_RETRY_ATTEMPTS,
        retryBackoffMs: opts.retryBackoffMs ?? DEFAULT_RETRY_BACKOFF_MS,
        faultInjection: opts.faultInjection,
      },
      { pump: () => this.#scheduler.pump(), checkIdle: () => this.#checkIdle() },
    );
  }

  get speed(): number {
    return this.#scheduler.rate.speed;
  }

  /** Changes the background rate while running. */
  setSpeed(bytesPerSec: number): void {
    this.#scheduler.rate.setSpeed(bytesPerSec);
    this.#scheduler.pump();
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
    this.#scheduler.pump();
  }

  get progress(): CopyProgress {
    return this.#lifecycle.progress;
  }

  /** Tasks claimed and not settled, for diagnostics and tests. */
  get inFlightTasks(): number {
    return this.#queue.size;
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
    this.#lifecycle.clearFailure();
    this.#statusWindow.reset();
    this.#scheduler.restartScan();
    const onAbort = () => {
      this.#lifecycle.stop(new ShearError('ERR_ABORTED', 'Cannot finish block-copy: it was cancelled', {}, { cause: signal!.reason }));
      // A paused copy wakes up to see the cancellation.
      for (const w of this.#resumeWaiters.splice(0)) w();
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      for (;;) {
        this.#scheduler.pump();
        await this.#idle();
        if (this.#lifecycle.failure) throw this.#lifecycle.failure;
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
      this.#scheduler.clearWake();
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
        const task = this.#queue.claim(area.offset, area.bytes, 'cbw');
        mine.push(new Promise((resolve) => this.once(`settled:${task.id}`, (o: RangeOutcome) => {
          if (!o.ok && !failed) failed = o.error;
          resolve();
        })));
      }
      // Tasks of others in the range that are still waiting get promoted, so the guest does
      // not wait behind background work or a retry back-off.
      for (const t of [...this.#queue.lanes.retry, ...this.#queue.lanes.background]) {
        if (t.offset < end && start < t.offset + t.bytes) this.#queue.promote(t);
      }
      this.#scheduler.pump();
      // Between the claims above and this check nothing else ran: no conflict means every
      // cluster of the range is copied (or was discarded).
      const waited = await this.#queue.waitOne(start, end - start, opts.signal ? { signal: opts.signal } : {});
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
    for (const t of this.#queue.all()) {
      const from = Math.max(start, t.offset);
      const to = Math.min(end, t.offset + t.bytes);
      if (to <= from) continue;
      t.discarded.push([from, to - from]);
      if (from === t.offset && to === t.offset + t.bytes) {
        if (t.state === 'queued') {
          this.#queue.dequeue(t);
          dropped += t.bytes;
          this.#lifecycle.settle(t, { ok: true, copiedBytes: 0, skippedBytes: 0 }, true);
        } else {
          this.#queue.cancel(t);
        }
      }
    }
    this.#scheduler.pump();
    return dropped;
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
    if (this.#background && !this.#lifecycle.failure && !this.#paused && this.#workLeft()) {
      // Work is left but nothing could start now (rate limit): the wake timer will pump.
      if (this.#scheduler.waking) return;
      this.#scheduler.pump();
      if (this.inFlightTasks > 0) return;
    }
    for (const w of this.#idleWaiters.splice(0)) w();
  }
}
