import { readSync, writeSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { deflateRawSync } from 'node:zlib';
import { ShearError, fromWire, toWire, type ErrorCode } from '@shear/base';
import type { HostExtent } from '@shear/block';
import { errnoName, getNative, type NativeIO } from '@shear/native';
import type { CompressedCluster, CopyTaskMessage, CopyTaskResult } from '../protocol.js';
import { copyInKernel } from './kernel-copy.js';
import { allFileExtents, forEachPiece } from './pieces.js';
import { paceWriteback } from './writeback.js';

/**
 * The worker side of block-copy: synchronous system calls on the fds the coordinator mapped.
 * A worker thread runs one task at a time, so blocking calls cost nothing but this thread,
 * and one buffer per thread bounds memory whatever the disk size.
 *
 * A piece whose source and target are both file extents, in a task that does not transform the
 * data, is copied in the kernel (copy_file_range: no copy through user memory, one call per
 * piece instead of a read and a write); anything else, and the rest of a piece where the kernel
 * copy stopped, goes through pread/pwrite and this thread's buffer.
 *
 * Runs in worker threads and, for tests, in-process; owns nothing but its buffer.
 */

let buffer: Buffer = Buffer.alloc(0);
function bufferOf(bytes: number): Buffer {
  if (buffer.length < bytes) buffer = Buffer.allocUnsafe(bytes);
  return buffer;
}

/** Pieces smaller than this are not paced (see writePiece). */
const PACE_MIN_BYTES = 256 * 1024;

export function runCopyTask(task: CopyTaskMessage, native: NativeIO = getNative()): CopyTaskResult {
  const t0 = performance.now();
  const cancel = new Int32Array(task.cancel);
  let done = 0;
  let zeroBytes = 0;
  const compressed: CompressedCluster[] = [];
  let inKernelBytes = 0;
  let kernel = task.inKernelCopy === true && native.supports.copyFileRange;
  try {
    while (done < task.bytes) {
      if (Atomics.load(cancel, task.cancelIndex) !== 0) {
        return { ok: false, error: toWire(new ShearError('ERR_ABORTED', 'Cannot finish copy task: it was cancelled', { offset: task.offset + done })), doneBytes: done };
      }
      const n = Math.min(task.chunkBytes, task.bytes - done);
      if (task.compressClusterBytes) {
        const buf = bufferOf(n).subarray(0, n);
        zeroBytes += readPiece(task, done, buf);
        compressPiece(task, done, buf, compressed);
      } else {
        let inKernel = 0;
        if (kernel && allFileExtents(task.src, done, n) && allFileExtents(task.dst, done, n)) {
          const r = copyInKernel(task, done, n, native);
          inKernel = r.done;
          inKernelBytes += r.done;
          // EXDEV, EINVAL, ENOSYS, EOPNOTSUPP or a real I/O error: the rest of the task goes
          // through pread/pwrite, which reports a real error as a read or a write failure.
          if (r.error !== undefined) kernel = false;
        }
        if (inKernel < n) {
          const buf = bufferOf(n - inKernel).subarray(0, n - inKernel);
          zeroBytes += readPiece(task, done + inKernel, buf);
          writePiece(task, done + inKernel, buf);
        }
        paceTarget(task, done, n, native);
      }
      done += n;
      if (task.faultExitAfterBytes !== undefined && done >= task.faultExitAfterBytes) process.exit(70);
    }
  } catch (err) {
    return { ok: false, error: toWire(err), doneBytes: done };
  }
  const result: CopyTaskResult = { ok: true, bytes: task.bytes, zeroBytes, ms: performance.now() - t0, inKernelBytes };
  if (task.compressClusterBytes) result.compressed = compressed;
  return result;
}

function ioFailure(code: ErrorCode, task: CopyTaskMessage, pos: number, bytes: number, op: string, err: unknown): ShearError {
  if (err instanceof ShearError) return err;
  const errno = errnoName(err);
  const what = op === 'read' ? 'read from source' : 'write to target';
  return new ShearError(
    errno === 'ENOSPC' ? 'ERR_NO_SPACE' : code,
    `Cannot copy (${task.offset + pos}, ${bytes}): ${what} failed: ${(err as Error).message}`,
    { offset: task.offset + pos, bytes, op, ...(errno ? { errno } : {}) },
    { cause: err },
  );
}

/** Fills `buf` with the source bytes at [at, at + buf.length); returns how many were zero extents. */
function readPiece(task: CopyTaskMessage, at: number, buf: Buffer): number {
  let zero = 0;
  forEachPiece(task.src, at, buf.length, (e, within, pos, n) => {
    if (e.kind === 'zero') {
      buf.fill(0, pos, pos + n);
      zero += n;
    } else if (e.kind === 'error') {
      throw fromWire(e.error);
    } else {
      let got = 0;
      while (got < n) {
        let r: number;
        try {
          r = readSync(e.fd, buf, pos + got, n - got, e.hostOffset + within + got);
        } catch (err) {
          throw ioFailure('ERR_COPY_READ_FAILED', task, at + pos + got, n - got, 'read', err);
        }
        // A file shorter than the node reads as zeroes past its end, like the file driver.
        if (r === 0) {
          buf.fill(0, pos + got, pos + n);
          break;
        }
        got += r;
      }
    }
  });
  return zero;
}

function writePiece(task: CopyTaskMessage, at: number, buf: Buffer): void {
  forEachPiece(task.dst, at, buf.length, (e, within, pos, n) => {
    if (e.kind === 'error') throw fromWire(e.error);
    if (e.kind !== 'fd') throw new ShearError('ERR_INTERNAL', 'Cannot write a copy task: target extent is not a file extent');
    const hostOffset = e.hostOffset + within;
    let put = 0;
    while (put < n) {
      try {
        put += writeSync(e.fd, buf, pos + put, n - put, hostOffset + put);
      } catch (err) {
        throw ioFailure('ERR_COPY_WRITE_FAILED', task, at + pos + put, n - put, 'write', err);
      }
    }
  });
}

/** Paces writeback of the target pieces of [at, at + bytes), however they were written. */
function paceTarget(task: CopyTaskMessage, at: number, bytes: number, native: NativeIO): void {
  if (!task.dropCache) return;
  forEachPiece(task.dst, at, bytes, (e, within, _pos, n) => {
    // Streaming writes are paced; small scattered ones (incrementals) are left to the kernel and
    // the final flush, where waiting for each piece's writeback would only add latency.
    if (e.kind === 'fd' && n >= PACE_MIN_BYTES) paceWriteback(e.fd, e.hostOffset + within, n, native);
  });
}

/** Deflates each whole cluster of the piece (raw deflate, as qcow2 stores compressed clusters). */
function compressPiece(task: CopyTaskMessage, at: number, buf: Buffer, out: CompressedCluster[]): void {
  const cluster = task.compressClusterBytes!;
  for (let pos = 0; pos < buf.length; pos += cluster) {
    const data = buf.subarray(pos, Math.min(buf.length, pos + cluster));
    const deflated = data.length === cluster ? deflateRawSync(data, { windowBits: task.compressWindowBits ?? 15 }) : undefined;
    // A partial last cluster, or one deflate cannot shrink, is stored as it is.
    if (deflated && deflated.length < cluster) out.push({ offset: task.offset + at + pos, data: new Uint8Array(deflated), compressed: true });
    else out.push({ offset: task.offset + at + pos, data: Uint8Array.from(data), compressed: false });
  }
}
