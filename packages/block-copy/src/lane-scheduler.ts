import { performance } from 'node:perf_hooks';
import { MiB } from '@shear/base';
import type { SharedBitmap } from '@shear/bitmap';
import type { RateLimiter } from './rate-limit.js';
import { taskBytes, type Task, type TaskQueue } from './task-queue.js';

/** A batch gathers dirty ranges within this span of the disk... */
const BATCH_SPAN_BYTES = 64 * MiB;
/** ...and at most this many of them. */
const BATCH_MAX_PARTS = 128;

/** What the scheduler asks of the copy that owns it. */
export interface SchedulerHost {
  /** While paused, no background or retry task starts; copy-before-write still does. */
  readonly paused: boolean;
  /** New background tasks may be cut from the bitmap: run() is active and nothing failed. */
  readonly cutting: boolean;
  /** Runs a task the scheduler took out of its lane. */
  start(t: Task): void;
  /** The wake timer fired and pumped. */
  woke(): void;
}

export interface LaneSchedulerOptions {
  bitmap: SharedBitmap;
  length: number;
  maxChunkBytes: number;
  maxTasks: number;
  maxInFlightBytes: number;
  /** Paces the background and retry lanes. */
  rate: RateLimiter;
  prefer: (() => Iterable<{ offset: number; bytes: number }>) | undefined;
  /** Whether scattered small areas may go out as one batch (worker threads, both sides mappable). */
  batchable: () => boolean;
}

/**
 * Decides which task starts when. Three lanes (copy-before-write, retry, background): a free
 * slot goes to the highest non-empty lane; background tasks are cut from the bitmap only when a
 * slot is free, so clusters not yet claimed stay available to copy-before-write. Copy-before-write
 * ignores the rate limit. Slots are limited by task count and by bytes in flight. What cannot
 * start yet (a retry's back-off, the rate) arms one wake timer.
 */
export class LaneScheduler {
  readonly rate: RateLimiter;
  readonly #queue: TaskQueue;
  readonly #host: SchedulerHost;
  readonly #bitmap: SharedBitmap;
  readonly #length: number;
  readonly #maxChunkBytes: number;
  readonly #maxTasks: number;
  readonly #maxInFlightBytes: number;
  readonly #prefer: LaneSchedulerOptions['prefer'];
  readonly #batchable: () => boolean;
  /** Where the background scan goes on from. */
  #scanAt = 0;
  #wakeTimer: NodeJS.Timeout | undefined;
  #wakeAt = Infinity;

  constructor(queue: TaskQueue, opts: LaneSchedulerOptions, host: SchedulerHost) {
    this.#queue = queue;
    this.#host = host;
    this.#bitmap = opts.bitmap;
    this.#length = opts.length;
    this.#maxChunkBytes = opts.maxChunkBytes;
    this.#maxTasks = opts.maxTasks;
    this.#maxInFlightBytes = opts.maxInFlightBytes;
    this.rate = opts.rate;
    this.#prefer = opts.prefer;
    this.#batchable = opts.batchable;
  }

  /** A wake timer is armed: work is left that could not start yet. */
  get waking(): boolean {
    return this.#wakeTimer !== undefined;
  }

  /** The next background scan starts at the beginning of the disk. */
  restartScan(): void {
    this.#scanAt = 0;
  }

  /** Starts tasks while slots are free and a lane has one that may go. */
  pump(): void {
    const now = performance.now();
    while (this.#queue.running.size < this.#maxTasks) {
      const task = this.#nextTask(now);
      if (!task) break;
      this.#host.start(task);
    }
  }

  clearWake(): void {
    if (this.#wakeTimer) clearTimeout(this.#wakeTimer);
    this.#wakeTimer = undefined;
    this.#wakeAt = Infinity;
  }

  #budgetOk(t: Task): boolean {
    return this.#queue.running.size === 0 || this.#queue.inFlightBytes + taskBytes(t) <= this.#maxInFlightBytes;
  }

  #nextTask(now: number): Task | undefined {
    const lanes = this.#queue.lanes;
    const cbw = lanes.cbw[0];
    if (cbw) return this.#budgetOk(cbw) ? lanes.cbw.shift() : undefined;
    if (this.#host.paused) return undefined;
    const retry = lanes.retry.find((t) => t.notBefore <= now);
    const waitingRetry = lanes.retry.reduce((m, t) => Math.min(m, t.notBefore), Infinity);
    if (waitingRetry !== Infinity && !retry) this.#wakeIn(waitingRetry - now);
    // A background task claimed earlier but held back (budget, rate) goes before a new claim.
    let candidate: Task | undefined = retry ?? lanes.background[0];
    if (!candidate && this.#host.cutting) {
      const area = this.#nextBackgroundArea();
      if (area) {
        const parts = this.#gatherBatch(area);
        candidate = parts
          ? this.#queue.claim(parts[0]![0], parts.at(-1)![0] + parts.at(-1)![1] - parts[0]![0], 'background', parts)
          : this.#queue.claim(area.offset, area.bytes, 'background');
      }
    }
    if (!candidate) return undefined;
    if (!this.#budgetOk(candidate)) return undefined;
    const delay = this.rate.take(taskBytes(candidate), now);
    if (delay > 0) {
      this.#wakeIn(delay);
      return undefined;
    }
    this.#queue.dequeue(candidate);
    return candidate;
  }

  #nextBackgroundArea() {
    if (this.#prefer) {
      for (const r of this.#prefer()) {
        const area = this.#bitmap.nextDirtyArea(r.offset, Math.min(this.#length, r.offset + r.bytes), this.#maxChunkBytes);
        if (area) return area;
      }
    }
    let area = this.#bitmap.nextDirtyArea(this.#scanAt, this.#length, this.#maxChunkBytes);
    if (!area && this.#scanAt > 0) area = this.#bitmap.nextDirtyArea(0, this.#length, this.#maxChunkBytes);
    if (area) this.#scanAt = area.offset + area.bytes;
    return area;
  }

  /**
   * Extends a small dirty area with the next ones nearby into one batch, when worker threads
   * move the data (the batch becomes one worker request). Returns undefined for a single area.
   */
  #gatherBatch(first: { offset: number; bytes: number }): [number, number][] | undefined {
    if (!this.#batchable()) return undefined;
    if (first.bytes >= this.#maxChunkBytes) return undefined;
    const parts: [number, number][] = [[first.offset, first.bytes]];
    let total = first.bytes;
    const limit = Math.min(this.#length, first.offset + BATCH_SPAN_BYTES);
    let at = first.offset + first.bytes;
    while (total < this.#maxChunkBytes && parts.length < BATCH_MAX_PARTS && at < limit) {
      const next = this.#bitmap.nextDirtyArea(at, limit, this.#maxChunkBytes - total);
      if (!next) break;
      parts.push([next.offset, next.bytes]);
      total += next.bytes;
      at = next.offset + next.bytes;
    }
    if (parts.length === 1) return undefined;
    this.#scanAt = Math.max(this.#scanAt, at);
    return parts;
  }

  #wakeIn(ms: number): void {
    const at = performance.now() + Math.max(1, ms);
    if (at >= this.#wakeAt) return;
    this.clearWake();
    this.#wakeAt = at;
    this.#wakeTimer = setTimeout(() => {
      this.#wakeTimer = undefined;
      this.#wakeAt = Infinity;
      this.pump();
      this.#host.woke();
    }, Math.max(1, ms));
  }
}
