import { ShearError, assertRange } from '@shear/base';
import type { BlockIO, BlockStatusExtent, HostExtent, HostMappable, WriteMapping, WriteOptions, WriteZeroesOptions } from '@shear/block';
import type { Allocator } from './allocator.js';
import {
  loadStoredBitmaps,
  markInUse,
  removeBitmapsFrom,
  storeBitmapsIn,
  type BitmapContext,
  type BitmapToStore,
  type StoredBitmap,
} from './bitmaps-store.js';
import { inflateCluster, deflateCluster } from './compressed.js';
import { formatQcow2, type Qcow2CreateOptions } from './create.js';
import { EMPTY_ENTRY, encodeCompressed, encodeStandard, type ClusterEntry, type RawEntry } from './entries.js';
import { readPadded } from './file-util.js';
import type { GrowableIO } from './growable-io.js';
import {
  AUTOCLEAR_BITMAPS,
  COMPRESSION_ZLIB,
  EXT_BITMAPS,
  FIELD_AUTOCLEAR,
  KNOWN_AUTOCLEAR,
  V3_MIN_HEADER_BYTES,
  parseFixedHeader,
  parseHeaderCluster,
  type ParsedHeader,
} from './header.js';
import { mappingOf, pushExtent } from './host-mapping.js';
import { RangeLock } from './locks.js';
import { Qcow2Metadata, type PlanItem } from './metadata.js';
import { checkOpenable } from './open-checks.js';
import { loadCheckedTables } from './validate.js';
import { Refcounts } from './refcounts.js';

export interface Qcow2OpenOptions {
  readOnly?: boolean;
  /**
   * The backing image. `null` means none, even if the header names one. When absent and the
   * header names a backing file, `openBacking` is called. A given `backing` stays the caller's
   * (not closed by the image); one opened through `openBacking` is owned and closed by the image.
   */
  backing?: BlockIO | null;
  /** Opens the backing file named in the header (the name as stored: relative names are the caller's to resolve). */
  openBacking?: (name: string, format: string | null) => Promise<BlockIO>;
  /** Memory for the L2 table cache; default 32 MiB. */
  l2CacheBytes?: number;
  /**
   * What to do, when opening for writing, with persistent bitmaps that are enabled ("auto") and
   * consistent: the image alone cannot keep them up to date, so by default the open is refused.
   * - 'mark-inconsistent' sets their in_use flag (QEMU then reports them inconsistent).
   * - 'take' loads every consistent bitmap (enabled or not; `takenBitmaps`) and sets its in_use
   *   flag on disk, as QEMU does when it opens an image read-write: the caller now owns them,
   *   records writes in them and stores them back (`storeBitmaps(..., { inUse: false })`) on a
   *   clean close. A crash before that leaves them inconsistent, never silently stale.
   */
  enabledBitmaps?: 'refuse' | 'mark-inconsistent' | 'take';
  /**
   * Direct access to the protocol file's bytes for worker threads (the graph passes its child
   * edge's hostMapping()); null for none. Default: `file` itself when it is HostMappable or
   * has a hostMapping() method.
   */
  fileMapping?: HostMappable | null;
}

export interface Qcow2Info {
  version: number;
  clusterBytes: number;
  refcountBits: number;
  backingFile: string | null;
  backingFormat: string | null;
  compressionType: 'zlib' | 'zstd';
  /** Unknown header extensions are kept as they are (Shear never rewrites the extension area). */
  extensionTypes: number[];
}

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
  /** Ends the mapping's part in the persistent-bitmap guard (see #enterChange). */
  leave: () => void;
}

type RewriteMode = 'zero' | 'zero-unmap' | 'discard';
type MapReadFn = (offset: number, bytes: number) => Promise<HostExtent[]>;
type MapWriteFn = (offset: number, bytes: number) => Promise<WriteMapping>;

const DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024;
const COMPRESSED_CACHE_ENTRIES = 8;
/** blockStatus looks at no more L2 tables than this per call (callers loop). */
const STATUS_MAX_TABLES = 64;

/**
 * A qcow2 image (version 3 read-write, version 2 read-only) served as a BlockIO on top of its
 * protocol child `file`, with an optional backing BlockIO. The image owns `file` from the
 * moment `open` is called (it closes it on close and when open fails).
 *
 * Concurrency: guest clusters are guarded by a range lock (reads shared, anything that writes
 * or remaps exclusive), and all metadata (L1, L2 cache, refcounts, allocator) by one mutex
 * that is never held across guest data I/O.
 *
 * Crash ordering (see README): data and refcount increments reach the disk before the L2
 * entries that reference them, L2 tables before the L1 entries that point at them, and
 * refcount decrements only after the metadata that dropped the reference. A crash therefore
 * leaves at worst leaked clusters.
 */
export class Qcow2Image implements BlockIO {
  readonly #file: GrowableIO;
  readonly #backing: BlockIO | null;
  readonly #ownsBacking: boolean;
  readonly #readOnly: boolean;
  readonly #parsed: ParsedHeader;
  /** Cluster size in bytes. */
  readonly #C: number;
  readonly #md: Qcow2Metadata;
  readonly #fileMapping: HostMappable | null | undefined;
  readonly #locks = new RangeLock();
  readonly #mappings = new Map<Qcow2WriteMapping, MappingState>();
  readonly #compressedCache = new Map<string, Uint8Array>();
  readonly #taken: readonly StoredBitmap[];
  /**
   * Enabled bitmaps this image stored consistent (in_use clear): the next change to the disk
   * must set their in_use flag, durably, before it can reach the disk.
   */
  readonly #cleanEnabled = new Set<string>();
  #markingInUse: Promise<void> | null = null;
  /** Changes to the disk under way (writes, zeroes, discards, outstanding write mappings). */
  #changes = 0;
  #whenNoChanges: (() => void)[] = [];
  /** Set while enabled bitmaps are being stored consistent: new changes wait for it. */
  #cleanStore: Promise<void> | null = null;
  #state: 'open' | 'closing' | 'closed' = 'open';
  #closePromise: Promise<void> | null = null;

  private constructor(args: {
    file: GrowableIO;
    backing: BlockIO | null;
    ownsBacking: boolean;
    readOnly: boolean;
    parsed: ParsedHeader;
    l1Raw: Uint8Array;
    rc: Refcounts | null;
    l2CacheBytes: number;
    fileMapping: HostMappable | null | undefined;
    taken: readonly StoredBitmap[];
  }) {
    this.#taken = args.taken;
    this.#fileMapping = args.fileMapping;
    this.#file = args.file;
    this.#backing = args.backing;
    this.#ownsBacking = args.ownsBacking;
    this.#readOnly = args.readOnly;
    this.#parsed = args.parsed;
    const h = args.parsed.header;
    this.#C = 2 ** h.clusterBits;
    this.#md = new Qcow2Metadata({
      file: args.file,
      clusterBits: h.clusterBits,
      zeroFlag: h.version >= 3,
      l1TableOffset: h.l1TableOffset,
      l1Raw: args.l1Raw,
      rc: args.rc,
      l2CacheBytes: args.l2CacheBytes,
    });
  }

  /** Opens the qcow2 image stored in `file` (ownership of `file` passes to the image, also on failure). */
  static async open(file: GrowableIO, opts: Qcow2OpenOptions = {}): Promise<Qcow2Image> {
    let backing: BlockIO | null = null;
    let ownsBacking = false;
    try {
      const readOnly = opts.readOnly ?? false;
      const fixed = new Uint8Array(V3_MIN_HEADER_BYTES + 8);
      await readPadded(file, 0, fixed);
      const { clusterBits } = parseFixedHeader(fixed);
      const cluster0 = new Uint8Array(2 ** clusterBits);
      await readPadded(file, 0, cluster0);
      const parsed = parseHeaderCluster(cluster0);
      const h = parsed.header;
      checkOpenable(parsed, !readOnly);
      const l1Raw = await loadCheckedTables(file, h, 2 ** clusterBits);
      const rc = readOnly
        ? null
        : await Refcounts.load(file, 2 ** clusterBits, h.refcountOrder, h.refcountTableOffset, h.refcountTableClusters);

      let toMark: string[] = [];
      let taken: StoredBitmap[] = [];
      const bitmapCtx: BitmapContext = { file, clusterBytes: 2 ** clusterBits, diskBytes: h.size, rc: null, alloc: null };
      const bitmapsExt = parsed.extensions.find((e) => e.type === EXT_BITMAPS);
      if (!readOnly && bitmapsExt && h.autoclearFeatures & AUTOCLEAR_BITMAPS) {
        if (opts.enabledBitmaps === 'take') {
          taken = await loadStoredBitmaps(bitmapCtx);
          toMark = taken.filter((b) => !b.flags.inUse).map((b) => b.name);
        } else {
          const live = (await loadStoredBitmaps(bitmapCtx, false)).filter((b) => b.flags.auto && !b.flags.inUse);
          if (live.length > 0 && opts.enabledBitmaps !== 'mark-inconsistent') {
            throw new ShearError(
              'ERR_NOT_IMPLEMENTED',
              `Cannot open qcow2 image for writing: it has enabled persistent bitmap(s) ${live.map((b) => `'${b.name}'`).join(', ')}, which the image alone cannot keep up to date (open with enabledBitmaps 'take' or 'mark-inconsistent')`,
            );
          }
          toMark = live.map((b) => b.name);
        }
      }

      if (opts.backing !== undefined) {
        backing = opts.backing;
      } else if (parsed.backingFile !== null) {
        if (!opts.openBacking) {
          throw new ShearError(
            'ERR_INVALID_ARGUMENT',
            `Cannot open qcow2 image: it has backing file '${parsed.backingFile}' but no way to open it was given (pass backing or openBacking)`,
          );
        }
        backing = await opts.openBacking(parsed.backingFile, parsed.backingFormat);
        ownsBacking = true;
      }

      // Changes to the image come last, once nothing else can make the open fail.
      if (!readOnly) {
        if (toMark.length > 0) await markInUse(bitmapCtx, toMark);
        const unknownAutoclear = h.autoclearFeatures & ~KNOWN_AUTOCLEAR;
        if (unknownAutoclear !== 0n) {
          // The spec lets a writer that does not know an autoclear feature write only after clearing it.
          const raw = new Uint8Array(8);
          new DataView(raw.buffer).setBigUint64(0, h.autoclearFeatures & KNOWN_AUTOCLEAR);
          await file.write(FIELD_AUTOCLEAR, raw);
          await file.flush();
          h.autoclearFeatures &= KNOWN_AUTOCLEAR;
        }
      }
      return new Qcow2Image({
        file,
        backing,
        ownsBacking,
        readOnly,
        parsed,
        l1Raw,
        rc,
        l2CacheBytes: opts.l2CacheBytes ?? DEFAULT_L2_CACHE_BYTES,
        fileMapping: opts.fileMapping,
        taken,
      });
    } catch (err) {
      if (ownsBacking) await backing?.close().catch(() => undefined);
      await file.close().catch(() => undefined);
      throw err;
    }
  }

  /**
   * Formats `file` as a new empty image and opens it for writing (ownership of `file` passes to
   * the image). An image with a backing file needs `backing` or `openBacking`, checked before
   * anything is written.
   */
  static async create(file: GrowableIO, opts: Qcow2CreateOptions & Omit<Qcow2OpenOptions, 'readOnly'>): Promise<Qcow2Image> {
    try {
      if (opts.backingFile !== undefined && opts.backing === undefined && !opts.openBacking) {
        throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot create qcow2 image: backing file '${opts.backingFile}' needs backing or openBacking to open it`);
      }
      await formatQcow2(file, opts);
    } catch (err) {
      await file.close().catch(() => undefined);
      throw err;
    }
    return Qcow2Image.open(file, { ...opts, readOnly: false });
  }

  get length(): number {
    return this.#parsed.header.size;
  }

  get clusterBytes(): number {
    return this.#C;
  }

  get readOnly(): boolean {
    return this.#readOnly;
  }

  get info(): Qcow2Info {
    const h = this.#parsed.header;
    return {
      version: h.version,
      clusterBytes: this.#C,
      refcountBits: 2 ** h.refcountOrder,
      backingFile: this.#parsed.backingFile,
      backingFormat: this.#parsed.backingFormat,
      compressionType: h.compressionType === COMPRESSION_ZLIB ? 'zlib' : 'zstd',
      extensionTypes: this.#parsed.extensions.map((e) => e.type),
    };
  }

  // ---------------------------------------------------------------- guards

  #checkOpen(op: string): void {
    if (this.#state !== 'open') throw new ShearError('ERR_QCOW2_CLOSED', `Cannot ${op} qcow2 image: it is closed`, { op });
  }

  #checkWritable(op: string): { rc: Refcounts; alloc: Allocator } {
    this.#checkOpen(op);
    return this.#md.writable(op);
  }

  #clusterRange(offset: number, bytes: number): [first: number, end: number] {
    return [Math.floor(offset / this.#C), Math.floor((offset + bytes - 1) / this.#C) + 1];
  }

  // ---------------------------------------------------------------- content helpers

  async #readBacking(offset: number, buf: Uint8Array): Promise<void> {
    const b = this.#backing;
    const inside = b ? Math.max(0, Math.min(buf.length, b.length - offset)) : 0;
    if (inside > 0) await b!.read(offset, inside === buf.length ? buf : buf.subarray(0, inside));
    if (inside < buf.length) buf.fill(0, inside);
  }

  async #readCompressed(e: ClusterEntry): Promise<Uint8Array> {
    if (this.#parsed.header.compressionType !== COMPRESSION_ZLIB) {
      throw new ShearError('ERR_NOT_IMPLEMENTED', 'Cannot read qcow2 compressed cluster: zstd compression is not supported');
    }
    const key = `${e.hi}:${e.lo}`;
    const hit = this.#compressedCache.get(key);
    if (hit) return hit;
    const raw = new Uint8Array(e.compressedBytes);
    await readPadded(this.#file, e.hostOffset, raw);
    const out = inflateCluster(raw, this.#C, e.hostOffset);
    this.#compressedCache.set(key, out);
    if (this.#compressedCache.size > COMPRESSED_CACHE_ENTRIES) {
      this.#compressedCache.delete(this.#compressedCache.keys().next().value!);
    }
    return out;
  }

  /** The current content of guest cluster `g` (described by `e`), as a fresh cluster-sized buffer. */
  async #clusterContent(g: number, e: ClusterEntry): Promise<Uint8Array> {
    const buf = new Uint8Array(this.#C);
    const start = g * this.#C;
    const valid = Math.min(this.#C, this.length - start);
    switch (e.kind) {
      case 'unallocated':
        if (this.#backing) await this.#readBacking(start, buf.subarray(0, valid));
        break;
      case 'normal':
        await readPadded(this.#file, e.hostOffset, buf);
        break;
      case 'compressed':
        buf.set(await this.#readCompressed(e));
        break;
      default:
        break;
    }
    return buf;
  }

  // ---------------------------------------------------------------- BlockIO

  async read(offset: number, buf: Uint8Array): Promise<void> {
    this.#checkOpen('read');
    assertRange(offset, buf.length, this.length, 'read');
    if (buf.length === 0) return;
    const [first, end] = this.#clusterRange(offset, buf.length);
    const release = await this.#locks.acquire(first, end, false);
    try {
      const entries = await this.#md.mutex.run(() => this.#md.lookupRange(first, end - first));
      await this.#readMapped(offset, buf, first, entries);
    } finally {
      release();
    }
  }

  async #readMapped(offset: number, buf: Uint8Array, first: number, entries: readonly ClusterEntry[]): Promise<void> {
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
          this.#readCompressed(e).then((data) => {
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

  async write(offset: number, buf: Uint8Array, opts?: WriteOptions): Promise<void> {
    this.#checkWritable('write');
    assertRange(offset, buf.length, this.length, 'write');
    if (buf.length === 0) return;
    const leave = await this.#enterChange();
    try {
      const [first, end] = this.#clusterRange(offset, buf.length);
      const release = await this.#locks.acquire(first, end, true);
      try {
        await this.#writeLocked(offset, buf, first, end);
      } finally {
        release();
      }
    } finally {
      leave();
    }
    if (opts?.fua) await this.flush();
  }

  /** Writes `buf` at `offset`; the caller holds the exclusive lock on clusters [first, end). */
  async #writeLocked(offset: number, buf: Uint8Array, first: number, end: number): Promise<void> {
    const C = this.#C;
    const items = await this.#md.mutex.run(() => this.#md.plan(first, end - first));
    try {
      const writes: { host: number; data: Uint8Array; bufAt: number }[] = [];
      const pieces = await Promise.all(
        items.map(async (it) => {
          const cStart = it.g * C;
          const from = Math.max(offset, cStart);
          const to = Math.min(offset + buf.length, cStart + C);
          const full = from === cStart && to >= Math.min(cStart + C, this.length);
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

  async writeZeroes(offset: number, bytes: number, opts?: WriteZeroesOptions): Promise<void> {
    this.#checkWritable('write zeroes to');
    assertRange(offset, bytes, this.length, 'write zeroes');
    if (bytes === 0) return;
    const C = this.#C;
    const end = offset + bytes;
    const wholeFrom = Math.ceil(offset / C) * C;
    const wholeTo = end === this.length ? Math.ceil(end / C) * C : Math.floor(end / C) * C;
    const partial: [number, number][] = [];
    if (wholeFrom >= wholeTo) partial.push([offset, end]);
    else {
      if (offset < wholeFrom) partial.push([offset, wholeFrom]);
      if (wholeTo < end) partial.push([wholeTo, end]);
    }
    if (opts?.fastOnly && partial.length > 0) {
      throw new ShearError('ERR_NOT_IMPLEMENTED', `Cannot write zeroes fast to qcow2 image at (${offset}, ${bytes}): it covers part of a cluster`, { offset, bytes });
    }
    const leave = await this.#enterChange();
    try {
      // One lock over the whole request, so it applies as a unit against overlapping requests.
      const [firstCluster, endCluster] = this.#clusterRange(offset, bytes);
      const release = await this.#locks.acquire(firstCluster, endCluster, true);
      try {
        for (const [from, to] of partial) await this.#zeroPartialLocked(from, to);
        if (wholeFrom < wholeTo) await this.#rewriteLocked(wholeFrom / C, wholeTo / C, opts?.mayUnmap ? 'zero-unmap' : 'zero');
      } finally {
        release();
      }
    } finally {
      leave();
    }
    if (opts?.fua) await this.flush();
  }

  /**
   * Whether unallocated clusters may read as something else than zeroes for someone: the
   * image has a backing image now, or names one in its header. An incremental target opened
   * with `backing: null` still names its base, and whoever opens the chain later must see
   * zeroes where zeroes were written, so zero writes and discards use the zero flag then too.
   */
  get #chained(): boolean {
    return this.#backing !== null || this.#parsed.backingFile !== null;
  }

  /** Zeroes part of one cluster, unless it already reads as zeroes (the caller holds its lock). */
  async #zeroPartialLocked(from: number, to: number): Promise<void> {
    const [first, end] = this.#clusterRange(from, to - from);
    const [e] = await this.#md.mutex.run(() => this.#md.lookupRange(first, 1));
    if (e!.kind === 'zero-plain' || e!.kind === 'zero-alloc' || (e!.kind === 'unallocated' && !this.#chained)) return;
    await this.#writeLocked(from, new Uint8Array(to - from), first, end);
  }

  /**
   * Discards whole clusters inside the range (partial clusters are left alone: discard is a
   * hint). Without a backing file they become unallocated (read as zeroes); with one they get
   * the zero flag, so old backing data does not show through (QEMU does the same).
   */
  async discard(offset: number, bytes: number): Promise<void> {
    this.#checkWritable('discard');
    assertRange(offset, bytes, this.length, 'discard');
    const C = this.#C;
    const end = offset + bytes;
    const first = Math.ceil(offset / C);
    const last = end === this.length ? Math.ceil(end / C) : Math.floor(end / C);
    if (first >= last) return;
    const leave = await this.#enterChange();
    try {
      const release = await this.#locks.acquire(first, last, true);
      try {
        await this.#rewriteLocked(first, last, 'discard');
      } finally {
        release();
      }
    } finally {
      leave();
    }
  }

  /** Rewrites the L2 entries of whole clusters [first, end) for zeroing or discarding (the caller holds their lock). */
  async #rewriteLocked(first: number, end: number, mode: RewriteMode): Promise<void> {
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
          const next = this.#rewriteEntry(e, mode);
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

  /** The new entry for a zeroed or discarded cluster (null: unchanged), and whether its host space is dropped. */
  #rewriteEntry(e: ClusterEntry, mode: RewriteMode): { raw: RawEntry; drop: boolean } | null {
    const hasHost = e.kind === 'normal' || e.kind === 'zero-alloc' || e.kind === 'compressed';
    const zeroPlain = encodeStandard(0, { copied: false, zero: true });
    if (mode === 'discard') {
      if (this.#chained) return e.kind === 'zero-plain' ? null : { raw: zeroPlain, drop: hasHost };
      return e.kind === 'unallocated' ? null : { raw: EMPTY_ENTRY, drop: hasHost };
    }
    // Without a backing file an unallocated cluster already reads as zeroes: no L2 table is spent on it.
    if (e.kind === 'unallocated' && !this.#chained) return null;
    if (mode === 'zero-unmap') return e.kind === 'zero-plain' ? null : { raw: zeroPlain, drop: hasHost };
    if (e.kind === 'zero-plain' || (e.kind === 'zero-alloc' && e.copied)) return null;
    if (e.kind === 'normal' && e.copied) return { raw: encodeStandard(e.hostOffset, { copied: true, zero: true }), drop: false };
    return { raw: zeroPlain, drop: hasHost };
  }

  async #flushMetadata(): Promise<void> {
    if (await this.#md.flush()) this.#compressedCache.clear();
  }

  async flush(): Promise<void> {
    this.#checkOpen('flush');
    if (this.#readOnly) return;
    await this.#md.mutex.run(() => this.#flushMetadata());
  }

  async blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    this.#checkOpen('query block status of');
    assertRange(offset, bytes, this.length, 'block status');
    if (bytes === 0) return [];
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

  // ---------------------------------------------------------------- compressed writes

  /**
   * Writes one whole cluster compressed (the last cluster may be short when the virtual size is
   * not cluster aligned). Data that does not compress is written as a normal cluster.
   */
  async writeCompressed(offset: number, data: Uint8Array): Promise<void> {
    const { alloc } = this.#checkWritable('write compressed data to');
    const C = this.#C;
    assertRange(offset, data.length, this.length, 'compressed write');
    if (offset % C !== 0 || (data.length !== C && offset + data.length !== this.length) || data.length === 0) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot write compressed data at (${offset}, ${data.length}): it must be one whole cluster of ${C} bytes`, {
        offset,
        bytes: data.length,
      });
    }
    if (this.#parsed.header.compressionType !== COMPRESSION_ZLIB) {
      throw new ShearError('ERR_NOT_IMPLEMENTED', 'Cannot write compressed data to qcow2 image: zstd compression is not supported');
    }
    let padded = data;
    if (data.length < C) {
      padded = new Uint8Array(C);
      padded.set(data);
    }
    const packed = deflateCluster(padded);
    if (!packed) return this.write(offset, data);
    return this.#storeDeflated(offset, packed, alloc);
  }

  /**
   * Stores a cluster that the caller already deflated (raw deflate, windowBits 12, which is what
   * QEMU inflates with) and that came out smaller than a cluster: the parallel copy engine
   * compresses in worker threads and only the allocation runs here.
   * @throws ERR_INVALID_ARGUMENT for an unaligned offset or data not smaller than a cluster
   */
  async writeDeflated(offset: number, packed: Uint8Array): Promise<void> {
    const { alloc } = this.#checkWritable('write compressed data to');
    const C = this.#C;
    assertRange(offset, 1, this.length, 'compressed write');
    if (offset % C !== 0 || packed.length === 0 || packed.length >= C) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot store deflated cluster at ${offset}: it must start a cluster and be smaller than ${C} bytes (got ${packed.length})`, { offset, bytes: packed.length });
    }
    if (this.#parsed.header.compressionType !== COMPRESSION_ZLIB) {
      throw new ShearError('ERR_NOT_IMPLEMENTED', 'Cannot write compressed data to qcow2 image: zstd compression is not supported');
    }
    return this.#storeDeflated(offset, packed, alloc);
  }

  async #storeDeflated(offset: number, packed: Uint8Array, alloc: Allocator): Promise<void> {
    const C = this.#C;
    const g = offset / C;
    const leave = await this.#enterChange();
    const release = await this.#locks.acquire(g, g + 1, true).catch((err: unknown) => {
      leave();
      throw err;
    });
    try {
      const host = await this.#md.mutex.run(() => alloc.allocateCompressed(packed.length));
      try {
        await this.#file.write(host, packed);
      } catch (err) {
        await this.#md.mutex.run(() => alloc.releaseCompressedNow(host, packed.length));
        throw err;
      }
      await this.#md.mutex.run(async () => {
        const [old] = await this.#md.lookupRange(g, 1);
        await this.#md.setEntries([{ g, raw: encodeCompressed(host, packed.length, this.#md.clusterBits) }]);
        this.#md.dropOld(old!);
      });
    } finally {
      release();
      leave();
    }
  }

  // ---------------------------------------------------------------- write mappings

  /**
   * Reserves host space for a write of [offset, offset + bytes), so that another thread can
   * write the data straight into the protocol file. Clusters already allocated with refcount 1
   * are used in place; the others get fresh clusters (contiguous where free space allows). A
   * fresh cluster only partly inside the range is first filled with its current content
   * (copy-on-write), so the caller writes just its part. The clusters stay locked (no other
   * I/O to them) until `commitMapping` or `abortMapping`.
   *
   * The caller must write every byte of every extent (fresh clusters hold stale bytes), then
   * commit; the L2 entries change only at commit, and become durable with the next flush.
   */
  async mapForWrite(offset: number, bytes: number): Promise<Qcow2WriteMapping> {
    this.#checkWritable('map for writing');
    assertRange(offset, bytes, this.length, 'write mapping');
    if (bytes === 0) {
      const empty: Qcow2WriteMapping = Object.freeze({ offset, bytes, extents: Object.freeze([]) });
      this.#mappings.set(empty, { items: [], release: () => undefined, leave: () => undefined });
      return empty;
    }
    const C = this.#C;
    const [first, end] = this.#clusterRange(offset, bytes);
    // The mapping counts as a change to the disk until it is committed or aborted.
    const leave = await this.#enterChange();
    const release = await this.#locks.acquire(first, end, true).catch((err: unknown) => {
      leave();
      throw err;
    });
    let items: PlanItem[] = [];
    const extents: MappedExtent[] = [];
    try {
      items = await this.#md.mutex.run(() => this.#md.plan(first, end - first));
      await Promise.all(items.map((it) => this.#prepareEdge(it, offset, offset + bytes)));
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

  /** Fills the part of a planned cluster outside [from, to) with its current content, where the host cluster does not hold it already. */
  async #prepareEdge(it: PlanItem, from: number, to: number): Promise<void> {
    const cStart = it.g * this.#C;
    const inside = from <= cStart && to >= Math.min(cStart + this.#C, this.length);
    if (inside || (!it.fresh && it.old.kind === 'normal')) return;
    const content = it.fresh ? await this.#clusterContent(it.g, it.old) : new Uint8Array(this.#C);
    await this.#file.write(it.host, content);
  }

  #takeMapping(m: Qcow2WriteMapping, op: string): MappingState {
    const st = this.#mappings.get(m);
    if (!st) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot ${op} write mapping (${m.offset}, ${m.bytes}): it is not outstanding on this image`);
    this.#mappings.delete(m);
    return st;
  }

  /** Points the L2 entries at the mapped clusters (the caller's data writes have completed). */
  async commitMapping(m: Qcow2WriteMapping): Promise<void> {
    this.#checkWritable('commit a write mapping of');
    const st = this.#takeMapping(m, 'commit');
    try {
      await this.#md.mutex.run(() => this.#md.commit(st.items));
    } finally {
      st.release();
      st.leave();
    }
  }

  /** Gives back the fresh clusters of a mapping whose data will not be committed. */
  async abortMapping(m: Qcow2WriteMapping): Promise<void> {
    const st = this.#takeMapping(m, 'abort');
    try {
      await this.#md.releaseFresh(st.items);
    } finally {
      st.release();
      st.leave();
    }
  }

  // ---------------------------------------------------------------- host mapping (worker threads)

  /**
   * Direct host access for worker threads (`HostMappable` of @shear/block), or undefined when
   * the protocol file, or the backing image, offers none. Coordinator-only calls.
   *
   * - mapRead: normal clusters map to the protocol file's extents, zero and unallocated
   *   clusters to `zero` (or, with a backing image, to the backing image's own mapping). The
   *   answer is valid while no write changes the range (callers serialise, as the request table
   *   does); compressed clusters cannot be mapped and reject with ERR_NOT_IMPLEMENTED.
   * - mapWrite: `mapForWrite` plus the protocol file's own write mapping; commit links the
   *   clusters (after the file's commit), abort gives them back.
   */
  hostMapping(): HostMappable | undefined {
    const fileMap = this.#fileMapping === undefined ? mappingOf(this.#file) : (this.#fileMapping ?? undefined);
    if (!fileMap) return undefined;
    const out: HostMappable = {};
    const fileRead = fileMap.mapRead?.bind(fileMap);
    const fileWrite = fileMap.mapWrite?.bind(fileMap);
    const backingMap = this.#backing ? mappingOf(this.#backing) : undefined;
    const backingRead = backingMap?.mapRead?.bind(backingMap);
    if (fileRead && (!this.#backing || backingRead)) out.mapRead = (offset, bytes) => this.#mapRead(fileRead, backingRead, offset, bytes);
    if (fileWrite && !this.#readOnly) out.mapWrite = (offset, bytes) => this.#mapWrite(fileWrite, offset, bytes);
    return out.mapRead || out.mapWrite ? out : undefined;
  }

  async #mapRead(fileRead: MapReadFn, backingRead: MapReadFn | undefined, offset: number, bytes: number): Promise<HostExtent[]> {
    this.#checkOpen('map for reading');
    assertRange(offset, bytes, this.length, 'read mapping');
    if (bytes === 0) return [];
    const C = this.#C;
    const [first, end] = this.#clusterRange(offset, bytes);
    const entries = await this.#md.mutex.run(() => this.#md.lookupRange(first, end - first));
    type Piece = { kind: 'host' | 'backing' | 'zero'; src: number; bytes: number };
    const pieces: Piece[] = [];
    entries.forEach((e, i) => {
      const g = first + i;
      const from = Math.max(offset, g * C);
      const to = Math.min(offset + bytes, (g + 1) * C);
      let p: Piece;
      if (e.kind === 'normal') p = { kind: 'host', src: e.hostOffset + (from - g * C), bytes: to - from };
      else if (e.kind === 'unallocated' && this.#backing) p = { kind: 'backing', src: from, bytes: to - from };
      else if (e.kind === 'compressed') {
        throw new ShearError('ERR_NOT_IMPLEMENTED', `Cannot map qcow2 range (${offset}, ${bytes}) for direct reads: cluster ${g} is compressed`, { offset, bytes });
      } else p = { kind: 'zero', src: 0, bytes: to - from };
      const prev = pieces[pieces.length - 1];
      if (prev && prev.kind === p.kind && (p.kind === 'zero' || prev.src + prev.bytes === p.src)) prev.bytes += p.bytes;
      else pieces.push(p);
    });
    const out: HostExtent[] = [];
    for (const p of pieces) {
      if (p.kind === 'zero') {
        pushExtent(out, { kind: 'zero', bytes: p.bytes });
        continue;
      }
      const limit = p.kind === 'host' ? this.#file.length : this.#backing!.length;
      const inside = Math.max(0, Math.min(p.bytes, limit - p.src));
      const map = p.kind === 'host' ? fileRead : backingRead!;
      if (inside > 0) for (const x of await map(p.src, inside)) pushExtent(out, x);
      if (inside < p.bytes) pushExtent(out, { kind: 'zero', bytes: p.bytes - inside });
    }
    return out;
  }

  async #mapWrite(fileWrite: MapWriteFn, offset: number, bytes: number): Promise<WriteMapping> {
    const m = await this.mapForWrite(offset, bytes);
    const children: WriteMapping[] = [];
    const abortAll = async (): Promise<void> => {
      for (const c of children) await c.abort().catch(() => undefined);
      await this.abortMapping(m);
    };
    try {
      for (const x of m.extents) children.push(await fileWrite(x.hostOffset, x.bytes));
    } catch (err) {
      await abortAll();
      throw err;
    }
    const extents: HostExtent[] = [];
    for (const c of children) for (const x of c.extents) pushExtent(extents, x);
    return {
      extents,
      commit: async () => {
        try {
          for (const c of children) await c.commit();
        } catch (err) {
          await this.abortMapping(m).catch(() => undefined);
          throw err;
        }
        await this.commitMapping(m);
      },
      abort: abortAll,
    };
  }

  // ---------------------------------------------------------------- persistent bitmaps

  /**
   * The bitmaps loaded when the image was opened with `enabledBitmaps: 'take'`, flags as they
   * were found (their in_use flag is now set on disk); empty otherwise.
   */
  get takenBitmaps(): readonly StoredBitmap[] {
    return this.#taken;
  }

  #bitmapContext(): BitmapContext {
    return { file: this.#file, clusterBytes: this.#C, diskBytes: this.length, rc: this.#md.rc, alloc: this.#md.alloc };
  }

  /** Keeps the cached header in step with the bitmap operations' header changes. */
  #syncHeader(p: ParsedHeader): void {
    this.#parsed.extensions = p.extensions;
    this.#parsed.header.autoclearFeatures = p.header.autoclearFeatures;
    this.#parsed.header.backingFileOffset = p.header.backingFileOffset;
  }

  /**
   * The bitmaps stored in the image, read from disk now (directory order). Bits are loaded for
   * consistent bitmaps unless `withBits` is false. An extension without autoclear bit 0 is
   * ignored (a writer that did not know bitmaps changed the image), as QEMU does.
   * @throws ERR_QCOW2_CORRUPT for a malformed directory or table
   */
  async loadBitmaps(opts: { withBits?: boolean } = {}): Promise<StoredBitmap[]> {
    this.#checkOpen('load bitmaps of');
    return this.#md.mutex.run(() => loadStoredBitmaps(this.#bitmapContext(), opts.withBits ?? true));
  }

  /**
   * Writes `bitmaps` into the image: bitmaps with new names are added, same names replaced;
   * other stored bitmaps are left as they are. Empty data clusters are not stored (all-zero
   * table entries), full ones as all-ones entries. Order: data, tables and directory with
   * their refcounts are made durable, then the header is switched, then the old clusters are
   * freed; a crash leaves either the old or the new bitmaps (at worst leaked clusters).
   * With `inUse` the bitmaps are stored marked in use (inconsistent for every reader).
   *
   * Storing enabled bitmaps consistent (`inUse: false`) while the image stays open is safe:
   * the store waits for changes under way (writes, zeroes, discards, outstanding write
   * mappings: the caller has set their bits by the time they complete) and holds new ones
   * back until it is done; the next change then first sets in_use again, durably (one small
   * write and a flush), so a crash after it leaves the bitmaps inconsistent rather than stale.
   * So do not call it while holding a write mapping of this image.
   * @throws ERR_BITMAP_NAME, ERR_BITMAP_GRANULARITY, ERR_BITMAP_SIZE_MISMATCH, ERR_INVALID_ARGUMENT (QEMU's limits), ERR_QCOW2_READ_ONLY
   */
  async storeBitmaps(bitmaps: readonly BitmapToStore[], opts: { inUse: boolean }): Promise<void> {
    this.#checkWritable('store bitmaps in');
    const store = (): Promise<void> =>
      this.#md.mutex.run(async () => {
        this.#syncHeader(await storeBitmapsIn(this.#bitmapContext(), bitmaps, opts.inUse));
        for (const b of bitmaps) {
          if (b.enabled && !opts.inUse) this.#cleanEnabled.add(b.name);
          else this.#cleanEnabled.delete(b.name);
        }
      });
    if (opts.inUse || !bitmaps.some((b) => b.enabled)) return store();
    while (this.#cleanStore) await this.#cleanStore.catch(() => undefined);
    const done = this.#quiesceThen(store);
    this.#cleanStore = done;
    try {
      await done;
    } finally {
      if (this.#cleanStore === done) this.#cleanStore = null;
    }
  }

  /** Waits until no change to the disk is under way, then runs `fn` (new changes wait for #cleanStore). */
  async #quiesceThen(fn: () => Promise<void>): Promise<void> {
    if (this.#changes > 0) await new Promise<void>((resolve) => this.#whenNoChanges.push(resolve));
    await fn();
  }

  /**
   * Registers a change to the disk (returns the function that ends it). Before the first change
   * after enabled bitmaps were stored consistent, their in_use flag is set and flushed.
   */
  async #enterChange(): Promise<() => void> {
    while (this.#cleanStore) await this.#cleanStore.catch(() => undefined);
    this.#changes++;
    let left = false;
    const leave = (): void => {
      if (left) return;
      left = true;
      if (--this.#changes === 0) for (const resolve of this.#whenNoChanges.splice(0)) resolve();
    };
    try {
      if (this.#cleanEnabled.size > 0) await this.#markCleanInUse();
    } catch (err) {
      leave();
      throw err;
    }
    return leave;
  }

  #markCleanInUse(): Promise<void> {
    this.#markingInUse ??= this.#md.mutex
      .run(async () => {
        const names = [...this.#cleanEnabled];
        await markInUse(this.#bitmapContext(), names);
        for (const n of names) this.#cleanEnabled.delete(n);
      })
      .finally(() => {
        this.#markingInUse = null;
      });
    return this.#markingInUse;
  }

  /** Removes stored bitmaps and frees their clusters; names the image does not hold are ignored. */
  async removeBitmaps(names: readonly string[]): Promise<void> {
    this.#checkWritable('remove bitmaps from');
    await this.#md.mutex.run(async () => {
      this.#syncHeader(await removeBitmapsFrom(this.#bitmapContext(), names));
      for (const n of names) this.#cleanEnabled.delete(n);
    });
  }

  /**
   * Sets the in_use flag of stored bitmaps in place and flushes: done when a caller starts
   * changing a bitmap in memory (clear, merge, enable), so that a crash leaves it inconsistent.
   * @throws ERR_BITMAP_NOT_FOUND
   */
  async markBitmapsInUse(names: readonly string[]): Promise<void> {
    this.#checkWritable('mark bitmaps in use in');
    await this.#md.mutex.run(async () => {
      await markInUse(this.#bitmapContext(), names);
      for (const n of names) this.#cleanEnabled.delete(n);
    });
  }

  // ---------------------------------------------------------------- close

  /** Aborts outstanding write mappings, waits for requests in flight, flushes, closes the file (and an owned backing image). */
  close(): Promise<void> {
    this.#closePromise ??= this.#doClose();
    return this.#closePromise;
  }

  async #doClose(): Promise<void> {
    const errors: unknown[] = [];
    this.#state = 'closing';
    for (const m of [...this.#mappings.keys()]) await this.abortMapping(m).catch((e: unknown) => errors.push(e));
    const release = await this.#locks.acquire(0, Number.MAX_SAFE_INTEGER, true);
    try {
      if (!this.#readOnly) await this.#md.mutex.run(() => this.#flushMetadata());
    } catch (err) {
      errors.push(err);
    } finally {
      release();
    }
    this.#md.clearCache();
    this.#compressedCache.clear();
    this.#state = 'closed';
    if (this.#ownsBacking && this.#backing) await this.#backing.close().catch((e: unknown) => errors.push(e));
    await this.#file.close().catch((e: unknown) => errors.push(e));
    if (errors.length === 1) throw errors[0];
    if (errors.length > 1) throw new AggregateError(errors, 'Cannot close qcow2 image cleanly: several steps failed');
  }
}

