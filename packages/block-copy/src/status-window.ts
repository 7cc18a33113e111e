import { MiB } from '@shear/base';
import type { BlockIO, BlockStatusExtent } from '@shear/block';

/** How much of the source one block-status query covers (QEMU's backup asks per task). */
export const STATUS_WINDOW_BYTES = 64 * MiB;

/**
 * The source's block status, asked once per large window instead of once per task: a streaming
 * copy of 4 MiB tasks then makes one query (one walk of SEEK_DATA/SEEK_HOLE, one trip through
 * the node) per 16 tasks, and concurrent tasks of one window share the query in flight.
 *
 * Why a cached answer stays right: it is used only within one run of the copy (reset() at each
 * run) and only for background and retry tasks of a point-in-time copy. A cluster still to be
 * copied cannot change under the copy: a writer of the source goes through copy-before-write,
 * which copies the cluster (with a fresh query, see task-lifecycle) before the write lands, and
 * then the cluster is no longer in the copy bitmap. So the allocation the window saw for every
 * cluster still to copy is the one at the point in time.
 */
export class StatusWindow {
  readonly #io: BlockIO;
  readonly #length: number;
  readonly #windowBytes: number;
  #start = 0;
  #end = 0;
  #extents: BlockStatusExtent[] = [];
  #pending: { start: number; promise: Promise<void> } | undefined;
  #generation = 0;
  /** Queries made (tests and profiles). */
  queries = 0;

  constructor(io: BlockIO, length: number, windowBytes = STATUS_WINDOW_BYTES) {
    this.#io = io;
    this.#length = Math.min(length, io.length);
    this.#windowBytes = windowBytes;
  }

  /** Forgets what was asked (a new run: a new point in time). */
  reset(): void {
    this.#generation++;
    this.#start = this.#end = 0;
    this.#extents = [];
    this.#pending = undefined;
  }

  /**
   * Extents covering [offset, ...) up to at most offset + bytes, in order, starting at offset;
   * they may stop short of the end (the caller asks again from where they stop), never empty.
   */
  async blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    if (!(offset >= this.#start && offset < this.#end)) await this.#fill(offset, bytes);
    if (!(offset >= this.#start && offset < this.#end)) return this.#io.blockStatus(offset, bytes);
    const end = offset + bytes;
    const out: BlockStatusExtent[] = [];
    for (const e of this.#extents) {
      if (e.offset + e.bytes <= offset) continue;
      if (e.offset >= end) break;
      const from = Math.max(e.offset, offset);
      const to = Math.min(e.offset + e.bytes, end);
      out.push({ ...e, offset: from, bytes: to - from });
    }
    return out;
  }

  async #fill(offset: number, bytes: number): Promise<void> {
    const p = this.#pending;
    if (p && offset >= p.start && offset < p.start + this.#windowBytes) {
      await p.promise;
      return;
    }
    const generation = this.#generation;
    const want = Math.min(this.#length - offset, Math.max(bytes, this.#windowBytes));
    const promise = (async () => {
      this.queries++;
      const extents = await this.#io.blockStatus(offset, want);
      if (generation !== this.#generation || extents.length === 0) return;
      this.#extents = extents;
      this.#start = offset;
      this.#end = extents.at(-1)!.offset + extents.at(-1)!.bytes;
    })();
    const entry = { start: offset, promise };
    this.#pending = entry;
    try {
      await promise;
    } finally {
      if (this.#pending === entry) this.#pending = undefined;
    }
  }
}
