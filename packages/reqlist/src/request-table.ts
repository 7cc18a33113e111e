import { ShearError, throwIfAborted } from '@shear/base';
import { type RequestKind, isRequestKind, kindsConflict } from './request-kind.js';

export interface AddOptions {
  /** Who holds the range (job id, export name, ...): shown in diagnostics and errors only. */
  label?: string;
}

export interface WaitOptions {
  /** Aborting rejects the wait with ERR_ABORTED and unregisters the waiter. */
  signal?: AbortSignal;
}

export interface AcquireOptions extends AddOptions, WaitOptions {}

/** What a request looks like in logs and diagnostics. */
export interface RequestInfo {
  offset: number;
  bytes: number;
  kind: RequestKind;
  label?: string;
  waiters: number;
}

/** State shared by a table and the requests registered in it. */
interface TableState {
  /** Unordered; a request knows its slot so removal is a swap with the last entry. */
  readonly entries: InFlightRequest[];
  waiters: number;
}

/** A caller parked until a request stops overlapping its range (offset, end). */
interface Waiter {
  readonly offset: number;
  readonly end: number;
  readonly signal: AbortSignal | undefined;
  readonly resolve: () => void;
  readonly onAbort: () => void;
}

// Friend access for RequestTable to InFlightRequest's private parts, assigned in its static block.
let createRequest: (state: TableState, offset: number, bytes: number, kind: RequestKind, label: string | undefined) => InFlightRequest;
let awaitRelease: (req: InFlightRequest, offset: number, end: number, signal: AbortSignal | undefined) => Promise<void>;

/**
 * One registered byte range. `offset` and `kind` never change; `bytes` only shrinks. Removing
 * (or shrinking) wakes exactly the waiters parked on this request that it no longer blocks.
 */
export class InFlightRequest {
  readonly offset: number;
  readonly kind: RequestKind;
  readonly label: string | undefined;
  #end: number;
  /** undefined once removed. */
  #state: TableState | undefined;
  #slot: number;
  /** Created on the first waiter: most requests never get one. */
  #waiters: Set<Waiter> | undefined;

  static {
    createRequest = (state, offset, bytes, kind, label) => new InFlightRequest(state, offset, bytes, kind, label);
    awaitRelease = (req, offset, end, signal) => req.#awaitRelease(offset, end, signal);
  }

  private constructor(state: TableState, offset: number, bytes: number, kind: RequestKind, label: string | undefined) {
    this.offset = offset;
    this.kind = kind;
    this.label = label;
    this.#end = offset + bytes;
    this.#state = state;
    this.#slot = state.entries.length;
    state.entries.push(this);
  }

  get bytes(): number {
    return this.#end - this.offset;
  }

  /** Exclusive end of the range: offset + bytes. */
  get end(): number {
    return this.#end;
  }

  /** False once removed. */
  get active(): boolean {
    return this.#state !== undefined;
  }

  /** How many callers are parked on this request. */
  get waiterCount(): number {
    return this.#waiters?.size ?? 0;
  }

  /**
   * Gives back the tail of the range: the request now covers (offset, newBytes). Waiters whose
   * range no longer overlaps are woken; the others stay parked. `newBytes === bytes` does nothing.
   * @throws ERR_INVALID_ARGUMENT unless 0 < newBytes <= bytes, or if the request was removed
   */
  shrink(newBytes: number): void {
    if (this.#state === undefined) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot shrink request (${this.offset}, ${this.bytes}): it was removed`, {
        offset: this.offset,
        bytes: this.bytes,
      });
    }
    if (!Number.isSafeInteger(newBytes) || newBytes <= 0 || newBytes > this.bytes) {
      throw new ShearError(
        'ERR_INVALID_ARGUMENT',
        `Cannot shrink request (${this.offset}, ${this.bytes}) to ${newBytes} bytes: a request only shrinks from its end and keeps at least one byte`,
        { offset: this.offset, bytes: this.bytes },
      );
    }
    this.#end = this.offset + newBytes;
    const waiters = this.#waiters;
    if (waiters === undefined) return;
    for (const w of waiters) {
      // Only the tail went away, so a waiter is free exactly when it starts at or past the new end.
      if (w.offset >= this.#end) this.#wake(w);
    }
  }

  /** Unregisters the range and wakes every waiter parked on it. Idempotent. */
  remove(): void {
    const state = this.#state;
    if (state === undefined) return;
    const entries = state.entries;
    const last = entries.pop()!;
    if (last !== this) {
      entries[this.#slot] = last;
      last.#slot = this.#slot;
    }
    this.#state = undefined;
    this.#slot = -1;
    const waiters = this.#waiters;
    if (waiters === undefined) return;
    for (const w of waiters) this.#wake(w, state);
  }

  [Symbol.dispose](): void {
    this.remove();
  }

  toJSON(): RequestInfo {
    const info: RequestInfo = { offset: this.offset, bytes: this.bytes, kind: this.kind, waiters: this.waiterCount };
    if (this.label !== undefined) info.label = this.label;
    return info;
  }

  #wake(w: Waiter, state: TableState | undefined = this.#state): void {
    this.#waiters!.delete(w);
    if (state) state.waiters--;
    w.signal?.removeEventListener('abort', w.onAbort);
    w.resolve();
  }

  /**
   * Parks the caller until this request is removed or no longer overlaps (offset, end).
   * Registration is synchronous, so a wake-up cannot be lost between the caller's conflict
   * check and this call.
   */
  #awaitRelease(offset: number, end: number, signal: AbortSignal | undefined): Promise<void> {
    const state = this.#state!;
    const waiters = (this.#waiters ??= new Set());
    return new Promise<void>((resolve, reject) => {
      const w: Waiter = {
        offset,
        end,
        signal,
        resolve,
        onAbort: () => {
          if (!waiters.delete(w)) return;
          state.waiters--;
          reject(
            new ShearError(
              'ERR_ABORTED',
              `Cannot wait for request (${this.offset}, ${this.bytes}) to release (${offset}, ${end - offset}): it was cancelled`,
              { offset, bytes: end - offset },
              { cause: signal?.reason },
            ),
          );
        },
      };
      waiters.add(w);
      state.waiters++;
      signal?.addEventListener('abort', w.onAbort, { once: true });
    });
  }
}

/**
 * The serialising request table of one node (or one CBW filter): in-flight byte ranges with
 * a kind, and the callers waiting for them. Owned by the coordinator thread; every method
 * that checks or changes the table is synchronous, so nothing runs between a check and the
 * registration that depends on it.
 */
export class RequestTable implements Iterable<InFlightRequest> {
  readonly #state: TableState = { entries: [], waiters: 0 };

  /** Number of registered requests. */
  get size(): number {
    return this.#state.entries.length;
  }

  /** Number of callers parked in waitOne / waitAll / acquire across the whole table. */
  get waiterCount(): number {
    return this.#state.waiters;
  }

  /**
   * Registers (offset, bytes) as in flight. Does not look for conflicts: callers check first
   * (findConflict / waitAll in the same synchronous run), or use acquire / addExclusive.
   * @throws ERR_INVALID_ARGUMENT for a range that is not positive-length safe integers, or an unknown kind
   */
  add(offset: number, bytes: number, kind: RequestKind, opts?: AddOptions): InFlightRequest {
    checkRange(offset, bytes, 'register', true);
    if (!isRequestKind(kind)) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot register request (${offset}, ${bytes}): unknown kind "${String(kind)}"`, { offset, bytes });
    }
    return createRequest(this.#state, offset, bytes, kind, opts?.label);
  }

  /**
   * add() after checking that nothing conflicts.
   * @throws ERR_REQLIST_CONFLICT naming the conflicting request
   */
  addExclusive(offset: number, bytes: number, kind: RequestKind, opts?: AddOptions): InFlightRequest {
    const conflict = this.findConflict(offset, bytes, kind);
    if (conflict !== undefined) {
      const holder = conflict.label === undefined ? '' : ` held by "${conflict.label}"`;
      throw new ShearError(
        'ERR_REQLIST_CONFLICT',
        `Cannot register ${kind} request (${offset}, ${bytes}): it overlaps ${conflict.kind} request (${conflict.offset}, ${conflict.bytes})${holder}`,
        { offset, bytes },
      );
    }
    return this.add(offset, bytes, kind, opts);
  }

  /**
   * A registered request that overlaps (offset, bytes) and conflicts with `kind` (with no
   * kind, any overlapping request). Which one, when several do, is unspecified. Ranges that
   * only touch (one's end equals the other's offset) do not overlap; an empty range overlaps
   * nothing.
   */
  findConflict(offset: number, bytes: number, kind?: RequestKind): InFlightRequest | undefined {
    checkRange(offset, bytes, 'look up', false);
    if (bytes === 0) return undefined;
    const end = offset + bytes;
    // A linear scan: at 64-256 entries it costs less than keeping the entries sorted
    // (bench/micro/reqlist.bench.ts), since every request is added and removed once.
    const entries = this.#state.entries;
    for (let i = 0; i < entries.length; i++) {
      const r = entries[i]!;
      if (r.offset < end && offset < r.end && (kind === undefined || kindsConflict(kind, r.kind))) return r;
    }
    return undefined;
  }

  /**
   * Waits for one conflicting request, if there is one, to be removed or to shrink out of
   * (offset, bytes). Resolves true after such a wait, false at once if nothing conflicts.
   * Others may have registered new conflicts by the time it resolves: use waitAll or acquire
   * to proceed safely.
   * @throws ERR_ABORTED when the signal fires (or has fired) before the wait ends
   */
  async waitOne(offset: number, bytes: number, kind: RequestKind, opts?: WaitOptions): Promise<boolean> {
    const signal = opts?.signal;
    throwIfAborted(signal, `waiting for range (${offset}, ${bytes})`);
    const conflict = this.findConflict(offset, bytes, kind);
    if (conflict === undefined) return false;
    await awaitRelease(conflict, offset, offset + bytes, signal);
    return true;
  }

  /**
   * Waits until nothing conflicts with (offset, bytes). True when the range is free at the
   * moment this returns synchronously, but not necessarily when the caller's `await` resumes:
   * to register the range without a gap, use acquire.
   * @throws ERR_ABORTED when the signal fires
   */
  async waitAll(offset: number, bytes: number, kind: RequestKind, opts?: WaitOptions): Promise<void> {
    while (await this.waitOne(offset, bytes, kind, opts));
  }

  /**
   * Waits until nothing conflicts with (offset, bytes), then registers it in the same
   * synchronous run as the last check. When nothing conflicts at the call, the request is
   * registered before acquire returns. Waiters are not queued fairly: a stream of
   * overlapping snapshot reads can keep a writer waiting.
   * @throws ERR_ABORTED when the signal fires; nothing is registered then
   */
  async acquire(offset: number, bytes: number, kind: RequestKind, opts?: AcquireOptions): Promise<InFlightRequest> {
    checkRange(offset, bytes, 'acquire', true);
    const signal = opts?.signal;
    for (;;) {
      throwIfAborted(signal, `acquiring range (${offset}, ${bytes})`);
      const conflict = this.findConflict(offset, bytes, kind);
      if (conflict === undefined) return this.add(offset, bytes, kind, opts);
      await awaitRelease(conflict, offset, offset + bytes, signal);
    }
  }

  /** The registered requests, ordered by offset (a snapshot: safe to remove while iterating). */
  *[Symbol.iterator](): IterableIterator<InFlightRequest> {
    yield* [...this.#state.entries].sort((a, b) => a.offset - b.offset || a.end - b.end);
  }

  toJSON(): RequestInfo[] {
    return [...this].map((r) => r.toJSON());
  }
}

function checkRange(offset: number, bytes: number, action: string, nonEmpty: boolean): void {
  if (
    !Number.isSafeInteger(offset) ||
    !Number.isSafeInteger(bytes) ||
    offset < 0 ||
    bytes < (nonEmpty ? 1 : 0) ||
    !Number.isSafeInteger(offset + bytes)
  ) {
    const want = nonEmpty ? 'a positive length' : 'a non-negative length';
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot ${action} range (${offset}, ${bytes}): it needs a non-negative integer offset and ${want}`, {
      offset,
      bytes,
    });
  }
}
