import { ShearError, isPowerOfTwo } from '@shear/base';

/** The largest alignment allocAligned accepts: a huge page. */
export const MAX_ALIGNMENT_BYTES = 1 << 30;

export function checkFd(fd: number): void {
  if (!Number.isInteger(fd) || fd < 0 || fd > 0x7fffffff) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot use fd ${fd}: not a file descriptor`);
  }
}

export function checkUint(value: number, what: string): void {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot use ${what} ${value}: must be a non-negative integer`);
  }
}

export function checkAlignment(alignment: number): void {
  if (!isPowerOfTwo(alignment) || alignment > MAX_ALIGNMENT_BYTES) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot align to ${alignment} bytes: must be a power of two up to ${MAX_ALIGNMENT_BYTES}`);
  }
}

export function checkSyncFlags(flags: number): void {
  if (!Number.isInteger(flags) || flags < 0 || flags > 7) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot use sync_file_range flags ${flags}: only WAIT_BEFORE, WRITE and WAIT_AFTER exist`);
  }
}

export const FADVISE_ADVICE = ['normal', 'sequential', 'random', 'willneed', 'dontneed', 'noreuse'] as const;

export function checkAdvice(advice: string): void {
  if (!(FADVISE_ADVICE as readonly string[]).includes(advice)) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot give advice '${advice}': expected one of ${FADVISE_ADVICE.join(', ')}`);
  }
}

/** A call on one fd at `offset` (seekData, seekHole). */
export function checkFdOffset(fd: number, offset: number): void {
  checkFd(fd);
  checkUint(offset, 'offset');
}

/** A call on the range (offset, bytes) of one fd (syncFileRange, fadvise, fallocate). */
export function checkRange(fd: number, offset: number, bytes: number): void {
  checkFdOffset(fd, offset);
  checkUint(bytes, 'byte count');
}

export function checkCopy(fdIn: number, offsetIn: number, fdOut: number, offsetOut: number, bytes: number): void {
  checkFd(fdIn);
  checkFd(fdOut);
  checkUint(offsetIn, 'offset');
  checkUint(offsetOut, 'offset');
  checkUint(bytes, 'byte count');
}

export const FALLOCATE_MODES = ['allocate', 'punch-hole', 'zero-range'] as const;

export function checkFallocateMode(mode: string): void {
  if (!(FALLOCATE_MODES as readonly string[]).includes(mode)) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot use fallocate mode '${mode}': expected one of ${FALLOCATE_MODES.join(', ')}`);
  }
}

export function checkFallocate(fd: number, mode: string, offset: number, bytes: number): void {
  checkFallocateMode(mode);
  checkRange(fd, offset, bytes);
}
