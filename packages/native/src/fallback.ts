import { read, readSync, write, writeSync } from 'node:fs';
import { promisify } from 'node:util';
import { ShearError } from '@shear/base';
import { copyAction, ioError } from './errors.js';
import type { NativeIO } from './types.js';
import { checkAdvice, checkAlignment, checkCopy, checkFallocate, checkFd, checkFdOffset, checkRange, checkSyncFlags, checkUint } from './validate.js';

/** The buffer size of the fallback's read+write copy loop. */
export const FALLBACK_COPY_CHUNK_BYTES = 1024 * 1024;

const readAsync = promisify(read);
const writeAsync = promisify(write);

function unsupported(what: string, reason: string): ShearError {
  return new ShearError('ERR_IO_UNSUPPORTED', `Cannot ${what}: the native addon is not in use (${reason})`, { op: what });
}

/**
 * The pure-JS stand-in for the addon: the same API, doing what JS can. seekData/seekHole,
 * fallocate, addressModulo: ERR_IO_UNSUPPORTED. syncFileRange, fadvise: no-ops, because both
 * are only hints about the page cache (no durability is promised by either). copyFileRange: a
 * read+write loop. allocAligned: an ordinary buffer, reported aligned: false, because JS cannot
 * learn an address.
 */
export function createFallbackNative(reason: string, loadError?: Error): NativeIO {
  return {
    available: false,
    loadError,
    fallbackReason: reason,
    supports: { seek: false, fallocate: false, syncFileRange: false, fadvise: false, copyFileRange: false, alignedAlloc: false },

    seekData(fd, offset) {
      checkFdOffset(fd, offset);
      throw unsupported('seek data', reason);
    },
    seekHole(fd, offset) {
      checkFdOffset(fd, offset);
      throw unsupported('seek hole', reason);
    },

    fallocate(fd, mode, offset, bytes) {
      checkFallocate(fd, mode, offset, bytes);
      throw unsupported(`fallocate ${mode}`, reason);
    },
    async fallocateAsync(fd, mode, offset, bytes) {
      checkFallocate(fd, mode, offset, bytes);
      throw unsupported(`fallocate ${mode}`, reason);
    },

    syncFileRange(fd, offset, bytes, flags) {
      checkRange(fd, offset, bytes);
      checkSyncFlags(flags);
    },
    async syncFileRangeAsync(fd, offset, bytes, flags) {
      checkRange(fd, offset, bytes);
      checkSyncFlags(flags);
    },
    fadvise(fd, offset, bytes, advice) {
      checkRange(fd, offset, bytes);
      checkAdvice(advice);
    },
    async fadviseAsync(fd, offset, bytes, advice) {
      checkRange(fd, offset, bytes);
      checkAdvice(advice);
    },

    copyFileRange(fdIn, offsetIn, fdOut, offsetOut, bytes) {
      checkCopy(fdIn, offsetIn, fdOut, offsetOut, bytes);
      const buf = Buffer.allocUnsafe(Math.min(bytes, FALLBACK_COPY_CHUNK_BYTES));
      let done = 0;
      try {
        while (done < bytes) {
          const got = readSync(fdIn, buf, 0, Math.min(buf.length, bytes - done), offsetIn + done);
          if (got === 0) break;
          for (let put = 0; put < got; ) put += writeSync(fdOut, buf, put, got - put, offsetOut + done + put);
          done += got;
        }
      } catch (err) {
        if (done > 0) return done;
        throw ioError(err, copyAction(fdIn, offsetIn, fdOut, offsetOut, bytes), { op: 'copy-file-range', offset: offsetIn, bytes });
      }
      return done;
    },
    async copyFileRangeAsync(fdIn, offsetIn, fdOut, offsetOut, bytes) {
      checkCopy(fdIn, offsetIn, fdOut, offsetOut, bytes);
      const buf = Buffer.allocUnsafe(Math.min(bytes, FALLBACK_COPY_CHUNK_BYTES));
      let done = 0;
      try {
        while (done < bytes) {
          const { bytesRead } = await readAsync(fdIn, buf, 0, Math.min(buf.length, bytes - done), offsetIn + done);
          if (bytesRead === 0) break;
          for (let put = 0; put < bytesRead; ) {
            const { bytesWritten } = await writeAsync(fdOut, buf, put, bytesRead - put, offsetOut + done + put);
            put += bytesWritten;
          }
          done += bytesRead;
        }
      } catch (err) {
        if (done > 0) return done;
        throw ioError(err, copyAction(fdIn, offsetIn, fdOut, offsetOut, bytes), { op: 'copy-file-range', offset: offsetIn, bytes });
      }
      return done;
    },

    allocAligned(bytes, alignment, opts) {
      checkUint(bytes, 'buffer size');
      checkAlignment(alignment);
      const buffer = opts?.shared ? Buffer.from(new SharedArrayBuffer(bytes)) : Buffer.alloc(bytes);
      return { buffer, aligned: false };
    },
    addressModulo(_view, modulus) {
      checkUint(modulus, 'modulus');
      throw unsupported('read a buffer address', reason);
    },
    isAligned(_view, alignment) {
      checkAlignment(alignment);
      return false;
    },
    dioAlignment(fd) {
      checkFd(fd);
      return null;
    },
  };
}
