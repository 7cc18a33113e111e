import { ensureLength } from './file-util.js';
import type { GrowableIO } from './growable-io.js';
import type { Refcounts } from './refcounts.js';

interface PendingFree {
  hostOffset: number;
  bytes: number;
}

/**
 * Hands out host clusters and takes them back. Callers serialise calls (the image's metadata
 * mutex).
 *
 * Clusters that lose their last reference are not freed at once: they wait in `pending` until
 * the L2/L1 change that dropped the reference is durable (the image calls `applyFrees` at the
 * end of a flush). Until then the on-disk metadata may still point at them, so reusing them
 * early could let a crash expose new data through old tables.
 */
export class Allocator {
  readonly #file: GrowableIO;
  readonly #rc: Refcounts;
  readonly #clusterBytes: number;
  #pending: PendingFree[] = [];
  /** Next free byte in a host cluster partly used by compressed data, or null. */
  #compressedCursor: number | null = null;

  constructor(file: GrowableIO, rc: Refcounts, clusterBytes: number) {
    this.#file = file;
    this.#rc = rc;
    this.#clusterBytes = clusterBytes;
  }

  async #allocOne(): Promise<number> {
    for (;;) {
      const c = await this.#rc.findFreeRun(1);
      await this.#rc.ensureBlockFor(c);
      // Creating a refcount block or moving the table may have used c.
      if (!(await this.#rc.isFree(c))) continue;
      await this.#rc.add(c, 1);
      this.#rc.advanceHint(c + 1);
      return c;
    }
  }

  /** Allocates `count` clusters (contiguous when free space allows) and returns their host offsets. */
  async allocate(count: number): Promise<number[]> {
    const out: number[] = [];
    let maxEnd = 0;
    for (let i = 0; i < count; i++) {
      const c = await this.#allocOne();
      out.push(c * this.#clusterBytes);
      maxEnd = Math.max(maxEnd, (c + 1) * this.#clusterBytes);
    }
    await ensureLength(this.#file, maxEnd);
    return out;
  }

  /** Drops clusters that nothing references yet (an allocation whose data write failed). */
  async releaseNow(hostOffsets: readonly number[]): Promise<void> {
    for (const off of hostOffsets) await this.#rc.add(off / this.#clusterBytes, -1);
  }

  /**
   * Finds room for `bytes` (< cluster size) of compressed data inside one host cluster, sharing
   * the cluster with earlier compressed data where it fits (each datum adds one reference to
   * the cluster it touches, as QEMU counts them).
   */
  async allocateCompressed(bytes: number): Promise<number> {
    const cursor = this.#compressedCursor;
    if (cursor !== null) {
      const cluster = Math.floor(cursor / this.#clusterBytes);
      const sectorEnd = Math.ceil((cursor + bytes) / 512) * 512;
      if (sectorEnd <= (cluster + 1) * this.#clusterBytes && (await this.#rc.get(cluster)) < this.#rc.maxRefcount && (await this.#rc.get(cluster)) > 0) {
        await this.#rc.add(cluster, 1);
        this.#advanceCursor(cursor + bytes);
        return cursor;
      }
    }
    const [host] = await this.allocate(1);
    this.#advanceCursor(host! + bytes);
    return host!;
  }

  #advanceCursor(next: number): void {
    this.#compressedCursor = next % this.#clusterBytes === 0 ? null : next;
  }

  /** Drops the reference of compressed data that was never referenced (its write failed). */
  async releaseCompressedNow(hostOffset: number, bytes: number): Promise<void> {
    await this.#dropRange(hostOffset, bytes, []);
    this.#compressedCursor = null;
  }

  /** Queues the release of host bytes an L2 entry no longer references (a cluster, or compressed data). */
  queueFree(hostOffset: number, bytes: number): void {
    this.#pending.push({ hostOffset, bytes });
  }

  get hasPendingFrees(): boolean {
    return this.#pending.length > 0;
  }

  /**
   * Applies the queued releases; call only once the metadata that dropped the references is
   * durable. Returns the host offsets of clusters whose refcount reached zero.
   */
  async applyFrees(): Promise<number[]> {
    const pending = this.#pending;
    this.#pending = [];
    const freed: number[] = [];
    for (const p of pending) await this.#dropRange(p.hostOffset, p.bytes, freed);
    if (freed.length > 0) this.#compressedCursor = null;
    return freed;
  }

  async #dropRange(hostOffset: number, bytes: number, freed: number[]): Promise<void> {
    const first = Math.floor(hostOffset / this.#clusterBytes);
    const last = Math.floor((hostOffset + bytes - 1) / this.#clusterBytes);
    for (let c = first; c <= last; c++) {
      if ((await this.#rc.add(c, -1)) === 0) freed.push(c * this.#clusterBytes);
    }
  }
}
