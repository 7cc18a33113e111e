/**
 * `allocate` reserves blocks (the file grows unless keepSize); `punch-hole` deallocates and
 * always keeps the size (the kernel requires it); `zero-range` makes the range read as zeroes,
 * keeping it allocated.
 */
export type FallocateMode = 'allocate' | 'punch-hole' | 'zero-range';

export interface FallocateOptions {
  /** Do not change the file size when the range ends past EOF. Implied by punch-hole. */
  keepSize?: boolean;
}

export type FadviseAdvice = 'normal' | 'sequential' | 'random' | 'willneed' | 'dontneed' | 'noreuse';

/** Flags of sync_file_range(2); the values are Linux's ABI. */
export const SYNC_FILE_RANGE = {
  /** Wait for writeback already under way on the range before starting more. */
  WAIT_BEFORE: 1,
  /** Start writeback of dirty pages in the range. */
  WRITE: 2,
  /** Wait for the writeback to finish. */
  WAIT_AFTER: 4,
} as const;

/** What direct I/O (O_DIRECT) on one file requires, from statx(STATX_DIOALIGN). */
export interface DirectIOAlignment {
  memoryAlignment: number;
  offsetAlignment: number;
}

export interface AlignedBuffer {
  buffer: Buffer;
  /** The address of buffer[0] is known to be a multiple of the alignment. False in the fallback. */
  aligned: boolean;
}

/** Which calls reach the kernel. In the fallback every entry is false. */
export interface NativeSupport {
  seek: boolean;
  fallocate: boolean;
  syncFileRange: boolean;
  fadvise: boolean;
  copyFileRange: boolean;
  alignedAlloc: boolean;
}

/**
 * The system calls Node lacks. Two implementations: the N-API addon, and a pure-JS fallback
 * that keeps the same API (see each member for what the fallback does).
 *
 * Offsets and byte counts are non-negative safe integers, else ERR_INVALID_ARGUMENT. Failures
 * are ShearError: ERR_IO_UNSUPPORTED (EOPNOTSUPP, ENOSYS, EXDEV: the caller falls back),
 * ERR_NO_SPACE, ERR_PERMISSION_DENIED, ERR_FILE_NOT_FOUND, else ERR_IO; context.errno holds
 * the errno name. The synchronous calls block the calling thread: on the main thread use the
 * Async variants for anything that may wait on the disk.
 */
export interface NativeIO {
  /** True when the addon is loaded and in use. */
  readonly available: boolean;
  /** Why the addon failed to load; undefined when it is in use or the fallback was forced. */
  readonly loadError: Error | undefined;
  /** Why the fallback is in use (forced, or the load error's message); undefined for the addon. */
  readonly fallbackReason: string | undefined;
  readonly supports: NativeSupport;

  /**
   * lseek(SEEK_DATA): the first offset >= offset that holds data, or -1 when no data follows
   * (ENXIO, also for offset >= EOF). Fallback: throws ERR_IO_UNSUPPORTED (treat all as data).
   */
  seekData(fd: number, offset: number): number;
  /**
   * lseek(SEEK_HOLE): the first offset >= offset inside a hole, where EOF counts as a hole; -1
   * when offset >= EOF. Fallback: throws ERR_IO_UNSUPPORTED.
   */
  seekHole(fd: number, offset: number): number;

  /** fallocate(2). Fallback: throws ERR_IO_UNSUPPORTED for every mode (the caller writes zeroes). */
  fallocate(fd: number, mode: FallocateMode, offset: number, bytes: number, opts?: FallocateOptions): void;
  fallocateAsync(fd: number, mode: FallocateMode, offset: number, bytes: number, opts?: FallocateOptions): Promise<void>;

  /**
   * sync_file_range(2) with SYNC_FILE_RANGE flags; bytes 0 means "to EOF". Gives no durability
   * (no metadata, no disk cache flush): it paces writeback. Fallback: a no-op.
   */
  syncFileRange(fd: number, offset: number, bytes: number, flags: number): void;
  syncFileRangeAsync(fd: number, offset: number, bytes: number, flags: number): Promise<void>;

  /** posix_fadvise(2); bytes 0 means "to EOF". Fallback: a no-op. */
  fadvise(fd: number, offset: number, bytes: number, advice: FadviseAdvice): void;
  fadviseAsync(fd: number, offset: number, bytes: number, advice: FadviseAdvice): Promise<void>;

  /**
   * copy_file_range(2), repeated until `bytes` are copied or the source ends. Returns the bytes
   * copied (less than `bytes` only at the source's EOF, or when an error follows progress).
   * Fallback: a read+write loop through a bounded buffer, same result.
   */
  copyFileRange(fdIn: number, offsetIn: number, fdOut: number, offsetOut: number, bytes: number): number;
  copyFileRangeAsync(fdIn: number, offsetIn: number, fdOut: number, offsetOut: number, bytes: number): Promise<number>;

  /**
   * A zero-filled buffer of `bytes` whose first byte is at a multiple of `alignment` (a power of
   * two), for O_DIRECT. V8 owns the memory (an over-allocated ArrayBuffer, sliced), so it is
   * freed and accounted like any buffer; `shared` uses a SharedArrayBuffer for worker threads.
   * Fallback: an ordinary buffer with aligned: false.
   */
  allocAligned(bytes: number, alignment: number, opts?: { shared?: boolean }): AlignedBuffer;
  /** (address of view[0]) mod modulus. Fallback: throws ERR_IO_UNSUPPORTED. */
  addressModulo(view: ArrayBufferView, modulus: number): number;
  /** Whether view[0] is known to sit at a multiple of alignment. Fallback: always false. */
  isAligned(view: ArrayBufferView, alignment: number): boolean;
  /** O_DIRECT alignment of an open file, or null when the kernel or file system does not say. */
  dioAlignment(fd: number): DirectIOAlignment | null;
}
