import { alignUp } from '@shear/base';
import type { SharedBitmap } from '@shear/bitmap';
import { RequestTable, type InFlightRequest, type WaitOptions } from '@shear/reqlist';

/** Priority lanes, highest first. */
export type Lane = 'cbw' | 'retry' | 'background';
const LANES: Lane[] = ['cbw', 'retry', 'background'];

/**
 * One claimed range. From claim to settle, its clusters are absent from the copy bitmap and
 * the task is registered in the task table, so a cluster is always either dirty in the bitmap
 * or owned by exactly one task that will give it back if it does not copy it.
 */
export interface Task {
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

/** The bytes a task claimed: a batch claimed its parts, not the clean gaps between them. */
export function taskBytes(t: Task): number {
  return t.parts ? t.parts.reduce((n, [, b]) => n + b, 0) : t.bytes;
}

/**
 * The claimed tasks: queued in their lanes or running, registered in the task table, each
 * running one holding a cancel word the worker copying it looks at. This is the one place that
 * clears bits of the copy bitmap (claim) and sets back what a task did not copy (give back), so
 * the claim invariant above lives here. Coordinator-only.
 */
export class TaskQueue {
  readonly lanes: Record<Lane, Task[]> = { cbw: [], retry: [], background: [] };
  readonly running = new Set<Task>();
  /** Bytes of the running tasks (the in-flight budget). */
  inFlightBytes = 0;
  /** One word per task slot, shared with the workers: non-zero asks the task to stop. */
  readonly cancelWords: Int32Array;
  readonly #bitmap: SharedBitmap;
  readonly #clusterBytes: number;
  readonly #table = new RequestTable();
  readonly #freeCancel: number[] = [];
  #nextId = 1;

  constructor(bitmap: SharedBitmap, clusterBytes: number, slots: number) {
    this.#bitmap = bitmap;
    this.#clusterBytes = clusterBytes;
    this.cancelWords = new Int32Array(new SharedArrayBuffer(4 * slots));
    for (let i = slots - 1; i >= 0; i--) this.#freeCancel.push(i);
  }

  /** Tasks claimed and not settled. */
  get size(): number {
    return this.running.size + LANES.reduce((n, l) => n + this.lanes[l].length, 0);
  }

  *all(): Generator<Task> {
    yield* this.running;
    for (const l of LANES) yield* this.lanes[l];
  }

  /** Takes the range (or only the parts of a batch) out of the copy bitmap and queues it. */
  claim(offset: number, bytes: number, lane: Lane, parts?: [number, number][]): Task {
    if (parts) for (const [o, b] of parts) this.#bitmap.reset(o, b);
    else this.#bitmap.reset(offset, bytes);
    const task: Task = {
      ...(parts ? { parts } : {}),
      id: this.#nextId++,
      offset,
      bytes,
      lane,
      attempts: 0,
      notBefore: 0,
      state: 'queued',
      req: this.#table.add(offset, bytes, 'copy-task'),
      cancelIndex: -1,
      discarded: [],
      cancelled: false,
    };
    this.lanes[lane].push(task);
    return task;
  }

  /** Moves a queued task to the copy-before-write lane: a guest write waits for it. */
  promote(t: Task): void {
    this.dequeue(t);
    t.lane = 'cbw';
    t.notBefore = 0;
    this.lanes.cbw.push(t);
  }

  dequeue(t: Task): void {
    const lane = this.lanes[t.lane];
    const i = lane.indexOf(t);
    if (i >= 0) lane.splice(i, 1);
  }

  /**
   * Shrinks a failed task to what it has left, from `offset` on, for another attempt; the
   * caller queues it again (enqueue) once it has told the listeners.
   */
  retarget(t: Task, offset: number, lane: Lane, notBefore: number): void {
    t.bytes = t.offset + t.bytes - offset;
    t.offset = offset;
    t.req.remove();
    t.req = this.#table.add(t.offset, t.bytes, 'copy-task');
    t.state = 'queued';
    t.lane = lane;
    t.notBefore = notBefore;
  }

  enqueue(t: Task): void {
    this.lanes[t.lane].push(t);
  }

  /** A task starts: it takes a cancel word (already set if it was cancelled while queued). */
  begin(t: Task, bytes: number): void {
    t.state = 'running';
    t.cancelIndex = this.#freeCancel.pop()!;
    Atomics.store(this.cancelWords, t.cancelIndex, t.cancelled ? 1 : 0);
    this.running.add(t);
    this.inFlightBytes += bytes;
  }

  /** A task's executor returned (its outcome is not settled yet). */
  end(t: Task, bytes: number): void {
    this.running.delete(t);
    this.inFlightBytes -= bytes;
  }

  releaseCancel(t: Task): void {
    if (t.cancelIndex < 0) return;
    Atomics.store(this.cancelWords, t.cancelIndex, 0);
    this.#freeCancel.push(t.cancelIndex);
    t.cancelIndex = -1;
  }

  /** Asks a running task's worker to stop at its next look at the cancel word. */
  signalCancel(t: Task): void {
    Atomics.store(this.cancelWords, t.cancelIndex, 1);
  }

  /** Cancels a running task for good (a discard took its whole range). */
  cancel(t: Task): void {
    t.cancelled = true;
    this.signalCancel(t);
    t.abort?.abort();
  }

  /** Gives back the clusters of [from, to) that no discard took away. */
  giveBack(t: Task, from: number, to: number): void {
    const start = alignUp(from, this.#clusterBytes);
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
        this.#bitmap.set(s, e - s);
        continue;
      }
      // A batch gives back only what it claimed, not the clean gaps between its parts.
      for (const [o, b] of t.parts) {
        const from = Math.max(s, o);
        const to = Math.min(e, o + b);
        if (to > from) this.#bitmap.set(from, to - from);
      }
    }
  }

  /** Waits for one task overlapping the range; false when none does. */
  waitOne(offset: number, bytes: number, opts: WaitOptions): Promise<boolean> {
    return this.#table.waitOne(offset, bytes, 'cbw-copy', opts);
  }
}
