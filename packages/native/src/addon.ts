import { createRequire } from 'node:module';
import { ShearError } from '@shear/base';
import { copyAction, ioError } from './errors.js';
import type { AlignedBuffer, DirectIOAlignment, FadviseAdvice, FallocateMode, FallocateOptions, NativeIO } from './types.js';
import {
  checkAdvice,
  checkAlignment,
  checkCopy,
  checkFallocate as checkFallocateArgs,
  checkFd,
  checkFdOffset,
  checkRange,
  checkSyncFlags,
  checkUint,
} from './validate.js';

/** The raw exports of build/Release/shear_native.node (see addon/shear_native.c). */
export interface Binding {
  seekData(fd: number, offset: number): number;
  seekHole(fd: number, offset: number): number;
  fallocate(fd: number, mode: number, offset: number, bytes: number): number;
  fallocateAsync(fd: number, mode: number, offset: number, bytes: number): Promise<number>;
  syncFileRange(fd: number, offset: number, bytes: number, flags: number): number;
  syncFileRangeAsync(fd: number, offset: number, bytes: number, flags: number): Promise<number>;
  fadvise(fd: number, offset: number, bytes: number, advice: number): number;
  fadviseAsync(fd: number, offset: number, bytes: number, advice: number): Promise<number>;
  copyFileRange(fdIn: number, offsetIn: number, fdOut: number, offsetOut: number, bytes: number): number;
  copyFileRangeAsync(fdIn: number, offsetIn: number, fdOut: number, offsetOut: number, bytes: number): Promise<number>;
  dioAlignment(fd: number): DirectIOAlignment | null;
  addressModulo(view: ArrayBufferView, modulus: number): number;
  constants: Record<BindingConstant, number>;
}

type BindingConstant =
  | 'FALLOC_FL_KEEP_SIZE'
  | 'FALLOC_FL_PUNCH_HOLE'
  | 'FALLOC_FL_ZERO_RANGE'
  | 'SYNC_FILE_RANGE_WAIT_BEFORE'
  | 'SYNC_FILE_RANGE_WRITE'
  | 'SYNC_FILE_RANGE_WAIT_AFTER'
  | 'POSIX_FADV_NORMAL'
  | 'POSIX_FADV_RANDOM'
  | 'POSIX_FADV_SEQUENTIAL'
  | 'POSIX_FADV_WILLNEED'
  | 'POSIX_FADV_DONTNEED'
  | 'POSIX_FADV_NOREUSE';

const REQUIRED_FUNCTIONS = [
  'seekData',
  'seekHole',
  'fallocate',
  'fallocateAsync',
  'syncFileRange',
  'syncFileRangeAsync',
  'fadvise',
  'fadviseAsync',
  'copyFileRange',
  'copyFileRangeAsync',
  'dioAlignment',
  'addressModulo',
] as const;

/**
 * Loads the compiled addon from `path`.
 * @throws the loader's error when the file is missing or does not load; an Error when it loads
 *   but lacks a function (built from older sources)
 */
export function loadBinding(path: string): Binding {
  const require = createRequire(import.meta.url);
  const binding = require(path) as Partial<Binding>;
  const missing = REQUIRED_FUNCTIONS.filter((name) => typeof binding[name] !== 'function');
  if (missing.length > 0 || typeof binding.constants !== 'object') {
    throw new Error(`The addon at ${path} is out of date (missing ${missing.join(', ') || 'constants'}): rebuild it with \`npm run build:addon -w @shear/native\``);
  }
  return binding as Binding;
}

const MODE_TEXT: Record<FallocateMode, string> = { allocate: 'allocate', 'punch-hole': 'punch hole', 'zero-range': 'zero range' };

export function createAddonNative(binding: Binding): NativeIO {
  const c = binding.constants;
  const adviceValue: Record<FadviseAdvice, number> = {
    normal: c.POSIX_FADV_NORMAL,
    sequential: c.POSIX_FADV_SEQUENTIAL,
    random: c.POSIX_FADV_RANDOM,
    willneed: c.POSIX_FADV_WILLNEED,
    dontneed: c.POSIX_FADV_DONTNEED,
    noreuse: c.POSIX_FADV_NOREUSE,
  };

  function fallocateFlags(mode: FallocateMode, opts: FallocateOptions | undefined): number {
    const keep = opts?.keepSize ? c.FALLOC_FL_KEEP_SIZE : 0;
    if (mode === 'punch-hole') return c.FALLOC_FL_PUNCH_HOLE | c.FALLOC_FL_KEEP_SIZE;
    if (mode === 'zero-range') return c.FALLOC_FL_ZERO_RANGE | keep;
    return keep;
  }

  function checkFallocate(fd: number, mode: FallocateMode, offset: number, bytes: number): void {
    checkFallocateArgs(fd, mode, offset, bytes);
    // fallocate(2) rejects a zero length with EINVAL; the callers' ranges are never empty.
    if (bytes === 0) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot ${MODE_TEXT[mode]} (${offset}, 0) in fd ${fd}: the range is empty`);
  }

  const fallocateAction = (fd: number, mode: FallocateMode, offset: number, bytes: number) => `${MODE_TEXT[mode]} (${offset}, ${bytes}) in fd ${fd}`;
  const syncAction = (fd: number, offset: number, bytes: number) => `sync range (${offset}, ${bytes}) of fd ${fd}`;
  const adviseAction = (fd: number, offset: number, bytes: number, advice: string) => `advise '${advice}' for (${offset}, ${bytes}) of fd ${fd}`;

  function seek(kind: 'data' | 'hole', fd: number, offset: number): number {
    checkFdOffset(fd, offset);
    try {
      return kind === 'data' ? binding.seekData(fd, offset) : binding.seekHole(fd, offset);
    } catch (err) {
      throw ioError(err, `seek ${kind} from ${offset} in fd ${fd}`, { op: `seek-${kind}`, offset });
    }
  }

  return {
    available: true,
    loadError: undefined,
    fallbackReason: undefined,
    supports: { seek: true, fallocate: true, syncFileRange: true, fadvise: true, copyFileRange: true, alignedAlloc: true },

    seekData: (fd, offset) => seek('data', fd, offset),
    seekHole: (fd, offset) => seek('hole', fd, offset),

    fallocate(fd, mode, offset, bytes, opts) {
      checkFallocate(fd, mode, offset, bytes);
      try {
        binding.fallocate(fd, fallocateFlags(mode, opts), offset, bytes);
      } catch (err) {
        throw ioError(err, fallocateAction(fd, mode, offset, bytes), { op: 'fallocate', offset, bytes });
      }
    },
    async fallocateAsync(fd, mode, offset, bytes, opts) {
      checkFallocate(fd, mode, offset, bytes);
      try {
        await binding.fallocateAsync(fd, fallocateFlags(mode, opts), offset, bytes);
      } catch (err) {
        throw ioError(err, fallocateAction(fd, mode, offset, bytes), { op: 'fallocate', offset, bytes });
      }
    },

    syncFileRange(fd, offset, bytes, flags) {
      checkRange(fd, offset, bytes);
      checkSyncFlags(flags);
      try {
        binding.syncFileRange(fd, offset, bytes, flags);
      } catch (err) {
        throw ioError(err, syncAction(fd, offset, bytes), { op: 'sync-file-range', offset, bytes });
      }
    },
    async syncFileRangeAsync(fd, offset, bytes, flags) {
      checkRange(fd, offset, bytes);
      checkSyncFlags(flags);
      try {
        await binding.syncFileRangeAsync(fd, offset, bytes, flags);
      } catch (err) {
        throw ioError(err, syncAction(fd, offset, bytes), { op: 'sync-file-range', offset, bytes });
      }
    },

    fadvise(fd, offset, bytes, advice) {
      checkRange(fd, offset, bytes);
      checkAdvice(advice);
      try {
        binding.fadvise(fd, offset, bytes, adviceValue[advice]);
      } catch (err) {
        throw ioError(err, adviseAction(fd, offset, bytes, advice), { op: 'fadvise', offset, bytes });
      }
    },
    async fadviseAsync(fd, offset, bytes, advice) {
      checkRange(fd, offset, bytes);
      checkAdvice(advice);
      try {
        await binding.fadviseAsync(fd, offset, bytes, adviceValue[advice]);
      } catch (err) {
        throw ioError(err, adviseAction(fd, offset, bytes, advice), { op: 'fadvise', offset, bytes });
      }
    },

    copyFileRange(fdIn, offsetIn, fdOut, offsetOut, bytes) {
      checkCopy(fdIn, offsetIn, fdOut, offsetOut, bytes);
      if (bytes === 0) return 0;
      try {
        return binding.copyFileRange(fdIn, offsetIn, fdOut, offsetOut, bytes);
      } catch (err) {
        throw ioError(err, copyAction(fdIn, offsetIn, fdOut, offsetOut, bytes), { op: 'copy-file-range', offset: offsetIn, bytes });
      }
    },
    async copyFileRangeAsync(fdIn, offsetIn, fdOut, offsetOut, bytes) {
      checkCopy(fdIn, offsetIn, fdOut, offsetOut, bytes);
      if (bytes === 0) return 0;
      try {
        return await binding.copyFileRangeAsync(fdIn, offsetIn, fdOut, offsetOut, bytes);
      } catch (err) {
        throw ioError(err, copyAction(fdIn, offsetIn, fdOut, offsetOut, bytes), { op: 'copy-file-range', offset: offsetIn, bytes });
      }
    },

    allocAligned(bytes, alignment, opts): AlignedBuffer {
      checkUint(bytes, 'buffer size');
      checkAlignment(alignment);
      // ArrayBuffer memory lives off the V8 heap and never moves, so an offset computed from
      // its address now stays valid for the buffer's life.
      const total = bytes + alignment;
      const backing = opts?.shared ? new SharedArrayBuffer(total) : new ArrayBuffer(total);
      const misalignment = binding.addressModulo(new Uint8Array(backing, 0, 1), alignment);
      const start = misalignment === 0 ? 0 : alignment - misalignment;
      return { buffer: Buffer.from(backing, start, bytes), aligned: true };
    },
    addressModulo(view, modulus) {
      checkUint(modulus, 'modulus');
      if (modulus === 0) throw new ShearError('ERR_INVALID_ARGUMENT', 'Cannot take an address modulo 0');
      return binding.addressModulo(view, modulus);
    },
    isAligned(view, alignment) {
      checkAlignment(alignment);
      return binding.addressModulo(view, alignment) === 0;
    },
    dioAlignment(fd) {
      checkFd(fd);
      try {
        return binding.dioAlignment(fd);
      } catch (err) {
        throw ioError(err, `query direct I/O alignment of fd ${fd}`, { op: 'statx' });
      }
    },
  };
}
