import { once } from 'node:events';
import { ShearError, alignDown, alignUp } from '@shear/base';
import { SharedBitmap } from '@shear/bitmap';
import {
  PERM_CONSISTENT_READ,
  PERM_RESIZE,
  PERM_WRITE,
  PERM_WRITE_UNCHANGED,
  filterChildPerms,
  isBoundedCache,
  type BlockIO,
  type BlockStatusExtent,
  type ChildEdge,
  type ChildPermsFn,
  type DriverInfo,
  type SnapshotSource,
  type WriteOptions,
  type WriteZeroesOptions,
} from '@shear/block';
import { BlockCopy, DEFAULT_CLUSTER_BYTES, type BlockCopyOptions, type CopyWorkerPool } from '@shear/block-copy';
import { RequestTable, type InFlightRequest } from '@shear/reqlist';
import type { CacheEventSink } from './fleecing-cache.js';
import { ReadGate } from './read-gate.js';

export type OnCbwError = 'break-guest-write' | 'break-snapshot';

/** setTimeout cannot wait longer than this (about 24.8 days); longer timeouts mean "no limit". */
const MAX_TIMER_MS = 2 ** 31 - 1;

/**
 * Once the filter has parents, it takes its source (`file`) and lets no one else write or
 * resize it: every writer must come through the filter, or the point in time could change
 * underneath. Before it is inserted (no parents yet) it shares everything, so it can be
 * created beside the writers it is about to take over (QEMU's cbw_child_perm does the same).
 * Its `target` is written by the filter alone.
 */
export const cbwChildPerms: ChildPermsFn = (role, parent, readOnly, parentCount) => {
  if (role === 'target') {
    return { perm: PERM_CONSISTENT_READ | PERM_WRITE, shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED };
  }
  const p = filterChildPerms(role, parent, readOnly, parentCount);
  if (parentCount === 0) return p;
  return { perm: p.perm | PERM_CONSISTENT_READ, shared: p.shared & ~(PERM_WRITE | PERM_RESIZE) };
};

export const CBW_INFO: DriverInfo = { name: 'copy-before-write', childPerms: cbwChildPerms, isFilter: true };

export interface CopyBeforeWriteOptions {
  file: ChildEdge;
  target: ChildEdge;
  /** Only clusters set here are preserved (QEMU's `bitmap` option); default: all of them. */
  bitmap?: SharedBitmap;
  /**
   * Start with nothing to preserve: the owner (a backup job) fills the copy bitmap itself, in
   * the same synchronous step in which it freezes its dirty bitmap and inserts the filter.
   */
  startEmpty?: boolean;
  onCbwError?: OnCbwError;
  /** Seconds a guest write may wait for its copy; 0 = no limit. Held as a JS number (53 bits). */
  cbwTimeoutSec?: number;
  pool?: CopyWorkerPool;
  /** Where X_SHEAR_CBW_ERROR events go (the daemon names the node and sends them as QMP events). */
  onEvent?: CacheEventSink;
  /** Copy engine settings (cluster size, chunk, speed, sync=top, compress, ...). */
  copy?: Omit<BlockCopyOptions, 'source' | 'target' | 'length' | 'pool'>;
}

/**
 * QEMU's copy-before-write filter. Guest writes pass through it to `file`; before one touches
 * a cluster the point-in-time view still needs, that cluster's old content is copied to
 * `target` (through the block-copy engine, in its copy-before-write lane).
 *
 * Point-in-time reads (snapshotRead, used by snapshot-access and fleecing exports) come from
 * the target for clusters already preserved and from `file` for the others. Such a read holds
 * a 'snapshot-read' entry in the request table for its range, and a guest write takes a
 * 'guest-write' entry (after its copy, before it touches `file`), so a write never lands in
 * the middle of a read from `file` (the race of seed 001).
 *
 * Coordinator-only object. Bitmaps: `done` (old data is on the target), `access` (clusters a
 * snapshot reader may still read; discard clears them). The copy bitmap of `copy` holds what
 * is still to be preserved.
 */
export class CopyBeforeWrite implements BlockIO, SnapshotSource {
  readonly copy: BlockCopy;
  readonly done: SharedBitmap;
  readonly access: SharedBitmap;
  readonly clusterBytes: number;
  readonly onCbwError: OnCbwError;
  readonly cbwTimeoutSec: number;
  readonly #file: ChildEdge;
  readonly #target: ChildEdge;
  readonly #reads = new RequestTable();
  /** Snapshot reads take a slot here first, so they leave the thread pool to the guest's writes. */
  readonly #readGate = new ReadGate();
  readonly #onEvent: CacheEventSink | undefined;
  #broken: ShearError | undefined;
  #closed = false;
  /** A failed guest write was reported and no guest write has succeeded since. */
  #failing = false;

  constructor(opts: CopyBeforeWriteOptions) {
    this.#file = opts.file;
    this.#target = opts.target;
    if (opts.target.length < opts.file.length) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open copy-before-write: target is smaller than the source (${opts.target.length} < ${opts.file.length} bytes)`);
    }
    this.onCbwError = opts.onCbwError ?? 'break-guest-write';
    this.cbwTimeoutSec = opts.cbwTimeoutSec ?? 0;
    if (!Number.isSafeInteger(this.cbwTimeoutSec) || this.cbwTimeoutSec < 0) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open copy-before-write: cbw-timeout ${this.cbwTimeoutSec} must be a non-negative integer (seconds)`);
    }
    this.clusterBytes = opts.copy?.clusterBytes ?? DEFAULT_CLUSTER_BYTES;
    const length = opts.file.length;
    this.copy = new BlockCopy({
      ...opts.copy,
      clusterBytes: this.clusterBytes,
      source: { io: opts.file, mapping: opts.file.hostMapping() },
      target: { io: opts.target, mapping: opts.target.hostMapping() },
      length,
      ...(opts.pool ? { pool: opts.pool } : {}),
    });
    if (opts.bitmap) this.copy.copyBitmap.merge(opts.bitmap);
    else if (!opts.startEmpty) this.copy.copyBitmap.set(0, Math.max(1, length));
    this.done = SharedBitmap.create(Math.max(1, length), this.clusterBytes);
    this.access = SharedBitmap.create(Math.max(1, length), this.clusterBytes);
    this.access.set(0, Math.max(1, length));
    this.copy.on('range-done', (offset: number, bytes: number) => this.done.set(offset, bytes));
    this.copy.on('discarded-written', (offset: number, bytes: number) => {
      this.done.reset(offset, bytes);
      void this.#target.discard(offset, bytes).catch(() => {});
    });
    this.#onEvent = opts.onEvent;
    // A fleecing cache that is full makes a preserving write wait for a drain to free space,
    // for as long as the guest write may wait for its copy.
    const cache = opts.target.child.isOpen ? opts.target.child.driver : undefined;
    if (isBoundedCache(cache)) cache.spaceWaitMs = this.cbwTimeoutSec * 1000;
  }

  get length(): number {
    return this.#file.length;
  }

  /** The node preserved data goes to. */
  get targetEdge(): ChildEdge {
    return this.#target;
  }

  /** Set once a copy failed under break-snapshot: the point-in-time view is lost. */
  get snapshotBroken(): ShearError | undefined {
    return this.#broken;
  }

  // ---- the guest side ----

  read(offset: number, buf: Uint8Array): Promise<void> {
    return this.#file.read(offset, buf);
  }

  async write(offset: number, buf: Uint8Array, opts?: WriteOptions): Promise<void> {
    this.#readGate.guestWriteStarted();
    try {
      const req = await this.#beforeWrite(offset, buf.length);
      try {
        await this.#file.write(offset, buf, opts);
      } finally {
        req?.remove();
      }
    } finally {
      this.#readGate.guestWriteEnded();
    }
  }

  async writeZeroes(offset: number, bytes: number, opts?: WriteZeroesOptions): Promise<void> {
    this.#readGate.guestWriteStarted();
    try {
      const req = await this.#beforeWrite(offset, bytes);
      try {
        await this.#file.writeZeroes(offset, bytes, opts);
      } finally {
        req?.remove();
      }
    } finally {
      this.#readGate.guestWriteEnded();
    }
  }

  async discard(offset: number, bytes: number): Promise<void> {
    this.#readGate.guestWriteStarted();
    try {
      const req = await this.#beforeWrite(offset, bytes);
      try {
        await this.#file.discard(offset, bytes);
      } finally {
        req?.remove();
      }
    } finally {
      this.#readGate.guestWriteEnded();
    }
  }

  /** Snapshot reads in flight and waiting for a slot (tests, diagnostics). */
  get snapshotReads(): { reading: number; waiting: number } {
    return { reading: this.#readGate.reading, waiting: this.#readGate.waiting };
  }

  flush(): Promise<void> {
    return this.#file.flush();
  }

  blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    return this.#file.blockStatus(offset, bytes);
  }

  /** Waits for copies still in flight (a guest write that raced the removal of the filter). */
  async close(): Promise<void> {
    this.#closed = true;
    while (this.copy.inFlightTasks > 0) await once(this.copy, 'progress');
  }

  /**
   * Preserves the old content of the range, then waits until no snapshot read of it is in
   * flight and registers the write. Returns the registration (remove it when the write is done),
   * or undefined for an empty or out-of-range request (the child refuses those itself).
   * @throws ERR_CBW_FAILED under break-guest-write when the copy fails or times out
   */
  async #beforeWrite(offset: number, bytes: number): Promise<InFlightRequest | undefined> {
    if (bytes <= 0 || offset < 0 || offset + bytes > this.length) return undefined;
    if (!this.#broken) {
      const ms = this.cbwTimeoutSec * 1000;
      // Our own timer, cleared when the copy is done: AbortSignal.timeout() would leave one
      // pending per guest write until the collector happens to reclaim its signal.
      const timeout = ms > 0 && ms <= MAX_TIMER_MS ? new AbortController() : undefined;
      const timer = timeout ? setTimeout(() => timeout.abort(), ms) : undefined;
      const signal = timeout?.signal;
      try {
        await this.copy.copyRange(offset, bytes, signal ? { signal } : {});
      } catch (err) {
        const why = signal?.aborted ? `it did not finish within cbw-timeout ${this.cbwTimeoutSec} s` : (err as Error).message;
        if (this.onCbwError === 'break-guest-write') {
          // Reported once per run of failures: a guest retrying in a loop must not flood the monitor.
          if (!this.#failing) this.#emit('guest-write-failed', offset, bytes, why);
          this.#failing = true;
          throw new ShearError('ERR_CBW_FAILED', `Cannot write (${offset}, ${bytes}): copy-before-write failed: ${why}`, { offset, bytes, op: 'write', errno: 'EIO' }, { cause: err });
        }
        if (!this.#broken) this.#emit('snapshot-broken', offset, bytes, why);
        this.#breakSnapshot(new ShearError('ERR_SNAPSHOT_BROKEN', `Cannot read the snapshot: copy-before-write of (${offset}, ${bytes}) failed: ${why}`, { offset, bytes, errno: 'EIO' }, { cause: err }));
      } finally {
        clearTimeout(timer);
      }
    }
    this.#failing = false;
    const start = alignDown(offset, this.clusterBytes);
    const end = Math.min(this.length, alignUp(offset + bytes, this.clusterBytes));
    return this.#reads.acquire(start, end - start, 'guest-write');
  }

  #emit(action: 'guest-write-failed' | 'snapshot-broken', offset: number, bytes: number, reason: string): void {
    this.#onEvent?.('X_SHEAR_CBW_ERROR', { action, offset, bytes, reason });
  }

  #breakSnapshot(reason: ShearError): void {
    if (this.#broken) return;
    this.#broken = reason;
    // Nothing more is preserved: the view is gone, guest writes go straight through.
    this.copy.discard(0, this.length);
  }

  // ---- the point-in-time side (snapshot-access) ----

  /**
   * Reads the range as it was when the filter started.
   * @throws ERR_SNAPSHOT_BROKEN after a failure under break-snapshot; ERR_SNAPSHOT_DISCARDED
   *   when part of the range was discarded by a snapshot reader
   */
  async snapshotRead(offset: number, buf: Uint8Array): Promise<void> {
    const bytes = buf.length;
    if (bytes === 0) return;
    this.#checkReadable(offset, bytes);
    const leave = await this.#readGate.enter();
    try {
      await this.#snapshotReadAdmitted(offset, buf);
    } finally {
      leave();
    }
  }

  async #snapshotReadAdmitted(offset: number, buf: Uint8Array): Promise<void> {
    const bytes = buf.length;
    const start = alignDown(offset, this.clusterBytes);
    const end = Math.min(this.length, alignUp(offset + bytes, this.clusterBytes));
    const req = await this.#reads.acquire(start, end - start, 'snapshot-read');
    try {
      // Checked again: a discard or a break may have come while we waited.
      this.#checkReadable(offset, bytes);
      for (let at = offset; at < offset + bytes; ) {
        const preserved = this.done.get(at);
        const next = preserved ? this.done.nextClear(at, offset + bytes - at) : this.done.nextDirty(at, offset + bytes - at);
        const runEnd = next < 0 ? offset + bytes : next;
        const piece = buf.subarray(at - offset, runEnd - offset);
        await (preserved ? this.#target : this.#file).read(at, piece);
        at = runEnd;
      }
      // A break during the read means the source may have changed under it.
      if (this.#broken) throw this.#broken;
    } finally {
      req.remove();
    }
  }

  /** Block status of the point-in-time view: preserved runs from the target, the rest from the source. */
  async snapshotBlockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    if (this.#broken) throw this.#broken;
    const preserved = this.done.get(offset);
    const next = preserved ? this.done.nextClear(offset, bytes) : this.done.nextDirty(offset, bytes);
    const runBytes = (next < 0 ? offset + bytes : next) - offset;
    const ext = await (preserved ? this.#target : this.#file).blockStatus(offset, runBytes);
    return ext.map((e) => ({ ...e, allocated: true }));
  }

  /**
   * The reader has these clusters (seed 002): the range, rounded inward to whole clusters,
   * leaves the point-in-time view. Its old data is no longer preserved, pending copies of it
   * are dropped, the space it took on the target is freed, and later reads of it fail.
   * A range smaller than a cluster does nothing.
   * @returns bytes dropped from the view
   */
  async snapshotDiscard(offset: number, bytes: number): Promise<number> {
    const start = alignUp(offset, this.clusterBytes);
    const end = offset + bytes >= this.length ? this.length : alignDown(offset + bytes, this.clusterBytes);
    if (end <= start) return 0;
    this.access.reset(start, end - start);
    this.copy.discard(start, end - start);
    this.done.reset(start, end - start);
    await this.#target.discard(start, end - start).catch(() => {});
    return end - start;
  }

  #checkReadable(offset: number, bytes: number): void {
    if (this.#closed) throw new ShearError('ERR_CLOSED', 'Cannot read the snapshot: the copy-before-write filter is closed');
    if (this.#broken) throw this.#broken;
    if (offset < 0 || offset + bytes > this.length) {
      throw new ShearError('ERR_OUT_OF_BOUNDS', `Cannot read snapshot range (${offset}, ${bytes}): it ends past ${this.length}`, { offset, bytes });
    }
    if (this.access.nextClear(offset, bytes) >= 0) {
      throw new ShearError('ERR_SNAPSHOT_DISCARDED', `Cannot read snapshot range (${offset}, ${bytes}): part of it was discarded`, { offset, bytes, errno: 'EINVAL' });
    }
  }
}
