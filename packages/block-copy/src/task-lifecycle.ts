import type { EventEmitter } from 'node:events';
import { performance } from 'node:perf_hooks';
import { ShearError, alignDown } from '@shear/base';
import type { SharedBitmap } from '@shear/bitmap';
import { executeParts, executeRange, type CompressTarget, type CopyEndpoint, type ExecuteContext, type RangeOutcome } from './execute-range.js';
import type { CopyWorkerPool } from './pool.js';
import type { StatusWindow } from './status-window.js';
import { taskBytes, type Task, type TaskQueue } from './task-queue.js';

/** A range copied again after an I/O error: the payload of BlockCopy's 'retry' event. */
export interface CopyRetry {
  offset: number;
  bytes: number;
  /** 1 for the first retry. */
  attempt: number;
  error: ShearError;
}

/** Copy-before-write copies up to this size run on the coordinator, not on a worker. */
const INLINE_CBW_MAX_BYTES = 256 * 1024;

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

export interface TaskLifecycleOptions {
  source: CopyEndpoint;
  target: CopyEndpoint;
  pool: CopyWorkerPool | undefined;
  compress: CompressTarget | undefined;
  bitmap: SharedBitmap;
  clusterBytes: number;
  /** Pieces a worker moves between two looks at its cancel word. */
  chunkBytes: number;
  dropCache: boolean;
  inKernelCopy: boolean;
  /** Shared block status of the source for background and retry tasks (see StatusWindow). */
  statusWindow: StatusWindow | undefined;
  skipUnallocated: boolean;
  targetIsZero: boolean;
  retryAttempts: number;
  retryBackoffMs: number;
  faultInjection: { killWorkerAfterBytes: number; tasks: number } | undefined;
}

/** What the lifecycle asks of the copy that owns it, after a task settled or the copy stopped. */
export interface LifecycleHost {
  /** Starts whatever may start now. */
  pump(): void;
  /** Wakes run() when nothing is left in flight. */
  checkIdle(): void;
}

/** Bytes copied and skipped so far, and the rate over the last few seconds. */
class CopyMeter {
  copiedBytes = 0;
  skippedBytes = 0;
  #window: { t: number; bytes: number }[] = [];

  add(copiedBytes: number, skippedBytes: number): void {
    this.copiedBytes += copiedBytes;
    this.skippedBytes += skippedBytes;
    const now = performance.now();
    this.#window.push({ t: now, bytes: copiedBytes + skippedBytes });
    while (this.#window.length > 0 && this.#window[0]!.t < now - 3000) this.#window.shift();
  }

  get bytesPerSec(): number {
    const w = this.#window;
    if (w.length < 2) return 0;
    const span = (w.at(-1)!.t - w[0]!.t) / 1000;
    const bytes = w.slice(1).reduce((s, x) => s + x.bytes, 0);
    return span > 0 ? bytes / span : 0;
  }
}

/**
 * A task from start to settle: runs it (inline or on a worker), then settles its outcome:
 * progress, the `range-done` / `discarded-written` / `retry` / `settled:<id>` events on the
 * copy's emitter, a retry with back-off for an I/O error, else the clusters not copied given
 * back and the copy stopped. Owns the copy's failure: once set, nothing new is cut.
 */
export class TaskLifecycle {
  readonly #queue: TaskQueue;
  readonly #events: EventEmitter;
  readonly #host: LifecycleHost;
  readonly #o: TaskLifecycleOptions;
  readonly #meter = new CopyMeter();
  #faultsLeft: number;
  #failure: ShearError | undefined;

  constructor(queue: TaskQueue, events: EventEmitter, opts: TaskLifecycleOptions, host: LifecycleHost) {
    this.#queue = queue;
    this.#events = events;
    this.#o = opts;
    this.#host = host;
    this.#faultsLeft = opts.faultInjection?.tasks ?? 0;
  }

  /** Why the copy stopped (a failure after retries, or a cancel); undefined while it goes on. */
  get failure(): ShearError | undefined {
    return this.#failure;
  }

  /** A new run() starts clean. */
  clearFailure(): void {
    this.#failure = undefined;
  }

  get progress(): CopyProgress {
    const m = this.#meter;
    const done = m.copiedBytes + m.skippedBytes;
    let pending = this.#o.bitmap.countBytes();
    for (const t of this.#queue.all()) pending += taskBytes(t);
    return {
      doneBytes: done,
      copiedBytes: m.copiedBytes,
      skippedBytes: m.skippedBytes,
      totalBytes: done + pending,
      bytesPerSec: m.bytesPerSec,
    };
  }

  start(t: Task): void {
    const o = this.#o;
    const bytes = taskBytes(t);
    this.#queue.begin(t, bytes);
    // A guest waits on a small copy-before-write copy: done here, it skips the round trip to a
    // worker thread and the queue behind background tasks there (writer p99 with the filter
    // halved, and during a push backup 0.8x with twice the guest throughput; nbd bench, latency
    // part). Big copies still go to the workers.
    const inline = !o.pool || (t.lane === 'cbw' && bytes <= INLINE_CBW_MAX_BYTES);
    // Only a copy run here can wait inside its target (a full fleecing cache); a worker's copy
    // sees the cancel word.
    if (inline) t.abort = new AbortController();
    const ctx: ExecuteContext = {
      source: o.source,
      target: o.target,
      pool: inline ? undefined : o.pool,
      ...(t.abort ? { signal: t.abort.signal } : {}),
      chunkBytes: o.chunkBytes,
      // A guest write waits on copy-before-write tasks: they do not wait for writeback (and
      // what they preserve is often read back soon, by a pull), so only background copies
      // pace the page cache.
      dropCache: o.dropCache && t.lane !== 'cbw',
      inKernelCopy: o.inKernelCopy,
      // A guest waits on copy-before-write tasks: they ask for exactly their range, fresh.
      statusWindow: t.lane === 'cbw' ? undefined : o.statusWindow,
      skipUnallocated: o.skipUnallocated,
      targetIsZero: o.targetIsZero,
      cancel: this.#queue.cancelWords,
      cancelIndex: t.cancelIndex,
      compress: o.compress,
      guestWaiting: inline && t.lane === 'cbw',
      faultExitAfterBytes: this.#faultsLeft-- > 0 ? o.faultInjection?.killWorkerAfterBytes ?? 0 : undefined,
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
        this.#queue.end(t, bytes);
        this.settle(t, outcome, t.cancelled && t.discarded.length > 0);
      });
  }

  /** `discarded`: a discard took the task's whole range, so nothing of it is owed any more. */
  settle(t: Task, outcome: RangeOutcome, discarded = false): void {
    const q = this.#queue;
    q.releaseCancel(t);
    this.#meter.add(outcome.copiedBytes, outcome.skippedBytes);
    // Which clusters now hold their data on the target (copy-before-write reads them there).
    if (outcome.ok && t.parts && !discarded) {
      for (const [o, b] of t.parts) this.#events.emit('range-done', o, b);
    } else {
      const doneBytes = outcome.ok ? t.bytes : alignDown(outcome.doneBytes, this.#o.clusterBytes);
      if (doneBytes > 0 && !discarded) this.#events.emit('range-done', t.offset, doneBytes);
    }
    // A discard does not stop a task mid-write: what it wrote into a discarded range may have
    // landed after the owner freed that range on the target, so the owner frees it again.
    for (const [o, b] of t.discarded) this.#events.emit('discarded-written', o, b);
    if (!outcome.ok && !discarded) {
      // Clusters wholly before doneBytes are in place; the rest go back (or are retried). A
      // batch reports nothing done on failure: it is given back or retried whole.
      const doneEnd = t.parts ? t.offset : t.offset + alignDown(outcome.doneBytes, this.#o.clusterBytes);
      // Only I/O errors are worth retrying (a flaky disk, a worker that died); a full disk or a
      // refused request fails the same way again.
      const retry = outcome.error.kind === 'io' && !t.cancelled && t.attempts < this.#o.retryAttempts && !this.#failure;
      if (retry && doneEnd < t.offset + t.bytes) {
        t.attempts++;
        q.retarget(t, doneEnd, t.lane === 'cbw' ? 'cbw' : 'retry', performance.now() + this.#o.retryBackoffMs * 2 ** (t.attempts - 1));
        const retried: CopyRetry = { offset: t.offset, bytes: t.bytes, attempt: t.attempts, error: outcome.error };
        this.#events.emit('retry', retried);
        q.enqueue(t);
        this.#host.pump();
        return;
      }
      q.giveBack(t, doneEnd, t.offset + t.bytes);
      if (outcome.error.code !== 'ERR_ABORTED' && !t.cancelled) this.stop(outcome.error);
    }
    t.req.remove();
    // A task cancelled because a discard took its whole range has nothing left to copy: whoever
    // waits for the range (a guest write's copy-before-write) may go on, whatever the cancel
    // made the executor report.
    this.#events.emit(`settled:${t.id}`, discarded ? { ok: true, copiedBytes: 0, skippedBytes: 0 } : outcome);
    this.#events.emit('progress', this.progress);
    this.#host.pump();
    this.#host.checkIdle();
  }

  /** Stops background work after a failure or cancel; running tasks finish or are cancelled. */
  stop(reason: ShearError): void {
    if (!this.#failure) this.#failure = reason;
    const q = this.#queue;
    for (const lane of ['retry', 'background'] as const) {
      for (const t of q.lanes[lane].splice(0)) {
        q.giveBack(t, t.offset, t.offset + t.bytes);
        t.req.remove();
        this.#events.emit(`settled:${t.id}`, { ok: false, error: reason, doneBytes: 0, copiedBytes: 0, skippedBytes: 0 });
      }
    }
    if (reason.code === 'ERR_ABORTED') for (const t of q.running) if (t.lane !== 'cbw') q.signalCancel(t);
    this.#host.checkIdle();
  }
}
