import { constants as fsConstants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { ShearError, alignDown, alignUp, assertRange, isPowerOfTwo, isShearError } from '@shear/base';
import { SYNC_FILE_RANGE, errnoName, getNative, ioError, type FallocateMode, type NativeIO } from '@shear/native';
import { RequestTracker } from './request-tracker.js';
import type { BlockIO, BlockStatusExtent, WriteOptions, WriteZeroesOptions } from '../io.js';
import type { HostFile, HostMappingSource, Resizable } from '../capabilities.js';
import type { HostMappable } from '../host-mapping.js';
import { fileMapping } from './file-mapping.js';

/** Size of the zero buffer that writeZeroes writes in turn when the file system cannot zero a range. */
export const ZERO_CHUNK_BYTES = 1024 * 1024;
/** Size of one O_DIRECT bounce buffer (unaligned requests go through it in pieces this big). */
export const BOUNCE_CHUNK_BYTES = 1024 * 1024;
/** blockStatus answers at most this many extents per call; callers loop for the rest. */
export const BLOCK_STATUS_MAX_EXTENTS = 1024;
/** O_DIRECT request alignment when the kernel does not report one (statx STATX_DIOALIGN). */
export const DEFAULT_DIRECT_ALIGNMENT_BYTES = 4096;
/** Least memory alignment of the driver's own buffers: a page, enough for common O_DIRECT devices. */
const BUFFER_ALIGNMENT_BYTES = 4096;
/** Largest single pread/pwrite: Linux transfers at most 2 GiB - 4 KiB per call. */
const MAX_IO_BYTES = 1024 * 1024 * 1024;

export interface FileDriverOptions {
  readOnly?: boolean;
  /** Open with O_DIRECT (bypass the page cache). Needs the native addon for aligned buffers. */
  direct?: boolean;
  /** Create (or empty: O_TRUNC) the file with this size; `exclusive` fails if it exists. */
  create?: { size: number; exclusive?: boolean };
  /**
   * Request alignment under O_DIRECT: a power of two, at least what the kernel requires. Default:
   * the kernel's (statx), else DEFAULT_DIRECT_ALIGNMENT_BYTES.
   */
  alignment?: number;
  /** The system-call layer; default getNative() (SHEAR_NATIVE=0 selects the fallback). */
  native?: NativeIO;
}

/**
 * QEMU's `file` driver: a regular file as a block node, through a fs.promises FileHandle.
 *
 * - `length` is the file size at open; writes never grow it. `truncate` resizes explicitly.
 * - blockStatus comes from SEEK_DATA/SEEK_HOLE: holes are {data: false, zero: true}, data runs
 *   {data: true, zero: false}, both allocated (this layer decides the content, as for QEMU's
 *   raw files). Without the addon everything is reported as data.
 * - writeZeroes: with mayUnmap punch a hole, else zero-range, else punch + allocate, else (not
 *   with fastOnly) write zero buffers in ZERO_CHUNK_BYTES pieces from one reused zero buffer.
 *   discard punches a hole and is a no-op where that is unsupported.
 * - flush and fua use fdatasync.
 * - O_DIRECT (`direct`): unaligned requests go through aligned bounce buffers with
 *   read-modify-write of the partial units at their edges. Overlapping writes are serialised
 *   so that two read-modify-writes of one unit cannot lose each other's bytes. A file system
 *   that refuses O_DIRECT fails the open with ERR_IO_UNSUPPORTED.
 * - close waits for requests in flight, then closes the fd; later calls reject with ERR_CLOSED.
 */
export class FileDriver implements BlockIO, HostFile, Resizable, HostMappingSource {
  readonly path: string;
  readonly readOnly: boolean;
  readonly direct: boolean;
  /** Offset and length unit of O_DIRECT requests; 1 when buffered. */
  readonly alignment: number;
  /** Address alignment O_DIRECT needs of buffers; caller buffers that meet it skip the bounce buffer. */
  readonly #memoryAlignment: number;
  readonly #native: NativeIO;
  readonly #handle: FileHandle;
  #length: number;
  readonly #requests = new RequestTracker();
  readonly #writeLock = new RangeLock();
  #zeroBuffer: Buffer | undefined;
  readonly #bounceFree: Buffer[] = [];
  #punchUnsupported = false;
  #zeroRangeUnsupported = false;

  private constructor(path: string, handle: FileHandle, length: number, readOnly: boolean, direct: boolean, alignment: number, memoryAlignment: number, native: NativeIO) {
    this.path = path;
    this.#memoryAlignment = memoryAlignment;
    this.#handle = handle;
    this.#length = length;
    this.readOnly = readOnly;
    this.direct = direct;
    this.alignment = alignment;
    this.#native = native;
  }

  /**
   * Opens `path`.
   * @throws ERR_FILE_NOT_FOUND, ERR_PERMISSION_DENIED, ERR_IO; ERR_IO_UNSUPPORTED when O_DIRECT
   *   is refused or asked for without the addon; ERR_INVALID_ARGUMENT for bad options or a
   *   path that is not a regular file
   */
  static async open(path: string, opts: FileDriverOptions = {}): Promise<FileDriver> {
    const native = opts.native ?? getNative();
    const readOnly = opts.readOnly ?? false;
    const direct = opts.direct ?? false;
    if (opts.create && readOnly) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot create '${path}' read-only`, { path });
    }
    if (opts.create) assertRange(0, opts.create.size, Number.MAX_SAFE_INTEGER, 'file size');
    if (opts.alignment !== undefined && (!isPowerOfTwo(opts.alignment) || !direct)) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open '${path}' with alignment ${opts.alignment}: needs direct and a power of two`, { path });
    }
    if (direct && !native.supports.alignedAlloc) {
      throw new ShearError(
        'ERR_IO_UNSUPPORTED',
        `Cannot open '${path}' with O_DIRECT: aligned buffers need the native addon (${native.fallbackReason ?? 'not loaded'})`,
        { path, op: 'open' },
      );
    }

    let flags = readOnly ? fsConstants.O_RDONLY : fsConstants.O_RDWR;
    if (direct) flags |= fsConstants.O_DIRECT;
    if (opts.create) flags |= fsConstants.O_CREAT | fsConstants.O_TRUNC | (opts.create.exclusive ? fsConstants.O_EXCL : 0);
    let handle: FileHandle;
    try {
      handle = await open(path, flags, 0o644);
    } catch (err) {
      if (direct && (err as { code?: unknown }).code === 'EINVAL') {
        throw new ShearError('ERR_IO_UNSUPPORTED', `Cannot open '${path}' with O_DIRECT: the file system refuses direct I/O (EINVAL)`, { path, op: 'open', errno: 'EINVAL' }, { cause: err });
      }
      throw ioError(err, `open '${path}'`, { path, op: 'open' });
    }

    try {
      if (opts.create) await handle.truncate(opts.create.size);
      const st = await handle.stat();
      if (!st.isFile()) {
        throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open '${path}' as a file: not a regular file`, { path });
      }
      let alignment = 1;
      let memoryAlignment = 1;
      if (direct) {
        const kernel = native.dioAlignment(handle.fd);
        memoryAlignment = kernel?.memoryAlignment ?? BUFFER_ALIGNMENT_BYTES;
        const required = kernel?.offsetAlignment ?? DEFAULT_DIRECT_ALIGNMENT_BYTES;
        alignment = opts.alignment ?? required;
        if (alignment < required || alignment > BOUNCE_CHUNK_BYTES) {
          throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open '${path}' with alignment ${alignment}: O_DIRECT here needs a multiple of ${required} up to ${BOUNCE_CHUNK_BYTES}`, { path });
        }
      }
      return new FileDriver(path, handle, st.size, readOnly, direct, alignment, memoryAlignment, native);
    } catch (err) {
      await handle.close().catch(() => undefined);
      throw isShearError(err) ? err : ioError(err, `open '${path}'`, { path, op: 'open' });
    }
  }

  get length(): number {
    return this.#length;
  }

  /** The open file descriptor, for zero-copy work elsewhere (copy_file_range, workers). Valid until close. */
  get fd(): number {
    this.#checkOpen('use the fd of');
    return this.#handle.fd;
  }

  async read(offset: number, buf: Uint8Array): Promise<void> {
    this.#checkRange('read', offset, buf.length);
    if (buf.length === 0) return;
    await this.#requests.track(this.direct ? this.#readDirect(offset, buf) : this.#preadFull(offset, buf));
  }

  async write(offset: number, buf: Uint8Array, opts: WriteOptions = {}): Promise<void> {
    this.#checkWritable('write', offset, buf.length);
    if (buf.length === 0) return;
    await this.#requests.track(
      (async () => {
        if (this.direct) await this.#locked(offset, buf.length, () => this.#writeDirectLocked(offset, buf));
        else await this.#pwriteFull(offset, buf);
        if (opts.fua) await this.#datasync();
      })(),
    );
  }

  async writeZeroes(offset: number, bytes: number, opts: WriteZeroesOptions = {}): Promise<void> {
    this.#checkWritable('write zeroes to', offset, bytes);
    if (bytes === 0) return;
    await this.#requests.track(
      (async () => {
        await this.#locked(offset, bytes, () => this.#writeZeroesLocked(offset, bytes, opts));
        if (opts.fua) await this.#datasync();
      })(),
    );
  }

  async discard(offset: number, bytes: number): Promise<void> {
    this.#checkWritable('discard', offset, bytes);
    if (bytes === 0) return;
    await this.#requests.track(this.#locked(offset, bytes, async () => void (await this.#tryFallocate('punch-hole', offset, bytes))));
  }

  async flush(): Promise<void> {
    this.#checkOpen('flush');
    await this.#requests.track(this.#datasync());
  }

  async blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    this.#checkRange('query block status of', offset, bytes);
    if (bytes === 0) return [];
    const end = offset + bytes;
    if (!this.#native.supports.seek) return [dataExtent(offset, bytes)];
    const fd = this.#handle.fd;
    const extents: BlockStatusExtent[] = [];
    let pos = offset;
    try {
      while (pos < end && extents.length < BLOCK_STATUS_MAX_EXTENTS) {
        const data = this.#native.seekData(fd, pos);
        if (data === -1 || data >= end) {
          extents.push(holeExtent(pos, end - pos));
          break;
        }
        if (data > pos) {
          extents.push(holeExtent(pos, data - pos));
          pos = data;
          // The data run starts here: ask where it ends without a second SEEK_DATA (a third of
          // the lseeks of a fragmented file's walk).
          if (extents.length >= BLOCK_STATUS_MAX_EXTENTS) break;
        }
        // EOF counts as a hole, so a data run always ends; -1 only if the file shrank meanwhile.
        const hole = this.#native.seekHole(fd, pos);
        const stop = hole === -1 ? end : Math.min(hole, end);
        extents.push(dataExtent(pos, stop - pos));
        pos = stop;
      }
    } catch (err) {
      if (isShearError(err, 'ERR_IO_UNSUPPORTED') && extents.length === 0) return [dataExtent(offset, bytes)];
      throw ioError(err, `query block status of (${offset}, ${bytes}) in '${this.path}'`, { path: this.path, offset, bytes });
    }
    return extents;
  }

  /**
   * Sets the file's length (ftruncate): growing adds a hole, shrinking drops the tail. Waits for
   * writes in flight under O_DIRECT, since their read-modify-write may touch the old tail.
   */
  async truncate(length: number): Promise<void> {
    this.#checkOpen('truncate');
    assertRange(0, length, Number.MAX_SAFE_INTEGER, 'file length');
    if (this.readOnly) throw this.#readOnlyError('truncate');
    await this.#requests.track(
      this.#locked(0, Number.MAX_SAFE_INTEGER, async () => {
        try {
          await this.#handle.truncate(length);
        } catch (err) {
          throw ioError(err, `truncate '${this.path}' to ${length}`, { path: this.path, op: 'truncate' });
        }
        this.#length = length;
      }),
    );
  }

  /** Workers reach the file through its fd, unless it is open with O_DIRECT (see fileMapping). */
  hostMapping(): HostMappable | undefined {
    return fileMapping(this);
  }

  /**
   * Starts writeback of the range (sync_file_range WRITE), and with `wait` waits for it. It
   * paces dirty page cache and promises no durability (use flush). bytes 0: to EOF. A no-op
   * without the addon.
   */
  async syncRange(offset: number, bytes: number, opts: { wait?: boolean } = {}): Promise<void> {
    this.#checkRange('sync', offset, bytes);
    const flags = opts.wait ? SYNC_FILE_RANGE.WAIT_BEFORE | SYNC_FILE_RANGE.WRITE | SYNC_FILE_RANGE.WAIT_AFTER : SYNC_FILE_RANGE.WRITE;
    await this.#requests.track(this.#native.syncFileRangeAsync(this.#handle.fd, offset, bytes, flags));
  }

  /**
   * Asks the kernel to drop the range's clean pages from the page cache (fadvise DONTNEED);
   * dirty pages stay until written back, so syncRange(..., {wait: true}) first. bytes 0: to
   * EOF. A no-op without the addon.
   */
  async dropCache(offset: number, bytes: number): Promise<void> {
    this.#checkRange('drop cache of', offset, bytes);
    await this.#requests.track(this.#native.fadviseAsync(this.#handle.fd, offset, bytes, 'dontneed'));
  }

  close(): Promise<void> {
    return this.#requests.close(async () => {
      try {
        await this.#handle.close();
      } catch (err) {
        throw ioError(err, `close '${this.path}'`, { path: this.path, op: 'close' });
      }
    });
  }

  // ---- checks and bookkeeping ----

  #checkOpen(action: string): void {
    if (this.#requests.closed) throw new ShearError('ERR_CLOSED', `Cannot ${action} '${this.path}': the file driver is closed`, { path: this.path });
  }

  #checkRange(action: string, offset: number, bytes: number): void {
    this.#checkOpen(action);
    assertRange(offset, bytes, this.#length, `range of '${this.path}'`);
  }

  #checkWritable(action: string, offset: number, bytes: number): void {
    this.#checkRange(action, offset, bytes);
    if (this.readOnly) throw this.#readOnlyError(action);
  }

  #readOnlyError(action: string): ShearError {
    return new ShearError('ERR_READ_ONLY', `Cannot ${action} '${this.path}': opened read-only`, { path: this.path });
  }

  /** Runs fn holding the write lock over the range's aligned units; buffered writes need none. */
  async #locked<T>(offset: number, bytes: number, fn: () => Promise<T>): Promise<T> {
    if (!this.direct) return fn();
    const end = Math.min(Number.MAX_SAFE_INTEGER, alignUp(offset + bytes, this.alignment));
    const release = await this.#writeLock.acquire(alignDown(offset, this.alignment), end);
    try {
      return await fn();
    } finally {
      release();
    }
  }

  async #datasync(): Promise<void> {
    try {
      await this.#handle.datasync();
    } catch (err) {
      throw ioError(err, `flush '${this.path}'`, { path: this.path, op: 'flush' });
    }
  }

  // ---- plain positional I/O ----

  /**
   * Fills target from the file at offset; what lies past EOF reads as zeroes (the unit that
   * straddles EOF under O_DIRECT, or a file shrunk behind our back).
   */
  async #preadFull(offset: number, target: Uint8Array): Promise<void> {
    let done = 0;
    try {
      while (done < target.length) {
        const want = Math.min(target.length - done, MAX_IO_BYTES);
        const { bytesRead } = await this.#handle.read(target, done, want, offset + done);
        done += bytesRead;
        // A short O_DIRECT read means EOF; a further read would start at an unaligned offset.
        if (bytesRead === 0 || (this.direct && bytesRead < want)) break;
      }
    } catch (err) {
      throw ioError(err, `read (${offset}, ${target.length}) from '${this.path}'`, { path: this.path, op: 'read', offset, bytes: target.length });
    }
    target.fill(0, done);
  }

  async #pwriteFull(offset: number, source: Uint8Array): Promise<void> {
    let done = 0;
    try {
      while (done < source.length) {
        const { bytesWritten } = await this.#handle.write(source, done, Math.min(source.length - done, MAX_IO_BYTES), offset + done);
        done += bytesWritten;
      }
    } catch (err) {
      throw ioError(err, `write (${offset}, ${source.length}) to '${this.path}'`, { path: this.path, op: 'write', offset, bytes: source.length });
    }
  }

  // ---- O_DIRECT ----

  #isDirectReady(offset: number, buf: Uint8Array): boolean {
    const a = this.alignment;
    return offset % a === 0 && buf.length % a === 0 && this.#native.isAligned(buf, this.#memoryAlignment);
  }

  /** Alignment of the driver's own buffers: a page, or more if the kernel asks for more. */
  get #bufferAlignment(): number {
    return Math.max(BUFFER_ALIGNMENT_BYTES, this.#memoryAlignment);
  }

  #takeBounce(): Buffer {
    return this.#bounceFree.pop() ?? this.#native.allocAligned(BOUNCE_CHUNK_BYTES, this.#bufferAlignment).buffer;
  }

  #returnBounce(buf: Buffer): void {
    // A few spares cover the usual concurrency; more would only hold memory.
    if (this.#bounceFree.length < 4) this.#bounceFree.push(buf);
  }

  async #readDirect(offset: number, buf: Uint8Array): Promise<void> {
    if (this.#isDirectReady(offset, buf)) return this.#preadFull(offset, buf);
    const a = this.alignment;
    const bounce = this.#takeBounce();
    try {
      const end = offset + buf.length;
      for (let pos = offset; pos < end; ) {
        const unitStart = alignDown(pos, a);
        const unitEnd = Math.min(alignUp(end, a), unitStart + bounce.length);
        await this.#preadFull(unitStart, bounce.subarray(0, unitEnd - unitStart));
        const stop = Math.min(end, unitEnd);
        buf.set(bounce.subarray(pos - unitStart, stop - unitStart), pos - offset);
        pos = stop;
      }
    } finally {
      this.#returnBounce(bounce);
    }
  }

  /** Writes under O_DIRECT; the caller holds the write lock over the aligned range. */
  async #writeDirectLocked(offset: number, buf: Uint8Array): Promise<void> {
    const a = this.alignment;
    const end = offset + buf.length;
    if (this.#isDirectReady(offset, buf) && end <= alignDown(this.#length, a)) return this.#pwriteFull(offset, buf);
    const bounce = this.#takeBounce();
    try {
      for (let pos = offset; pos < end; ) {
        const unitStart = alignDown(pos, a);
        const unitEnd = Math.min(alignUp(end, a), unitStart + bounce.length);
        const stop = Math.min(end, unitEnd);
        const piece = bounce.subarray(0, unitEnd - unitStart);
        // Read-modify-write of the partial units at the edges of this piece.
        if (pos > unitStart) await this.#preadFull(unitStart, piece.subarray(0, a));
        if (stop < unitEnd && (unitEnd - a > unitStart || pos === unitStart)) {
          await this.#preadFull(unitEnd - a, piece.subarray(piece.length - a));
        }
        piece.set(buf.subarray(pos - offset, stop - offset), pos - unitStart);
        await this.#pwriteFull(unitStart, piece);
        pos = stop;
      }
    } finally {
      this.#returnBounce(bounce);
    }
    // A unit that straddles EOF was written whole; put the size back.
    if (alignUp(end, a) > this.#length) {
      try {
        await this.#handle.truncate(this.#length);
      } catch (err) {
        throw ioError(err, `restore the size of '${this.path}' after a write`, { path: this.path, op: 'truncate' });
      }
    }
  }

  // ---- zeroes ----

  /** fallocate that reports "unsupported" as false (and remembers it); other failures throw. */
  async #tryFallocate(mode: FallocateMode, offset: number, bytes: number): Promise<boolean> {
    if (!this.#native.supports.fallocate) return false;
    if (mode === 'punch-hole' && this.#punchUnsupported) return false;
    if (mode === 'zero-range' && this.#zeroRangeUnsupported) return false;
    try {
      await this.#native.fallocateAsync(this.#handle.fd, mode, offset, bytes, { keepSize: true });
      return true;
    } catch (err) {
      if (isShearError(err, 'ERR_IO_UNSUPPORTED')) {
        if (mode === 'punch-hole') this.#punchUnsupported = true;
        if (mode === 'zero-range') this.#zeroRangeUnsupported = true;
        return false;
      }
      const cause = isShearError(err) ? err.cause : err;
      if (errnoName(cause) === undefined) throw err;
      throw ioError(cause, `${mode} (${offset}, ${bytes}) in '${this.path}'`, { path: this.path, op: 'fallocate', offset, bytes });
    }
  }

  async #writeZeroesLocked(offset: number, bytes: number, opts: WriteZeroesOptions): Promise<void> {
    if (opts.mayUnmap && (await this.#tryFallocate('punch-hole', offset, bytes))) return;
    if (await this.#tryFallocate('zero-range', offset, bytes)) return;
    // What QEMU also does: a hole reads as zeroes, and allocating it again keeps it mapped.
    if (!opts.mayUnmap && (await this.#tryFallocate('punch-hole', offset, bytes))) {
      await this.#tryFallocate('allocate', offset, bytes);
      return;
    }
    if (opts.fastOnly) {
      throw new ShearError('ERR_NOT_IMPLEMENTED', `Cannot write zeroes to (${offset}, ${bytes}) of '${this.path}' fast: the file system can neither zero nor punch a range`, {
        path: this.path,
        offset,
        bytes,
      });
    }
    this.#zeroBuffer ??= this.#native.allocAligned(ZERO_CHUNK_BYTES, this.#bufferAlignment).buffer;
    for (let pos = offset, end = offset + bytes; pos < end; ) {
      const n = Math.min(end - pos, this.#zeroBuffer.length);
      const piece = this.#zeroBuffer.subarray(0, n);
      if (this.direct) await this.#writeDirectLocked(pos, piece);
      else await this.#pwriteFull(pos, piece);
      pos += n;
    }
  }
}

function dataExtent(offset: number, bytes: number): BlockStatusExtent {
  return { offset, bytes, data: true, zero: false, allocated: true };
}

function holeExtent(offset: number, bytes: number): BlockStatusExtent {
  return { offset, bytes, data: false, zero: true, allocated: true };
}

/**
 * Exclusive locks on byte ranges: acquire waits until no held range overlaps, so overlapping
 * holders run one after another. Few requests are in flight at once, so a list suffices.
 */
class RangeLock {
  readonly #held: { start: number; end: number; released: Promise<void> }[] = [];

  async acquire(start: number, end: number): Promise<() => void> {
    for (;;) {
      const conflict = this.#held.find((h) => h.start < end && start < h.end);
      if (!conflict) break;
      await conflict.released;
    }
    let release!: () => void;
    const entry = { start, end, released: new Promise<void>((resolve) => (release = resolve)) };
    this.#held.push(entry);
    return () => {
      const i = this.#held.indexOf(entry);
      if (i >= 0) this.#held.splice(i, 1);
      release();
    };
  }
}
