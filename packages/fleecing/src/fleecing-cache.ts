import { ShearError, assertRange } from '@shear/base';
import { filterChildPerms, type BlockIO, type BoundedCache, type BlockStatusExtent, type ChildEdge, type DriverInfo, type WriteOptions } from '@shear/block';

export const FLEECING_CACHE_INFO: DriverInfo = { name: 'fleecing-cache', childPerms: filterChildPerms };
export const CACHE_CHUNK_BYTES = 64 * 1024;

export interface FleecingCacheOptions {
  /** Bytes the cache serves (the source's length). */
  length: number;
  /** RAM for preserved data; chunks beyond it spill to `file`. */
  ramBytes: number;
  /** A local spill file (a node as long as the source); none: RAM only. */
  file?: ChildEdge;
  /** The most bytes the spill file may hold; default: as much as the source. */
  fileBytes?: number;
  /** Where state changes go (the daemon names the node and sends them as QMP events). */
  onEvent?: CacheEventSink;
  /** At most one state event per this many ms (default 1000). */
  stateEventIntervalMs?: number;
}

/**
 * Where the cache keeps what it holds: `ram` (nothing on the spill file), `spilling` (RAM was
 * full, the spill file is in use), `full` (RAM and file full: writes wait for a drain to free
 * space, or fail).
 */
export type CacheState = 'ram' | 'spilling' | 'full';
export type CacheEventSink = (event: string, data: Record<string, unknown>) => void;

export interface FleecingCacheStats {
  ramBytes: number;
  fileBytes: number;
  /** Chunks that went to the spill file because RAM was full. */
  spills: number;
  /** Chunks freed by discard (drained to the backup target). */
  drained: number;
  state: CacheState;
  /** Writes that found the cache full and waited for space. */
  waits: number;
  /** Writes refused because no space came free in time. */
  failures: number;
  /** Writes waiting for space right now. */
  waiting: number;
}

/**
 * A copy-before-write target for slow or remote backups (seed 000): preserved clusters land in
 * RAM first and in a local spill file when RAM is full, so a guest write waits for a memory copy
 * (or a local write), never for the slow target. A backup job drains it to the slow target
 * (discard-source frees each chunk as it lands there).
 *
 * Chunks never written read as zeroes (the filter only reads back what it preserved). When RAM
 * and the spill file are both full, a write waits up to `spaceWaitMs` for a drain to free space
 * (the copy-before-write filter sets it to its cbw-timeout), then fails with ERR_NO_SPACE and
 * the filter's on-cbw-error policy decides: the guest write fails, or the snapshot is given up.
 * Never a silent loss. With no wait set a full cache fails at once: an unbounded wait could
 * stall the guest for good when nothing drains the cache.
 */
export class FleecingCache implements BlockIO, BoundedCache {
  readonly length: number;
  readonly ramLimit: number;
  readonly fileLimit: number;
  readonly #file: ChildEdge | undefined;
  readonly #ram = new Map<number, Uint8Array>();
  readonly #onFile = new Set<number>();
  #spills = 0;
  #drained = 0;
  #waits = 0;
  #failures = 0;
  #state: CacheState = 'ram';
  /** Failed writes of the current full period were reported already. */
  #failureReported = false;
  #closed = false;
  readonly #waiters = new Set<() => void>();
  readonly #onEvent: CacheEventSink | undefined;
  /** How long a write may wait for space when the cache is full; 0: fail at once. */
  spaceWaitMs = 0;

  constructor(opts: FleecingCacheOptions) {
    assertRange(0, opts.length, Number.MAX_SAFE_INTEGER, 'cache length');
    if (!Number.isSafeInteger(opts.ramBytes) || opts.ramBytes < 0) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open fleecing cache: ram-bytes ${opts.ramBytes} must be a non-negative integer`);
    }
    if (opts.file && opts.file.length < opts.length) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open fleecing cache: the spill file (${opts.file.length} bytes) is smaller than the cache (${opts.length} bytes)`);
    }
    this.length = opts.length;
    this.ramLimit = opts.ramBytes;
    this.#file = opts.file;
    this.fileLimit = opts.file ? (opts.fileBytes ?? opts.length) : 0;
    this.#onEvent = opts.onEvent;
    this.#stateEventIntervalMs = opts.stateEventIntervalMs ?? 1000;
  }

  get stats(): FleecingCacheStats {
    return {
      ramBytes: this.#ram.size * CACHE_CHUNK_BYTES,
      fileBytes: this.#onFile.size * CACHE_CHUNK_BYTES,
      spills: this.#spills,
      drained: this.#drained,
      state: this.#state,
      waits: this.#waits,
      failures: this.#failures,
      waiting: this.#waiters.size,
    };
  }

  /** The cache as query-named-block-nodes and query-jobs show it (`x-shear-cache`). */
  info(): Record<string, unknown> {
    const st = this.stats;
    return {
      state: st.state,
      'ram-bytes': this.ramLimit,
      'ram-used': st.ramBytes,
      'file-bytes': this.fileLimit,
      'file-used': st.fileBytes,
      spills: st.spills,
      drained: st.drained,
      waits: st.waits,
      failures: st.failures,
      waiting: st.waiting,
      'wait-ms': this.spaceWaitMs,
    };
  }

  /** Held chunks as ranges, RAM first: what a drain should copy before anything else. */
  *heldRanges(): Generator<{ offset: number; bytes: number }> {
    for (const set of [[...this.#ram.keys()], [...this.#onFile]]) {
      for (const c of set.sort((a, b) => a - b)) yield { offset: c * CACHE_CHUNK_BYTES, bytes: Math.min(CACHE_CHUNK_BYTES, this.length - c * CACHE_CHUNK_BYTES) };
    }
  }

  async read(offset: number, buf: Uint8Array): Promise<void> {
    assertRange(offset, buf.length, this.length, 'cache read');
    await this.#pieces(offset, buf.length, async (c, from, to, at) => {
      const target = buf.subarray(at, at + (to - from));
      const held = this.#ram.get(c);
      if (held) target.set(held.subarray(from, to));
      else if (this.#onFile.has(c)) await this.#file!.read(c * CACHE_CHUNK_BYTES + from, target);
      else target.fill(0);
    });
  }

  /** `opts.signal` ends a wait for space (the copy's range was discarded meanwhile). */
  async write(offset: number, buf: Uint8Array, opts?: WriteOptions): Promise<void> {
    assertRange(offset, buf.length, this.length, 'cache write');
    await this.#pieces(offset, buf.length, async (c, from, to, at) => {
      const size = Math.min(CACHE_CHUNK_BYTES, this.length - c * CACHE_CHUNK_BYTES);
      let chunk: Uint8Array;
      if (from === 0 && to === size) chunk = Uint8Array.from(buf.subarray(at, at + size));
      else {
        chunk = new Uint8Array(size);
        await this.read(c * CACHE_CHUNK_BYTES, chunk);
        chunk.set(buf.subarray(at, at + (to - from)), from);
      }
      await this.#store(c, chunk, opts?.signal);
    });
  }

  async writeZeroes(offset: number, bytes: number): Promise<void> {
    assertRange(offset, bytes, this.length, 'cache write');
    // Preserved zeroes are simply chunks the cache does not hold: they read as zeroes.
    await this.#pieces(offset, bytes, async (c, from, to) => {
      const size = Math.min(CACHE_CHUNK_BYTES, this.length - c * CACHE_CHUNK_BYTES);
      if (from === 0 && to === size) return this.#drop(c, false);
      return this.write(c * CACHE_CHUNK_BYTES + from, new Uint8Array(to - from));
    });
  }

  /** The data reached the backup target (or is not needed): its space is freed. */
  async discard(offset: number, bytes: number): Promise<void> {
    assertRange(offset, bytes, this.length, 'cache discard');
    const first = Math.ceil(offset / CACHE_CHUNK_BYTES);
    const end = offset + bytes >= this.length ? Math.ceil(this.length / CACHE_CHUNK_BYTES) : Math.floor((offset + bytes) / CACHE_CHUNK_BYTES);
    for (let c = first; c < end; c++) await this.#drop(c, true);
  }

  async flush(): Promise<void> {
    await this.#file?.flush();
  }

  async blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    assertRange(offset, bytes, this.length, 'cache block status');
    const out: BlockStatusExtent[] = [];
    await this.#pieces(offset, bytes, async (c, from, to) => {
      const held = this.#ram.has(c) || this.#onFile.has(c);
      const last = out.at(-1);
      const at = c * CACHE_CHUNK_BYTES + from;
      if (last && last.data === held && last.offset + last.bytes === at) last.bytes += to - from;
      else out.push({ offset: at, bytes: to - from, data: held, zero: !held, allocated: true });
    });
    return out;
  }

  async close(): Promise<void> {
    this.#ram.clear();
    // Nothing will free space any more: waiting writes fail now rather than at their deadline.
    this.#closed = true;
    clearTimeout(this.#reportTimer);
    this.#reportTimer = undefined;
    for (const wake of this.#waiters) wake();
  }

  async #store(c: number, chunk: Uint8Array, signal?: AbortSignal): Promise<void> {
    const deadline = performance.now() + this.spaceWaitMs;
    let waited = false;
    for (;;) {
      if (this.#closed) throw new ShearError('ERR_CLOSED', `Cannot preserve (${c * CACHE_CHUNK_BYTES}, ${chunk.length}): the fleecing cache is closed`);
      if (signal?.aborted) throw new ShearError('ERR_ABORTED', `Cannot preserve (${c * CACHE_CHUNK_BYTES}, ${chunk.length}): the write was called off`);
      if (this.#ram.has(c) || this.#ram.size * CACHE_CHUNK_BYTES + CACHE_CHUNK_BYTES <= this.ramLimit) {
        this.#ram.set(c, chunk);
        if (this.#onFile.delete(c)) await this.#file!.discard(c * CACHE_CHUNK_BYTES, chunk.length).catch(() => {});
        this.#updateState();
        return;
      }
      if (this.#file && (this.#onFile.has(c) || (this.#onFile.size + 1) * CACHE_CHUNK_BYTES <= this.fileLimit)) {
        // Taken before the write so that concurrent stores cannot overbook the file; nothing
        // reads a chunk before its store resolves (the filter marks it preserved only then).
        const fresh = !this.#onFile.has(c);
        this.#onFile.add(c);
        try {
          await this.#file.write(c * CACHE_CHUNK_BYTES, chunk);
        } catch (err) {
          if (fresh) this.#onFile.delete(c);
          this.#wakeWaiters();
          throw err;
        }
        if (fresh) this.#spills++;
        this.#updateState();
        return;
      }
      const left = deadline - performance.now();
      if (left <= 0) break;
      if (!waited) this.#waits++;
      waited = true;
      this.#setState('full');
      await this.#waitForSpace(left, signal);
    }
    this.#failures++;
    const why = waited ? ` and no space came free within ${Math.round(this.spaceWaitMs)} ms` : '';
    if (!this.#failureReported) {
      this.#failureReported = true;
      this.#setState('full');
      this.#emit('X_SHEAR_CACHE_WRITE_FAILED', { offset: c * CACHE_CHUNK_BYTES, bytes: chunk.length, waited });
    }
    throw new ShearError('ERR_NO_SPACE', `Cannot preserve (${c * CACHE_CHUNK_BYTES}, ${chunk.length}): the fleecing cache is full (${this.ramLimit} bytes of RAM, ${this.fileLimit} bytes of spill file)${why}`, { offset: c * CACHE_CHUNK_BYTES, bytes: chunk.length, errno: 'ENOSPC' });
  }

  #waitForSpace(ms: number, signal?: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      const wake = () => {
        clearTimeout(timer);
        signal?.removeEventListener('abort', wake);
        this.#waiters.delete(wake);
        resolve();
      };
      const timer = setTimeout(wake, Math.min(ms, 2 ** 31 - 1));
      signal?.addEventListener('abort', wake, { once: true });
      this.#waiters.add(wake);
    });
  }

  #wakeWaiters(): void {
    for (const wake of [...this.#waiters]) wake();
  }

  async #drop(c: number, drained: boolean): Promise<void> {
    const inRam = this.#ram.delete(c);
    const onFile = this.#onFile.delete(c);
    if (onFile) await this.#file!.discard(c * CACHE_CHUNK_BYTES, Math.min(CACHE_CHUNK_BYTES, this.length - c * CACHE_CHUNK_BYTES)).catch(() => {});
    if (drained && (inRam || onFile)) this.#drained++;
    if (inRam || onFile) {
      this.#updateState();
      this.#wakeWaiters();
    }
  }

  /**
   * The state follows what the cache holds. `full` lasts while writes wait and until an eighth
   * of the cache is free again: a guest writing as fast as the drain frees chunks keeps it full,
   * instead of flipping states (and sending an event) for every chunk.
   */
  #updateState(): void {
    const capacity = this.ramLimit + this.fileLimit;
    const used = (this.#ram.size + this.#onFile.size) * CACHE_CHUNK_BYTES;
    const full = this.#state === 'full' && (this.#waiters.size > 0 || capacity - used < Math.max(CACHE_CHUNK_BYTES, capacity / 8));
    this.#setState(full ? 'full' : this.#onFile.size > 0 ? 'spilling' : 'ram');
  }

  #setState(state: CacheState): void {
    if (state === this.#state) return;
    this.#state = state;
    if (state !== 'full') this.#failureReported = false;
    else this.#fullSinceReport = true;
    this.#reportState();
  }

  // State events are limited to one a second (QEMU limits its frequent events likewise): a cache
  // hovering at a boundary reports where it is, not every crossing. The last state always goes
  // out, and a full period is never hidden: if the cache was full in between, that comes first.
  #reported: CacheState = 'ram';
  #fullSinceReport = false;
  #reportedAt = -Infinity;
  #reportTimer: NodeJS.Timeout | undefined;
  readonly #stateEventIntervalMs: number;

  #reportState(): void {
    if (this.#reportTimer || this.#closed) return;
    const wait = this.#reportedAt + this.#stateEventIntervalMs - performance.now();
    if (wait > 0) {
      this.#reportTimer = setTimeout(() => {
        this.#reportTimer = undefined;
        this.#reportState();
      }, wait);
      return;
    }
    const states: CacheState[] = this.#fullSinceReport && this.#reported !== 'full' && this.#state !== 'full' ? ['full', this.#state] : [this.#state];
    this.#fullSinceReport = false;
    for (const state of states) {
      if (state === this.#reported) continue;
      const previous = this.#reported;
      this.#reported = state;
      this.#reportedAt = performance.now();
      this.#emit('X_SHEAR_CACHE_STATE', { state, previous });
    }
  }

  #emit(event: string, data: Record<string, unknown>): void {
    const st = this.stats;
    this.#onEvent?.(event, { ...data, 'ram-used': st.ramBytes, 'file-used': st.fileBytes, waiting: st.waiting });
  }

  async #pieces(offset: number, bytes: number, fn: (chunk: number, from: number, to: number, at: number) => Promise<void>): Promise<void> {
    let at = 0;
    while (at < bytes) {
      const pos = offset + at;
      const c = Math.floor(pos / CACHE_CHUNK_BYTES);
      const from = pos - c * CACHE_CHUNK_BYTES;
      const to = Math.min(CACHE_CHUNK_BYTES, from + (bytes - at), this.length - c * CACHE_CHUNK_BYTES);
      await fn(c, from, to, at);
      at += to - from;
    }
  }
}
