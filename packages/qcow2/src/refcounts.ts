import { ShearError } from '@shear/base';
import { FIELD_REFCOUNT_TABLE_OFFSET, MAX_REFCOUNT_TABLE_BYTES } from './header.js';
import { ensureLength, readPadded } from './file-util.js';
import type { GrowableIO } from './growable-io.js';

interface Block {
  offset: number;
  data: Uint8Array;
  view: DataView;
  dirty: boolean;
}

/**
 * The refcount table and refcount blocks of an image, in memory with write-back. Loaded blocks
 * stay in memory (one block covers clusterBytes * 8 / refcountBits clusters, so the memory is a
 * small fraction of the image). Callers serialise all calls (the image's metadata mutex).
 *
 * Blocks Shear creates live in the first cluster of the range they cover (so they count
 * themselves); that cluster is therefore never handed out while its block is missing.
 */
export class Refcounts {
  readonly #file: GrowableIO;
  readonly #clusterBytes: number;
  readonly #bits: number;
  readonly #max: number;
  /** Refcount entries per block. */
  readonly perBlock: number;
  #tableOffset: number;
  #tableClusters: number;
  #table: number[];
  #dirtyTable = new Set<number>();
  #blocks = new Map<number, Block>();
  /** No free cluster lies below this index. */
  #freeHint = 0;

  private constructor(file: GrowableIO, clusterBytes: number, refcountOrder: number, tableOffset: number, tableClusters: number, table: number[]) {
    this.#file = file;
    this.#clusterBytes = clusterBytes;
    this.#bits = 2 ** refcountOrder;
    this.#max = this.#bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** this.#bits - 1;
    this.perBlock = (clusterBytes * 8) / this.#bits;
    this.#tableOffset = tableOffset;
    this.#tableClusters = tableClusters;
    this.#table = table;
  }

  static async load(file: GrowableIO, clusterBytes: number, refcountOrder: number, tableOffset: number, tableClusters: number): Promise<Refcounts> {
    const raw = new Uint8Array(tableClusters * clusterBytes);
    await readPadded(file, tableOffset, raw);
    const view = new DataView(raw.buffer);
    const table: number[] = [];
    for (let i = 0; i < raw.length / 8; i++) {
      const hi = view.getUint32(i * 8);
      const lo = view.getUint32(i * 8 + 4);
      if (hi >= 0x200000) throw corrupt(`refcount table entry ${i} points beyond 2^53 bytes`);
      const off = hi * 2 ** 32 + ((lo & 0xfffffe00) >>> 0);
      if (off % clusterBytes !== 0) throw corrupt(`refcount block ${i} at ${off} is not cluster aligned`);
      table.push(off);
    }
    return new Refcounts(file, clusterBytes, refcountOrder, tableOffset, tableClusters, table);
  }

  get maxRefcount(): number {
    return this.#max;
  }

  get lowestFreeHint(): number {
    return this.#freeHint;
  }

  #blockMissing(r: number): boolean {
    return r >= this.#table.length || this.#table[r] === 0;
  }

  async #block(r: number): Promise<Block | null> {
    const cached = this.#blocks.get(r);
    if (cached) return cached;
    if (this.#blockMissing(r)) return null;
    const offset = this.#table[r]!;
    const data = new Uint8Array(this.#clusterBytes);
    await readPadded(this.#file, offset, data);
    const block: Block = { offset, data, view: new DataView(data.buffer), dirty: false };
    this.#blocks.set(r, block);
    return block;
  }

  #getEntry(b: Block, i: number): number {
    switch (this.#bits) {
      case 8:
        return b.data[i]!;
      case 16:
        return b.view.getUint16(i * 2);
      case 32:
        return b.view.getUint32(i * 4);
      case 64: {
        const hi = b.view.getUint32(i * 8);
        if (hi >= 0x200000) throw corrupt(`refcount of a cluster is above 2^53`);
        return hi * 2 ** 32 + b.view.getUint32(i * 8 + 4);
      }
      default: {
        const bit = i * this.#bits;
        return (b.data[bit >> 3]! >> (bit & 7)) & this.#max;
      }
    }
  }

  #setEntry(b: Block, i: number, v: number): void {
    switch (this.#bits) {
      case 8:
        b.data[i] = v;
        break;
      case 16:
        b.view.setUint16(i * 2, v);
        break;
      case 32:
        b.view.setUint32(i * 4, v);
        break;
      case 64:
        b.view.setUint32(i * 8, Math.floor(v / 2 ** 32));
        b.view.setUint32(i * 8 + 4, v % 2 ** 32);
        break;
      default: {
        const bit = i * this.#bits;
        const byte = bit >> 3;
        const shift = bit & 7;
        b.data[byte] = (b.data[byte]! & ~(this.#max << shift)) | (v << shift);
      }
    }
    b.dirty = true;
  }

  async get(cluster: number): Promise<number> {
    const b = await this.#block(Math.floor(cluster / this.perBlock));
    return b ? this.#getEntry(b, cluster % this.perBlock) : 0;
  }

  /** The first cluster of a range whose block is missing is kept for that block. */
  #reserved(cluster: number): boolean {
    return cluster % this.perBlock === 0 && this.#blockMissing(cluster / this.perBlock);
  }

  /** Whether `cluster` may be handed out: refcount 0 and not kept for a refcount block. */
  async isFree(cluster: number): Promise<boolean> {
    if (this.#reserved(cluster)) return false;
    return (await this.get(cluster)) === 0;
  }

  /** The first run of `count` free clusters at or after `from`. */
  async findFreeRun(count: number, from = this.#freeHint): Promise<number> {
    let start = Math.max(from, 1);
    let c = start;
    while (c - start < count) {
      const r = Math.floor(c / this.perBlock);
      if (this.#blockMissing(r)) {
        // The whole range is free except its first cluster.
        if (c % this.perBlock === 0) {
          start = c + 1;
          c = start;
          continue;
        }
        c = Math.min((r + 1) * this.perBlock, start + count);
        continue;
      }
      const b = (await this.#block(r))!;
      const end = (r + 1) * this.perBlock;
      for (; c < end && c - start < count; c++) {
        if (this.#getEntry(b, c % this.perBlock) !== 0) start = c + 1;
      }
    }
    return start;
  }

  /**
   * Makes sure the block covering `cluster` exists (creating it in memory, and growing the
   * table if needed). Creating or growing can use free clusters, so callers re-check
   * that clusters they picked are still free afterwards.
   */
  async ensureBlockFor(cluster: number): Promise<void> {
    const r = Math.floor(cluster / this.perBlock);
    if (!this.#blockMissing(r)) return;
    if (r >= this.#table.length) await this.#growTable(r + 1);
    // Growing may have created this very block for the new table's own clusters.
    if (this.#blockMissing(r)) this.#createBlock(r);
    await ensureLength(this.#file, (r * this.perBlock + 1) * this.#clusterBytes);
  }

  #createBlock(r: number): void {
    const clusterIndex = r * this.perBlock;
    const offset = clusterIndex * this.#clusterBytes;
    const data = new Uint8Array(this.#clusterBytes);
    const block: Block = { offset, data, view: new DataView(data.buffer), dirty: true };
    this.#setEntry(block, 0, 1);
    this.#blocks.set(r, block);
    this.#table[r] = offset;
    this.#dirtyTable.add(r);
  }

  /** Adds `delta` to the refcount of `cluster`; returns the new refcount. */
  async add(cluster: number, delta: number): Promise<number> {
    await this.ensureBlockFor(cluster);
    const b = (await this.#block(Math.floor(cluster / this.perBlock)))!;
    const i = cluster % this.perBlock;
    const v = this.#getEntry(b, i) + delta;
    if (v < 0) throw new ShearError('ERR_QCOW2_CORRUPT', `Cannot free qcow2 cluster ${cluster}: its refcount is already 0`);
    if (v > this.#max) throw new ShearError('ERR_INTERNAL', `Cannot reference qcow2 cluster ${cluster} again: refcount would exceed ${this.#max}`);
    this.#setEntry(b, i, v);
    if (v === 0 && cluster < this.#freeHint) this.#freeHint = cluster;
    return v;
  }

  /** Tells the scanner that no free cluster lies below `cluster` (after handing clusters out in order). */
  advanceHint(cluster: number): void {
    if (cluster > this.#freeHint) this.#freeHint = cluster;
  }

  /**
   * Moves the table to a bigger place. The new table and any new blocks are written and
   * flushed before the header points at them, and the old table is freed only after that.
   */
  async #growTable(minEntries: number): Promise<void> {
    const perCluster = this.#clusterBytes / 8;
    let entries = Math.max(minEntries, this.#table.length * 2);
    let clusters: number;
    let start: number;
    for (;;) {
      clusters = Math.ceil(entries / perCluster);
      entries = clusters * perCluster;
      start = await this.findFreeRun(clusters, 1);
      const lastBlock = Math.floor((start + clusters - 1) / this.perBlock);
      if (lastBlock < entries) break;
      entries = lastBlock + 1;
    }
    if (clusters * this.#clusterBytes > MAX_REFCOUNT_TABLE_BYTES) {
      throw new ShearError(
        'ERR_NOT_IMPLEMENTED',
        'Cannot grow qcow2 refcount table beyond 8 MiB (QEMU could not open the image): use bigger clusters or narrower refcounts',
      );
    }
    while (this.#table.length < entries) this.#table.push(0);
    for (let c = start; c < start + clusters; c++) {
      const r = Math.floor(c / this.perBlock);
      if (this.#blockMissing(r)) this.#createBlock(r);
      const b = (await this.#block(r))!;
      this.#setEntry(b, c % this.perBlock, this.#getEntry(b, c % this.perBlock) + 1);
    }
    await ensureLength(this.#file, (start + clusters) * this.#clusterBytes);
    for (const b of this.#blocks.values()) {
      if (b.dirty) await ensureLength(this.#file, b.offset + this.#clusterBytes);
    }
    await this.#writeBlocks();
    const raw = new Uint8Array(clusters * this.#clusterBytes);
    const view = new DataView(raw.buffer);
    this.#table.forEach((off, i) => {
      view.setUint32(i * 8, Math.floor(off / 2 ** 32));
      view.setUint32(i * 8 + 4, off % 2 ** 32);
    });
    await this.#file.write(start * this.#clusterBytes, raw);
    await this.#file.flush();
    const field = new Uint8Array(12);
    const fv = new DataView(field.buffer);
    fv.setBigUint64(0, BigInt(start * this.#clusterBytes));
    fv.setUint32(8, clusters);
    await this.#file.write(FIELD_REFCOUNT_TABLE_OFFSET, field);
    await this.#file.flush();
    const oldStart = this.#tableOffset / this.#clusterBytes;
    const oldClusters = this.#tableClusters;
    this.#tableOffset = start * this.#clusterBytes;
    this.#tableClusters = clusters;
    this.#dirtyTable.clear();
    for (let c = oldStart; c < oldStart + oldClusters; c++) await this.add(c, -1);
  }

  async #writeBlocks(): Promise<boolean> {
    let wrote = false;
    for (const b of this.#blocks.values()) {
      if (!b.dirty) continue;
      b.dirty = false;
      try {
        await this.#file.write(b.offset, b.data);
      } catch (err) {
        b.dirty = true;
        throw err;
      }
      wrote = true;
    }
    return wrote;
  }

  /**
   * Writes dirty blocks, then (after a flush, so no table entry points at an unwritten block)
   * dirty table entries. Returns whether anything was written.
   */
  async writeBack(): Promise<boolean> {
    const wroteBlocks = await this.#writeBlocks();
    if (this.#dirtyTable.size === 0) return wroteBlocks;
    await this.#file.flush();
    const dirty = [...this.#dirtyTable].sort((a, b) => a - b);
    const first = dirty[0]!;
    const last = dirty[dirty.length - 1]!;
    const raw = new Uint8Array((last - first + 1) * 8);
    const view = new DataView(raw.buffer);
    for (let i = first; i <= last; i++) {
      const off = this.#table[i] ?? 0;
      view.setUint32((i - first) * 8, Math.floor(off / 2 ** 32));
      view.setUint32((i - first) * 8 + 4, off % 2 ** 32);
    }
    await this.#file.write(this.#tableOffset + first * 8, raw);
    this.#dirtyTable.clear();
    return true;
  }

  get hasDirty(): boolean {
    if (this.#dirtyTable.size > 0) return true;
    for (const b of this.#blocks.values()) if (b.dirty) return true;
    return false;
  }
}

function corrupt(why: string): ShearError {
  return new ShearError('ERR_QCOW2_CORRUPT', `Cannot read qcow2 refcounts: ${why}`);
}
