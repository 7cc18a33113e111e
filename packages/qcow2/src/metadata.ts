import { ShearError } from '@shear/base';
import { Allocator } from './allocator.js';
import { decodeL1, decodeL2, encodeStandard, type ClusterEntry, type RawEntry } from './entries.js';
import { ensureLength } from './file-util.js';
import type { GrowableIO } from './growable-io.js';
import { L2Cache, type L2Table } from './l2-cache.js';
import { AsyncMutex } from './locks.js';
import { checkL2Entry } from './validate.js';
import type { Refcounts } from './refcounts.js';

/** Where one guest cluster of a write goes. */
export interface PlanItem {
  g: number;
  old: ClusterEntry;
  host: number;
  /** The host cluster was allocated for this request. */
  fresh: boolean;
  /** The L2 entry changes at commit. */
  updateEntry: boolean;
}

export const UNALLOCATED: ClusterEntry = Object.freeze({ kind: 'unallocated', hostOffset: 0, compressedBytes: 0, copied: false, hi: 0, lo: 0 });

/**
 * The mapping metadata of an open image: the L1 table (in memory, dirty entries written on
 * flush), the L2 cache, refcounts and allocator (null when read-only). Every method except
 * `releaseFresh` must run inside `mutex`.
 */
export class Qcow2Metadata {
  readonly mutex = new AsyncMutex();
  readonly clusterBits: number;
  readonly clusterBytes: number;
  readonly l2Entries: number;
  readonly rc: Refcounts | null;
  readonly alloc: Allocator | null;
  readonly #file: GrowableIO;
  readonly #zeroFlag: boolean;
  readonly #l1TableOffset: number;
  readonly #l1Raw: Uint8Array;
  readonly #l1: DataView;
  readonly #l1Dirty = new Set<number>();
  readonly #l2: L2Cache;

  constructor(args: { file: GrowableIO; clusterBits: number; zeroFlag: boolean; l1TableOffset: number; l1Raw: Uint8Array; rc: Refcounts | null; l2CacheBytes: number }) {
    this.#file = args.file;
    this.clusterBits = args.clusterBits;
    this.clusterBytes = 2 ** args.clusterBits;
    this.l2Entries = this.clusterBytes / 8;
    this.#zeroFlag = args.zeroFlag;
    this.#l1TableOffset = args.l1TableOffset;
    this.#l1Raw = args.l1Raw;
    this.#l1 = new DataView(args.l1Raw.buffer, args.l1Raw.byteOffset, args.l1Raw.byteLength);
    this.rc = args.rc;
    this.alloc = args.rc ? new Allocator(args.file, args.rc, this.clusterBytes) : null;
    this.#l2 = new L2Cache(args.file, this.clusterBytes, Math.floor(args.l2CacheBytes / this.clusterBytes), async () => {
      await this.rc?.writeBack();
      await this.#file.flush();
    });
  }

  /** The refcounts and allocator; throws when the image is read-only. */
  writable(op: string): { rc: Refcounts; alloc: Allocator } {
    if (!this.rc || !this.alloc) throw new ShearError('ERR_QCOW2_READ_ONLY', `Cannot ${op} qcow2 image: it is open read-only`, { op });
    return { rc: this.rc, alloc: this.alloc };
  }

  /** The guest clusters [first, end) that bytes [offset, offset + bytes) touch (bytes > 0). */
  clusterRange(offset: number, bytes: number): [first: number, end: number] {
    return [Math.floor(offset / this.clusterBytes), Math.floor((offset + bytes - 1) / this.clusterBytes) + 1];
  }

  l1Entry(l1i: number): { l2Offset: number; copied: boolean } {
    return decodeL1(this.#l1.getUint32(l1i * 8), this.#l1.getUint32(l1i * 8 + 4), this.clusterBytes);
  }

  #setL1(l1i: number, l2Offset: number): void {
    const raw = encodeStandard(l2Offset, { copied: true });
    this.#l1.setUint32(l1i * 8, raw.hi);
    this.#l1.setUint32(l1i * 8 + 4, raw.lo);
    this.#l1Dirty.add(l1i);
  }

  /** The L2 table at `l2Offset` (for reading; do not hold it across another cache call). */
  table(l2Offset: number): Promise<L2Table> {
    return this.#l2.get(l2Offset);
  }

  decode(t: L2Table, g: number): ClusterEntry {
    const at = (g % this.l2Entries) * 8;
    return decodeL2(t.view.getUint32(at), t.view.getUint32(at + 4), this.clusterBits, this.#zeroFlag);
  }

  async lookupRange(first: number, count: number): Promise<ClusterEntry[]> {
    const out: ClusterEntry[] = [];
    const end = first + count;
    let g = first;
    while (g < end) {
      const l1i = Math.floor(g / this.l2Entries);
      const stop = Math.min(end, (l1i + 1) * this.l2Entries);
      const { l2Offset } = this.l1Entry(l1i);
      if (l2Offset === 0) {
        for (; g < stop; g++) out.push(UNALLOCATED);
        continue;
      }
      const t = await this.#l2.get(l2Offset);
      // Checked on every use: an entry past the end of the file would read as zeroes.
      for (; g < stop; g++) out.push(checkL2Entry(this.decode(t, g), g, this.#file.length, this.clusterBytes));
    }
    return out;
  }

  /** The L2 table for L1 index `l1i`, allocating it (zeroed) if missing. */
  async #l2ForWrite(l1i: number): Promise<L2Table> {
    const { rc, alloc } = this.writable('write');
    const { l2Offset, copied } = this.l1Entry(l1i);
    if (l2Offset === 0) {
      const [off] = await alloc.allocate(1);
      this.#setL1(l1i, off!);
      return this.#l2.create(off!);
    }
    if (!copied) {
      if ((await rc.get(l2Offset / this.clusterBytes)) !== 1) {
        throw new ShearError('ERR_NOT_IMPLEMENTED', 'Cannot write qcow2 image: an L2 table is shared (internal snapshots), which Shear does not copy');
      }
      this.#setL1(l1i, l2Offset);
    }
    return this.#l2.get(l2Offset);
  }

  /** Sets L2 entries; `updates` are sorted by guest cluster. */
  async setEntries(updates: readonly { g: number; raw: RawEntry }[]): Promise<void> {
    let i = 0;
    while (i < updates.length) {
      const l1i = Math.floor(updates[i]!.g / this.l2Entries);
      const t = await this.#l2ForWrite(l1i);
      for (; i < updates.length && Math.floor(updates[i]!.g / this.l2Entries) === l1i; i++) {
        const u = updates[i]!;
        const at = (u.g % this.l2Entries) * 8;
        t.view.setUint32(at, u.raw.hi);
        t.view.setUint32(at + 4, u.raw.lo);
      }
      t.dirty = true;
    }
  }

  /** Queues the release of whatever host space `e` referenced (applied after the next flush). */
  dropOld(e: ClusterEntry): void {
    const { alloc } = this.writable('write');
    if (e.kind === 'normal' || e.kind === 'zero-alloc') alloc.queueFree(e.hostOffset, this.clusterBytes);
    else if (e.kind === 'compressed') alloc.queueFree(e.hostOffset, e.compressedBytes);
  }

  /**
   * Decides where each cluster of [first, first + count) will be written: in place when the
   * cluster is a normal (or preallocated zero) cluster with refcount 1, else in a new cluster.
   */
  async plan(first: number, count: number): Promise<PlanItem[]> {
    const { rc, alloc } = this.writable('write');
    const entries = await this.lookupRange(first, count);
    const items: PlanItem[] = [];
    let need = 0;
    for (let i = 0; i < entries.length; i++) {
      const old = entries[i]!;
      const g = first + i;
      if (old.kind === 'normal' || old.kind === 'zero-alloc') {
        const sole = old.copied || (await rc.get(old.hostOffset / this.clusterBytes)) === 1;
        if (sole) {
          items.push({ g, old, host: old.hostOffset, fresh: false, updateEntry: old.kind === 'zero-alloc' || !old.copied });
          continue;
        }
      }
      items.push({ g, old, host: -1, fresh: true, updateEntry: true });
      need++;
    }
    const hosts = await alloc.allocate(need);
    let h = 0;
    let end = 0;
    for (const it of items) {
      if (it.fresh) it.host = hosts[h++]!;
      end = Math.max(end, it.host + this.clusterBytes);
    }
    // A qcow2 file may end inside its last cluster; writers need the whole cluster inside the file.
    await ensureLength(this.#file, end);
    return items;
  }

  /** Points the L2 entries at the planned clusters (their data is written) and drops what they replaced. */
  async commit(items: readonly PlanItem[]): Promise<void> {
    const updates = items.filter((it) => it.updateEntry).map((it) => ({ g: it.g, raw: encodeStandard(it.host, { copied: true }) }));
    await this.setEntries(updates);
    for (const it of items) if (it.fresh) this.dropOld(it.old);
  }

  /** Gives back the fresh clusters of a plan that will not be committed (takes the mutex itself). */
  async releaseFresh(items: readonly PlanItem[]): Promise<void> {
    const fresh = items.filter((it) => it.fresh).map((it) => it.host);
    if (fresh.length > 0) await this.mutex.run(() => this.writable('release clusters of').alloc.releaseNow(fresh));
  }

  /**
   * Makes everything durable in crash-safe order (see README): refcounts, flush, L2 tables,
   * flush, L1 entries, flush, then the queued frees, refcounts, flush. Returns whether
   * clusters were freed (cached content of freed host space must be dropped).
   */
  async flush(): Promise<boolean> {
    const { rc, alloc } = this.writable('flush');
    await rc.writeBack();
    await this.#file.flush();
    if (await this.#l2.writeBack()) await this.#file.flush();
    if (await this.#writeL1()) await this.#file.flush();
    if (!alloc.hasPendingFrees) return false;
    const freed = await alloc.applyFrees();
    for (const off of freed) {
      // Returning the space to the file system is a hint; failure changes nothing.
      await this.#file.discard(off, this.clusterBytes).catch(() => undefined);
    }
    if (await rc.writeBack()) await this.#file.flush();
    return true;
  }

  async #writeL1(): Promise<boolean> {
    if (this.#l1Dirty.size === 0) return false;
    const dirty = [...this.#l1Dirty].sort((a, b) => a - b);
    this.#l1Dirty.clear();
    try {
      let i = 0;
      while (i < dirty.length) {
        let j = i;
        while (j + 1 < dirty.length && dirty[j + 1] === dirty[j]! + 1) j++;
        const from = dirty[i]!;
        const to = dirty[j]! + 1;
        await this.#file.write(this.#l1TableOffset + from * 8, this.#l1Raw.subarray(from * 8, to * 8));
        i = j + 1;
      }
    } catch (err) {
      for (const d of dirty) this.#l1Dirty.add(d);
      throw err;
    }
    return true;
  }

  clearCache(): void {
    this.#l2.clear();
  }
}
