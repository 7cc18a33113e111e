import { ShearError, assertRange } from '@shear/base';
import type { ClusterIO } from './cluster-io.js';
import type { ImageGuard } from './image-guard.js';
import type { RangeLock } from './locks.js';
import type { PlanItem, Qcow2Metadata } from './metadata.js';

/** One piece of a write mapping: guest bytes [offset, offset + bytes) live at hostOffset in the protocol file. */
export interface MappedExtent {
  offset: number;
  hostOffset: number;
  bytes: number;
}

/** A reservation made by `mapForWrite`; pass it back to `commitMapping` or `abortMapping` exactly once. */
export interface Qcow2WriteMapping {
  readonly offset: number;
  readonly bytes: number;
  readonly extents: readonly MappedExtent[];
}

interface MappingState {
  items: PlanItem[];
  release: () => void;
  /** Ends the mapping's part in the persistent-bitmap guard (BitmapLifecycle.enterChange). */
  leave: () => void;
}

/**
 * The write mappings outstanding on an image: host space reserved so that another thread can
 * write guest data straight into the protocol file, the L2 entries changing only at commit.
 * Each mapping holds the exclusive lock of its clusters and counts as a change to the disk
 * until it is committed or aborted.
 */
export class WriteMappings {
  readonly #guard: ImageGuard;
  readonly #md: Qcow2Metadata;
  readonly #io: ClusterIO;
  readonly #locks: RangeLock;
  readonly #enterChange: () => Promise<() => void>;
  readonly #length: number;
  readonly #mappings = new Map<Qcow2WriteMapping, MappingState>();

  constructor(args: { guard: ImageGuard; md: Qcow2Metadata; io: ClusterIO; locks: RangeLock; enterChange: () => Promise<() => void>; diskBytes: number }) {
    this.#guard = args.guard;
    this.#md = args.md;
    this.#io = args.io;
    this.#locks = args.locks;
    this.#enterChange = args.enterChange;
    this.#length = args.diskBytes;
  }

  /** See Qcow2Image.mapForWrite. */
  async map(offset: number, bytes: number): Promise<Qcow2WriteMapping> {
    this.#guard.checkWritable('map for writing');
    assertRange(offset, bytes, this.#length, 'write mapping');
    if (bytes === 0) {
      const empty: Qcow2WriteMapping = Object.freeze({ offset, bytes, extents: Object.freeze([]) });
      this.#mappings.set(empty, { items: [], release: () => undefined, leave: () => undefined });
      return empty;
    }
    const C = this.#md.clusterBytes;
    const [first, end] = this.#md.clusterRange(offset, bytes);
    const leave = await this.#enterChange();
    const release = await this.#locks.acquire(first, end, true).catch((err: unknown) => {
      leave();
      throw err;
    });
    let items: PlanItem[] = [];
    const extents: MappedExtent[] = [];
    try {
      items = await this.#md.mutex.run(() => this.#md.plan(first, end - first));
      await Promise.all(items.map((it) => this.#io.prepareEdge(it, offset, offset + bytes)));
      for (const it of items) {
        const cStart = it.g * C;
        const from = Math.max(offset, cStart);
        const to = Math.min(offset + bytes, cStart + C);
        const hostOffset = it.host + (from - cStart);
        const prev = extents[extents.length - 1];
        if (prev && prev.hostOffset + prev.bytes === hostOffset) prev.bytes += to - from;
        else extents.push({ offset: from, hostOffset, bytes: to - from });
      }
    } catch (err) {
      await this.#md.releaseFresh(items).catch(() => undefined);
      release();
      leave();
      throw err;
    }
    const mapping: Qcow2WriteMapping = Object.freeze({ offset, bytes, extents: Object.freeze(extents.map((x) => Object.freeze(x))) });
    this.#mappings.set(mapping, { items, release, leave });
    return mapping;
  }

  #take(m: Qcow2WriteMapping, op: string): MappingState {
    const st = this.#mappings.get(m);
    if (!st) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot ${op} write mapping (${m.offset}, ${m.bytes}): it is not outstanding on this image`);
    this.#mappings.delete(m);
    return st;
  }

  async commit(m: Qcow2WriteMapping): Promise<void> {
    this.#guard.checkWritable('commit a write mapping of');
    const st = this.#take(m, 'commit');
    try {
      await this.#md.mutex.run(() => this.#md.commit(st.items));
    } finally {
      st.release();
      st.leave();
    }
  }

  async abort(m: Qcow2WriteMapping): Promise<void> {
    const st = this.#take(m, 'abort');
    try {
      await this.#md.releaseFresh(st.items);
    } finally {
      st.release();
      st.leave();
    }
  }

  /** The mappings not yet committed or aborted (closing aborts them). */
  outstanding(): Qcow2WriteMapping[] {
    return [...this.#mappings.keys()];
  }
}
