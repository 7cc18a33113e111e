import type { NativeIO } from '@shear/native';
import type { CopyTaskMessage } from '../protocol.js';
import { forEachPiece } from './pieces.js';

/** How far an in-kernel copy of a piece got; `error` set when copy_file_range failed there. */
export interface KernelCopyOutcome {
  /** Bytes from the start of the piece that are in the target. */
  done: number;
  error?: unknown;
}

interface Segment {
  srcFd: number;
  srcOffset: number;
  dstFd: number;
  dstOffset: number;
  bytes: number;
}

/**
 * Copies [at, at + bytes) of the task with copy_file_range(2): the kernel moves the pages from
 * the source file to the target without a round trip through this thread's buffer (and clones
 * them where the file system can). Both sides of the piece must be file extents (the caller
 * checks). Stops at the first failure or short copy (the source file ends early) and says how
 * far it got: the caller finishes the piece with pread/pwrite, which reads zeroes past the end
 * and reports a real I/O error precisely as a read or a write failure.
 */
export function copyInKernel(task: CopyTaskMessage, at: number, bytes: number, native: NativeIO): KernelCopyOutcome {
  const segments: Segment[] = [];
  forEachPiece(task.dst, at, bytes, (d, dWithin, dPos, dn) => {
    if (d.kind !== 'fd') return;
    forEachPiece(task.src, at + dPos, dn, (s, sWithin, _sPos, sn) => {
      if (s.kind !== 'fd') return;
      const last = segments.at(-1);
      const seg = { srcFd: s.fd, srcOffset: s.hostOffset + sWithin, dstFd: d.fd, dstOffset: d.hostOffset + dWithin + _sPos, bytes: sn };
      // Neighbouring extents that continue each other on both sides become one call.
      if (last && last.srcFd === seg.srcFd && last.dstFd === seg.dstFd && last.srcOffset + last.bytes === seg.srcOffset && last.dstOffset + last.bytes === seg.dstOffset) last.bytes += sn;
      else segments.push(seg);
    });
  });
  let done = 0;
  for (const s of segments) {
    let got = 0;
    while (got < s.bytes) {
      let r: number;
      try {
        r = native.copyFileRange(s.srcFd, s.srcOffset + got, s.dstFd, s.dstOffset + got, s.bytes - got);
      } catch (error) {
        return { done: done + got, error };
      }
      if (r === 0) return { done: done + got };
      got += r;
    }
    done += s.bytes;
  }
  return { done };
}
