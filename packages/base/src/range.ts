import { ShearError } from './shear-error.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;
export const TiB = 1024 * GiB;

export function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && 2 ** Math.round(Math.log2(n)) === n;
}

/** log2 of a power of two, exact. */
export function log2Exact(n: number): number {
  const l = Math.round(Math.log2(n));
  if (2 ** l !== n) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot take log2 of ${n}: not a power of two`);
  return l;
}

export function alignDown(value: number, alignment: number): number {
  return value - (value % alignment);
}

export function alignUp(value: number, alignment: number): number {
  const rem = value % alignment;
  return rem === 0 ? value : value + (alignment - rem);
}

export function rangesOverlap(aOffset: number, aBytes: number, bOffset: number, bBytes: number): boolean {
  return aOffset < bOffset + bBytes && bOffset < aOffset + aBytes;
}

/**
 * Checks that (offset, bytes) is a range of safe non-negative integers inside [0, length].
 * @throws ERR_INVALID_ARGUMENT for non-integers or negatives, ERR_OUT_OF_BOUNDS past the end
 */
export function assertRange(offset: number, bytes: number, length: number, what = 'range'): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(bytes) || offset < 0 || bytes < 0) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot use ${what} (${offset}, ${bytes}): offset and bytes must be non-negative integers`, { offset, bytes });
  }
  if (offset + bytes > length) {
    throw new ShearError('ERR_OUT_OF_BOUNDS', `Cannot use ${what} (${offset}, ${bytes}): it ends past ${length}`, { offset, bytes });
  }
}
