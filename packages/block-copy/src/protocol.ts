import type { WireError } from '@shear/base';
import type { HostExtent } from '@shear/block';

/**
 * What the coordinator sends a worker: a guest range and where its bytes are on both sides.
 * Plain data only (structured clone); the worker never sees graph objects.
 */
export interface CopyTaskMessage {
  /** Guest offset and length, for error context. */
  offset: number;
  bytes: number;
  /** Cover exactly `bytes`, in order. Source may hold fd, zero and error extents. */
  src: HostExtent[];
  /** Cover exactly `bytes`, in order; fd and error extents only. */
  dst: HostExtent[];
  /** The worker copies in pieces of this size and checks the cancel word between them. */
  chunkBytes: number;
  /**
   * Start writeback of each written piece and drop it from the page cache once written
   * (sync_file_range + posix_fadvise, as nbdcopy does), so dirty pages do not pile up.
   */
  dropCache: boolean;
  /**
   * The data needs no transform: pieces whose both sides are file extents may be copied in the
   * kernel (copy_file_range), falling back to pread/pwrite where the kernel refuses.
   */
  inKernelCopy?: boolean;
  /** Int32 cancel words shared with the coordinator; non-zero at `cancelIndex` = stop. */
  cancel: SharedArrayBuffer;
  cancelIndex: number;
  /** Compress each whole cluster of this size with deflate instead of writing it (qcow2 compressed targets). */
  compressClusterBytes?: number;
  /** zlib windowBits for compression (the format's readers must be able to inflate it). */
  compressWindowBits?: number;
  /**
   * Fault injection (tests, like blkdebug for I/O): the worker thread exits once it has written
   * this many bytes of the task, as a crashing thread would.
   */
  faultExitAfterBytes?: number;
}

/**
 * A worker's answer. Workers never throw across the thread boundary (structured clone would drop
 * the error's code): failures come back encoded. `doneBytes` counts bytes from the start of the
 * range that are known to be written (a multiple of chunkBytes, or all of it on success).
 */
export type CopyTaskResult =
  | { ok: true; bytes: number; zeroBytes: number; ms: number; compressed?: CompressedCluster[]; /** Bytes copy_file_range moved. */ inKernelBytes?: number }
  | { ok: false; error: WireError; doneBytes: number };

export interface CompressedCluster {
  /** Guest offset of the cluster. */
  offset: number;
  data: Uint8Array;
  /** False when deflate did not make the cluster smaller: `data` is the cluster as it is. */
  compressed: boolean;
}
