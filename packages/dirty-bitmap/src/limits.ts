import { ShearError, isPowerOfTwo, KiB } from '@shear/base';

/** QEMU's limits, so that bitmaps can be stored in qcow2 images and handled by qemu-img. */
export const MIN_BITMAP_GRANULARITY_BYTES = 512;
export const MAX_BITMAP_GRANULARITY_BYTES = 2 ** 31;
export const MAX_BITMAP_NAME_BYTES = 1023;

/**
 * QEMU's default: the node's cluster size clamped to [4 KiB, 64 KiB], or 64 KiB when the node
 * has no cluster size.
 */
export function defaultGranularity(clusterBytes?: number): number {
  if (!clusterBytes) return 64 * KiB;
  return Math.min(64 * KiB, Math.max(4 * KiB, clusterBytes));
}

/** @throws ERR_BITMAP_GRANULARITY */
export function checkGranularity(granularity: number): void {
  if (!isPowerOfTwo(granularity) || granularity < MIN_BITMAP_GRANULARITY_BYTES) {
    throw new ShearError('ERR_BITMAP_GRANULARITY', `Cannot use granularity ${granularity}: it must be a power of 2 and at least ${MIN_BITMAP_GRANULARITY_BYTES}`);
  }
  if (granularity > MAX_BITMAP_GRANULARITY_BYTES) {
    throw new ShearError('ERR_BITMAP_GRANULARITY', `Cannot use granularity ${granularity}: it must be at most ${MAX_BITMAP_GRANULARITY_BYTES}`);
  }
}

/** @throws ERR_BITMAP_NAME */
export function checkBitmapName(name: string): void {
  if (typeof name !== 'string' || name.length === 0) {
    throw new ShearError('ERR_BITMAP_NAME', 'Cannot use bitmap name: it must not be empty');
  }
  if (Buffer.byteLength(name, 'utf8') > MAX_BITMAP_NAME_BYTES) {
    throw new ShearError('ERR_BITMAP_NAME', `Cannot use bitmap name "${name.slice(0, 32)}...": it is longer than ${MAX_BITMAP_NAME_BYTES} bytes`, { bitmap: name });
  }
}
