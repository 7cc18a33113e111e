import { ShearError, assertRange } from '@shear/base';
import type { BlockIO, BlockStatusExtent, HostMappable, WriteOptions, WriteZeroesOptions } from '@shear/block';
import { BitmapLifecycle } from './bitmap-lifecycle.js';
import type { BitmapToStore, StoredBitmap } from './bitmaps-store.js';
import { ClusterIO } from './cluster-io.js';
import { CompressedClusters } from './compressed-clusters.js';
import { formatQcow2, type Qcow2CreateOptions } from './create.js';
import type { GrowableIO } from './growable-io.js';
import { COMPRESSION_ZLIB, type ParsedHeader } from './header.js';
import { WorkerMapping } from './host-mapping.js';
import { ImageGuard } from './image-guard.js';
import { loadImage, type LoadedImage, type Qcow2OpenOptions } from './image-open.js';
import { RangeLock } from './locks.js';
import { Qcow2Metadata } from './metadata.js';
import { WriteMappings, type Qcow2WriteMapping } from './write-mappings.js';

export type { Qcow2OpenOptions } from './image-open.js';
export type { MappedExtent, Qcow2WriteMapping } from './write-mappings.js';

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

const DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024;

/**
 * A qcow2 image (version 3 read-write, version 2 read-only) served as a BlockIO on top of its
 * protocol child `file`, with an optional backing BlockIO. The image owns `file` from the
 * moment `open` is called (it closes it on close and when open fails).
 *
 * The image composes collaborators that each own their state: the cluster map (Qcow2Metadata:
 * L1, L2 cache, refcounts, allocator), guest data I/O through it (ClusterIO), compressed
 * clusters, write mappings, the host mapping for worker threads and the persistent bitmaps.
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
  readonly #guard: ImageGuard;
  readonly #locks = new RangeLock();
  readonly #bitmaps: BitmapLifecycle;
  readonly #compressed: CompressedClusters;
  readonly #io: ClusterIO;
  readonly #writeMappings: WriteMappings;
  readonly #workers: WorkerMapping;
  #closePromise: Promise<void> | null = null;

  private constructor(file: GrowableIO, loaded: LoadedImage, opts: Qcow2OpenOptions) {
    this.#file = file;
    this.#backing = loaded.backing;
    this.#ownsBacking = loaded.ownsBacking;
    this.#readOnly = loaded.readOnly;
    this.#parsed = loaded.parsed;
    const h = loaded.parsed.header;
    const diskBytes = h.size;
    this.#C = 2 ** h.clusterBits;
    const md = new Qcow2Metadata({
      file,
      clusterBits: h.clusterBits,
      zeroFlag: h.version >= 3,
      l1TableOffset: h.l1TableOffset,
      l1Raw: loaded.l1Raw,
      rc: loaded.rc,
      l2CacheBytes: opts.l2CacheBytes ?? DEFAULT_L2_CACHE_BYTES,
    });
    const guard = new ImageGuard(md);
    const locks = this.#locks;
    this.#md = md;
    this.#guard = guard;
    this.#bitmaps = new BitmapLifecycle({ guard, md, file, diskBytes, parsed: loaded.parsed, taken: loaded.taken });
    const enterChange = (): Promise<() => void> => this.#bitmaps.enterChange();
    const writePlain = (offset: number, data: Uint8Array): Promise<void> => this.write(offset, data);
    this.#compressed = new CompressedClusters({ file, md, guard, locks, enterChange, writePlain, diskBytes, compressionType: h.compressionType });
    const chained = loaded.backing !== null || loaded.parsed.backingFile !== null;
    this.#io = new ClusterIO({ file, backing: loaded.backing, md, compressed: this.#compressed, diskBytes, chained });
    this.#writeMappings = new WriteMappings({ guard, md, io: this.#io, locks, enterChange, diskBytes });
    const { backing, readOnly } = loaded;
    this.#workers = new WorkerMapping({ file, fileMapping: opts.fileMapping, backing, readOnly, guard, md, writes: this.#writeMappings, diskBytes });
  }

  /** Opens the qcow2 image stored in `file` (ownership of `file` passes to the image, also on failure). */
  static async open(file: GrowableIO, opts: Qcow2OpenOptions = {}): Promise<Qcow2Image> {
    return new Qcow2Image(file, await loadImage(file, opts), opts);
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

  // ---------------------------------------------------------------- BlockIO

  async read(offset: number, buf: Uint8Array): Promise<void> {
    this.#guard.checkOpen('read');
    assertRange(offset, buf.length, this.length, 'read');
    if (buf.length === 0) return;
    const [first, end] = this.#md.clusterRange(offset, buf.length);
    const release = await this.#locks.acquire(first, end, false);
    try {
      const entries = await this.#md.mutex.run(() => this.#md.lookupRange(first, end - first));
      await this.#io.readMapped(offset, buf, first, entries);
    } finally {
      release();
    }
  }

  async write(offset: number, buf: Uint8Array, opts?: WriteOptions): Promise<void> {
    this.#guard.checkWritable('write');
    assertRange(offset, buf.length, this.length, 'write');
    if (buf.length === 0) return;
    const leave = await this.#bitmaps.enterChange();
    try {
      const [first, end] = this.#md.clusterRange(offset, buf.length);
      const release = await this.#locks.acquire(first, end, true);
      try {
        await this.#io.writeLocked(offset, buf, first, end);
      } finally {
        release();
      }
    } finally {
      leave();
    }
    if (opts?.fua) await this.flush();
  }

  async writeZeroes(offset: number, bytes: number, opts?: WriteZeroesOptions): Promise<void> {
    this.#guard.checkWritable('write zeroes to');
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
    const leave = await this.#bitmaps.enterChange();
    try {
      // One lock over the whole request, so it applies as a unit against overlapping requests.
      const [firstCluster, endCluster] = this.#md.clusterRange(offset, bytes);
      const release = await this.#locks.acquire(firstCluster, endCluster, true);
      try {
        for (const [from, to] of partial) await this.#io.zeroPartialLocked(from, to);
        if (wholeFrom < wholeTo) await this.#io.rewriteLocked(wholeFrom / C, wholeTo / C, opts?.mayUnmap ? 'zero-unmap' : 'zero');
      } finally {
        release();
      }
    } finally {
      leave();
    }
    if (opts?.fua) await this.flush();
  }

  /**
   * Discards whole clusters inside the range (partial clusters are left alone: discard is a
   * hint). Without a backing file they become unallocated (read as zeroes); with one they get
   * the zero flag, so old backing data does not show through (QEMU does the same).
   */
  async discard(offset: number, bytes: number): Promise<void> {
    this.#guard.checkWritable('discard');
    assertRange(offset, bytes, this.length, 'discard');
    const C = this.#C;
    const end = offset + bytes;
    const first = Math.ceil(offset / C);
    const last = end === this.length ? Math.ceil(end / C) : Math.floor(end / C);
    if (first >= last) return;
    const leave = await this.#bitmaps.enterChange();
    try {
      const release = await this.#locks.acquire(first, last, true);
      try {
        await this.#io.rewriteLocked(first, last, 'discard');
      } finally {
        release();
      }
    } finally {
      leave();
    }
  }

  async #flushMetadata(): Promise<void> {
    if (await this.#md.flush()) this.#compressed.forget();
  }

  async flush(): Promise<void> {
    this.#guard.checkOpen('flush');
    if (this.#readOnly) return;
    await this.#md.mutex.run(() => this.#flushMetadata());
  }

  async blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    this.#guard.checkOpen('query block status of');
    assertRange(offset, bytes, this.length, 'block status');
    if (bytes === 0) return [];
    return this.#io.blockStatus(offset, bytes);
  }

  // ---------------------------------------------------------------- compressed writes

  /**
   * Writes one whole cluster compressed (the last cluster may be short when the virtual size is
   * not cluster aligned). Data that does not compress is written as a normal cluster.
   */
  writeCompressed(offset: number, data: Uint8Array): Promise<void> {
    return this.#compressed.write(offset, data);
  }

  /**
   * Stores a cluster that the caller already deflated (raw deflate, windowBits 12, which is what
   * QEMU inflates with) and that came out smaller than a cluster: the parallel copy engine
   * compresses in worker threads and only the allocation runs here.
   * @throws ERR_INVALID_ARGUMENT for an unaligned offset or data not smaller than a cluster
   */
  writeDeflated(offset: number, packed: Uint8Array): Promise<void> {
    return this.#compressed.writeDeflated(offset, packed);
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
  mapForWrite(offset: number, bytes: number): Promise<Qcow2WriteMapping> {
    return this.#writeMappings.map(offset, bytes);
  }

  /** Points the L2 entries at the mapped clusters (the caller's data writes have completed). */
  commitMapping(m: Qcow2WriteMapping): Promise<void> {
    return this.#writeMappings.commit(m);
  }

  /** Gives back the fresh clusters of a mapping whose data will not be committed. */
  abortMapping(m: Qcow2WriteMapping): Promise<void> {
    return this.#writeMappings.abort(m);
  }

  /**
   * Direct host access for worker threads (`HostMappable` of @shear/block), or undefined when
   * the protocol file, or the backing image, offers none. Coordinator-only calls; see
   * WorkerMapping for what mapRead and mapWrite answer.
   */
  hostMapping(): HostMappable | undefined {
    return this.#workers.hostMapping();
  }

  // ---------------------------------------------------------------- persistent bitmaps

  /**
   * The bitmaps loaded when the image was opened with `enabledBitmaps: 'take'`, flags as they
   * were found (their in_use flag is now set on disk); empty otherwise.
   */
  get takenBitmaps(): readonly StoredBitmap[] {
    return this.#bitmaps.taken;
  }

  /**
   * The bitmaps stored in the image, read from disk now (directory order). Bits are loaded for
   * consistent bitmaps unless `withBits` is false. An extension without autoclear bit 0 is
   * ignored (a writer that did not know bitmaps changed the image), as QEMU does.
   * @throws ERR_QCOW2_CORRUPT for a malformed directory or table
   */
  loadBitmaps(opts: { withBits?: boolean } = {}): Promise<StoredBitmap[]> {
    return this.#bitmaps.load(opts);
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
  storeBitmaps(bitmaps: readonly BitmapToStore[], opts: { inUse: boolean }): Promise<void> {
    return this.#bitmaps.store(bitmaps, opts);
  }

  /** Removes stored bitmaps and frees their clusters; names the image does not hold are ignored. */
  removeBitmaps(names: readonly string[]): Promise<void> {
    return this.#bitmaps.remove(names);
  }

  /**
   * Sets the in_use flag of stored bitmaps in place and flushes: done when a caller starts
   * changing a bitmap in memory (clear, merge, enable), so that a crash leaves it inconsistent.
   * @throws ERR_BITMAP_NOT_FOUND
   */
  markBitmapsInUse(names: readonly string[]): Promise<void> {
    return this.#bitmaps.markInUse(names);
  }

  // ---------------------------------------------------------------- close

  /** Aborts outstanding write mappings, waits for requests in flight, flushes, closes the file (and an owned backing image). */
  close(): Promise<void> {
    this.#closePromise ??= this.#doClose();
    return this.#closePromise;
  }

  async #doClose(): Promise<void> {
    const errors: unknown[] = [];
    this.#guard.shut();
    for (const m of this.#writeMappings.outstanding()) await this.abortMapping(m).catch((e: unknown) => errors.push(e));
    const release = await this.#locks.acquire(0, Number.MAX_SAFE_INTEGER, true);
    try {
      if (!this.#readOnly) await this.#md.mutex.run(() => this.#flushMetadata());
    } catch (err) {
      errors.push(err);
    } finally {
      release();
    }
    this.#md.clearCache();
    this.#compressed.forget();
    if (this.#ownsBacking && this.#backing) await this.#backing.close().catch((e: unknown) => errors.push(e));
    await this.#file.close().catch((e: unknown) => errors.push(e));
    if (errors.length === 1) throw errors[0];
    if (errors.length > 1) throw new AggregateError(errors, 'Cannot close qcow2 image cleanly: several steps failed');
  }
}
