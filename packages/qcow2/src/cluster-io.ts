import type { BlockIO, BlockStatusExtent } from '@shear/block';
import type { CompressedClusters } from './compressed-clusters.js';
import { EMPTY_ENTRY, encodeStandard, type ClusterEntry, type RawEntry } from './entries.js';
import { readPadded } from './file-util.js';
import type { GrowableIO } from './growable-io.js';
import type { PlanItem, Qcow2Metadata } from './metadata.js';

/** How whole clusters are rewritten by their L2 entries alone. */
export type RewriteMode = 'zero' | 'zero-unmap' | 'discard';

/** blockStatus looks at no more L2 tables than this per call (callers loop). */
const STATUS_MAX_TABLES = 64;

/**
 * Guest bytes through the cluster map: reads gathered into runs of contiguous host bytes,
 * writes into planned clusters (partial new clusters get their old content first), zeroes and
 * discards done by L2 entries, and block status. Callers hold the range lock of the clusters
 * (and the image's change guard for changes); the metadata mutex is taken here, never across
 * guest data I/O.
 */
export class ClusterIO {
  readonly #file: GrowableIO;
  readonly #backing: BlockIO | null;
  readonly #md: Qcow2Metadata;
  readonly #compressed: CompressedClusters;
  readonly #C: number;
  readonly #length: number;
  /**
   * Whether unallocated clusters may read as something else than zeroes for someone: the
   * image has a backing image now, or names one in its header. An incremental target opened
   * with `backing: null` still names its base, and whoever opens the chain later must see
   * zeroes where zeroes were written, so zero writes and discards use the zero flag then too.
   */
  readonly #chained: boolean;

  constructor(args: { file: GrowableIO; backing: BlockIO | null; md: Qcow2Metadata; compressed: CompressedClusters; diskBytes: number; chained: boolean }) {
    this.#file = args.file;
    this.#backing = args.backing;
    this.#md = args.md;
    this.#compressed = args.compressed;
    this.#C = args.md.clusterBytes;
    this.#length = args.diskBytes;
    this.#chained = args.chained;
  }

  async #readBacking(offset: number, buf: Uint8Array): Promise<void> {
    const b = this.#backing;
    const inside = b ? Math.max(0, Math.min(buf.length, b.length - offset)) : 0;
    if (inside > 0) await b!.read(offset, inside === buf.length ? buf : buf.subarray(0, inside));
    if (inside < buf.length) buf.fill(0, inside);
  }

  /** The current content of guest cluster `g` (described by `e`), as a fresh cluster-sized buffer. */
  async #clusterContent(g: number, e: ClusterEntry): Promise<Uint8Array> {
    const buf = new Uint8Array(this.#C);
    const start = g * this.#C;
    const valid = Math.min(this.#C, this.#length - start);
    switch (e.kind) {
      case 'unallocated':
        if (this.#backing) await this.#readBacking(start, buf.subarray(0, valid));
        break;
      case 'normal':
        await readPadded(this.#file, e.hostOffset, buf);
        break;
      case 'compressed':
        buf.set(await this.#compressed.read(e));
        break;
      default:
        break;
    }
    return buf;
  }

  /** Reads guest bytes [offset, offset + buf.length) whose clusters, from `first` on, are described by `entries`. */
  async readMapped(offset: number, buf: Uint8Array, first: number, entries: readonly ClusterEntry[]): Promise<void> {
    const C = this.#C;
    const end = offset + buf.length;
    const tasks: Promise<void>[] = [];
    // A run of reads from contiguous host bytes, or of guest bytes served by the backing file.
    let run: { kind: 'host' | 'backing'; src: number; at: number; bytes: number } | null = null;
    const flushRun = (): void => {
      if (!run) return;
      const r = run;
      const target = buf.subarray(r.at, r.at + r.bytes);
      tasks.push(r.kind === 'host' ? readPadded(this.#file, r.src, target) : this.#readBacking(r.src, target));
      run = null;
    };
    for (let i = 0; i < entries.length; i++) {
      const e = entries[i]!;
      const g = first + i;
      const from = Math.max(offset, g * C);
      const to = Math.min(end, (g + 1) * C);
      const at = from - offset;
      const bytes = to - from;
      if (e.kind === 'normal') {
        const src = e.hostOffset + (from - g * C);
        if (run?.kind === 'host' && run.src + run.bytes === src) run.bytes += bytes;
        else {
          flushRun();
          run = { kind: 'host', src, at, bytes };
        }
      } else if (e.kind === 'unallocated' && this.#backing) {
        if (run?.kind === 'backing') run.bytes += bytes;
        else {
          flushRun();
          run = { kind: 'backing', src: from, at, bytes };
        }
      } else if (e.kind === 'compressed') {
        flushRun();
        tasks.push(
          this.#compressed.read(e).then((data) => {
            buf.set(data.subarray(from - g * C, to - g * C), at);
          }),
        );
      } else {
        flushRun();
        buf.fill(0, at, at + bytes);
      }
    }
    flushRun();
    await Promise.all(tasks);
  }

  /** Writes `buf` at `offset`; the caller holds the exclusive lock on clusters [first, end). */
  async writeLocked(offset: number, buf: Uint8Array, first: number, end: number): Promise<void> {
    const C = this.#C;
    const items = await this.#md.mutex.run(() => this.#md.plan(first, end - first));
    try {
      const writes: { host: number; data: Uint8Array; bufAt: number }[] = [];
      const pieces = await Promise.all(
        items.map(async (it) => {
          const cStart = it.g * C;
          const from = Math.max(offset, cStart);
          const to = Math.min(offset + buf.length, cStart + C);
          const full = from === cStart && to >= Math.min(cStart + C, this.#length);
          const piece = buf.subarray(from - offset, to - offset);
          if (full || (!it.fresh && it.old.kind === 'normal')) {
            return { host: it.host + (from - cStart), data: piece, bufAt: from - offset };
          }
          // A partial cluster in a new cluster (copy-on-write) or in a preallocated zero cluster.
          const content = it.fresh ? await this.#clusterContent(it.g, it.old) : new Uint8Array(C);
          content.set(piece, from - cStart);
          return { host: it.host, data: content, bufAt: -1 };
        }),
      );
      for (const p of pieces) {
        const prev = writes[writes.length - 1];
        if (prev && prev.bufAt >= 0 && p.bufAt >= 0 && prev.host + prev.data.length === p.host && prev.bufAt + prev.data.length === p.bufAt) {
          prev.data = buf.subarray(prev.bufAt, p.bufAt + p.data.length);
        } else {
          writes.push({ ...p });
        }
      }
      await Promise.all(writes.map((w) => this.#file.write(w.host, w.data)));
    } catch (err) {
      await this.#md.releaseFresh(items);
      throw err;
    }
    // A failure from here on leaves the fresh clusters leaked, never doubly used.
    await this.#md.mutex.run(() => this.#md.commit(items));
  }

  /** Fills the part of a planned cluster outside [from, to) with its current content, where the host cluster does not hold it already. */
  async prepareEdge(it: PlanItem, from: number, to: number): Promise<void> {
    const cStart = it.g * this.#C;
    const inside = from <= cStart && to >= Math.min(cStart + this.#C, this.#length);
    if (inside || (!it.fresh && it.old.kind === 'normal')) return;
    const content = it.fresh ? await this.#clusterContent(it.g, it.old) : new Uint8Array(this.#C);
    await this.#file.write(it.host, content);
  }

  /** Zeroes part of one cluster, unless it already reads as zeroes (the caller holds its lock). */
  async zeroPartialLocked(from: number, to: number): Promise<void> {
    const [first, end] = this.#md.clusterRange(from, to - from);
    const [e] = await this.#md.mutex.run(() => this.#md.lookupRange(first, 1));
    if (e!.kind === 'zero-plain' || e!.kind === 'zero-alloc' || (e!.kind === 'unallocated' && !this.#chained)) return;
    await this.writeLocked(from, new Uint8Array(to - from), first, end);
  }

  /** Rewrites the L2 entries of whole clusters [first, end) for zeroing or discarding (the caller holds their lock). */
  async rewriteLocked(first: number, end: number, mode: RewriteMode): Promise<void> {
    let g = first;
    while (g < end) {
      // One L2 table per turn of the mutex, so a huge range does not starve other requests.
      const stop = Math.min(end, (Math.floor(g / this.#md.l2Entries) + 1) * this.#md.l2Entries);
      const from = g;
      await this.#md.mutex.run(async () => {
        const entries = await this.#md.lookupRange(from, stop - from);
        const updates: { g: number; raw: RawEntry }[] = [];
        const dropped: ClusterEntry[] = [];
        entries.forEach((e, i) => {
          const next = rewriteEntry(e, mode, this.#chained);
          if (!next) return;
          updates.push({ g: from + i, raw: next.raw });
          if (next.drop) dropped.push(e);
        });
        if (updates.length === 0) return;
        await this.#md.setEntries(updates);
        for (const e of dropped) this.#md.dropOld(e);
      });
      g = stop;
    }
  }

  /** Status of guest bytes [offset, offset + bytes), bytes > 0 (may stop short: callers loop). */
  async blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    const C = this.#C;
    const end = offset + bytes;
    type Run = { from: number; to: number; kind: 'data' | 'zero' | 'below' };
    const runs: Run[] = await this.#md.mutex.run(async () => {
      const out: Run[] = [];
      const push = (from: number, to: number, kind: Run['kind']): void => {
        const prev = out[out.length - 1];
        if (prev && prev.kind === kind && prev.to === from) prev.to = to;
        else out.push({ from, to, kind });
      };
      let pos = offset;
      let tables = 0;
      while (pos < end && tables < STATUS_MAX_TABLES) {
        const g = Math.floor(pos / C);
        const l1i = Math.floor(g / this.#md.l2Entries);
        const tableEnd = Math.min(end, (l1i + 1) * this.#md.l2Entries * C);
        const { l2Offset } = this.#md.l1Entry(l1i);
        if (l2Offset === 0) {
          push(pos, tableEnd, 'below');
          pos = tableEnd;
          continue;
        }
        tables++;
        const t = await this.#md.table(l2Offset);
        for (let c = g; pos < tableEnd; c++) {
          const e = this.#md.decode(t, c);
          const to = Math.min(tableEnd, (c + 1) * C);
          push(pos, to, e.kind === 'unallocated' ? 'below' : e.kind === 'zero-plain' || e.kind === 'zero-alloc' ? 'zero' : 'data');
          pos = to;
        }
      }
      return out;
    });
    const extents: BlockStatusExtent[] = [];
    const add = (x: BlockStatusExtent): void => {
      const prev = extents[extents.length - 1];
      if (prev && prev.allocated === x.allocated && prev.zero === x.zero && prev.data === x.data && prev.offset + prev.bytes === x.offset) {
        prev.bytes += x.bytes;
      } else extents.push(x);
    };
    for (const r of runs) {
      if (r.kind === 'data') add({ offset: r.from, bytes: r.to - r.from, data: true, zero: false, allocated: true });
      else if (r.kind === 'zero') add({ offset: r.from, bytes: r.to - r.from, data: false, zero: true, allocated: true });
      else await this.#statusBelow(r.from, r.to, add);
    }
    return extents;
  }

  /** Status of unallocated guest bytes: what the backing file holds there, zeroes past its end. */
  async #statusBelow(from: number, to: number, add: (x: BlockStatusExtent) => void): Promise<void> {
    const b = this.#backing;
    let pos = from;
    const inside = b ? Math.min(to, b.length) : from;
    while (b && pos < inside) {
      const got = await b.blockStatus(pos, inside - pos);
      if (got.length === 0) break;
      for (const x of got) {
        const xEnd = Math.min(inside, x.offset + x.bytes);
        if (xEnd <= pos) continue;
        add({ offset: pos, bytes: xEnd - pos, data: x.data, zero: x.zero, allocated: false });
        pos = xEnd;
      }
    }
    if (pos < to) add({ offset: pos, bytes: to - pos, data: false, zero: true, allocated: false });
  }
}

/** The new entry for a zeroed or discarded cluster (null: unchanged), and whether its host space is dropped. */
function rewriteEntry(e: ClusterEntry, mode: RewriteMode, chained: boolean): { raw: RawEntry; drop: boolean } | null {
  const hasHost = e.kind === 'normal' || e.kind === 'zero-alloc' || e.kind === 'compressed';
  const zeroPlain = encodeStandard(0, { copied: false, zero: true });
  if (mode === 'discard') {
    if (chained) return e.kind === 'zero-plain' ? null : { raw: zeroPlain, drop: hasHost };
    return e.kind === 'unallocated' ? null : { raw: EMPTY_ENTRY, drop: hasHost };
  }
  // Without a backing file an unallocated cluster already reads as zeroes: no L2 table is spent on it.
  if (e.kind === 'unallocated' && !chained) return null;
  if (mode === 'zero-unmap') return e.kind === 'zero-plain' ? null : { raw: zeroPlain, drop: hasHost };
  if (e.kind === 'zero-plain' || (e.kind === 'zero-alloc' && e.copied)) return null;
  if (e.kind === 'normal' && e.copied) return { raw: encodeStandard(e.hostOffset, { copied: true, zero: true }), drop: false };
  return { raw: zeroPlain, drop: hasHost };
}
