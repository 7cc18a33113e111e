/**
 * The I/O capability every block node offers. Byte ranges are (offset, bytes); offsets and
 * lengths are JS numbers checked with Number.isSafeInteger (2^53 bytes is 8 PiB).
 *
 * Contract for implementations:
 * - Requests past `length` reject with ERR_OUT_OF_BOUNDS; negative or non-integer ranges with
 *   ERR_INVALID_ARGUMENT. Zero-length requests succeed and do nothing.
 * - No alignment is required of callers; a driver with an alignment (O_DIRECT, qcow2 clusters)
 *   handles partial units itself (read-modify-write where needed).
 * - `read` fills the whole buffer or rejects; a short read at EOF of a sparse file reads zeroes.
 * - Errors are ShearError with kind `io` (and the OS errno in context.errno and the cause)
 *   for I/O failures, `no-space` for ENOSPC.
 */
export interface WriteOptions {
  /** Force unit access: the data is on stable storage when the promise resolves. */
  fua?: boolean;
  /**
   * The caller no longer needs the write (a copy whose range was discarded): a driver that
   * would wait for something (a fleecing cache waiting for space) gives up with ERR_ABORTED.
   * Drivers that do not wait ignore it.
   */
  signal?: AbortSignal;
}

export interface WriteZeroesOptions extends WriteOptions {
  /** The driver may deallocate (punch a hole) instead of writing zeroes. */
  mayUnmap?: boolean;
  /** Fail with ERR_NOT_IMPLEMENTED rather than fall back to writing zero buffers (NBD FAST_ZERO). */
  fastOnly?: boolean;
}

/**
 * One run of a block-status answer. `allocated` means this layer decides the content (false:
 * reads fall through to the backing chain, or read as zeroes with no backing). `zero` means the
 * run reads as zeroes. `data` means storage holds data for the run (a hole has data=false).
 */
export interface BlockStatusExtent {
  offset: number;
  bytes: number;
  data: boolean;
  zero: boolean;
  allocated: boolean;
}

export interface BlockIO {
  /** Size in bytes of what the node serves. */
  readonly length: number;
  read(offset: number, buf: Uint8Array): Promise<void>;
  write(offset: number, buf: Uint8Array, opts?: WriteOptions): Promise<void>;
  writeZeroes(offset: number, bytes: number, opts?: WriteZeroesOptions): Promise<void>;
  /** A hint that the range is no longer needed; it may read back as anything the driver chooses (zero for files and qcow2 without backing). */
  discard(offset: number, bytes: number): Promise<void>;
  flush(): Promise<void>;
  /**
   * Extents covering [offset, offset + bytes) in order, contiguous, possibly stopping early
   * (callers loop), never empty for bytes > 0.
   */
  blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]>;
  /** Releases fds and caches; further calls reject. Idempotent. */
  close(): Promise<void>;
}
