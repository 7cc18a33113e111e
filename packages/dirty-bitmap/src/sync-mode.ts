import { ShearError } from '@shear/base';
import type { SharedBitmap } from '@shear/bitmap';
import type { DirtyBitmap } from './dirty-bitmap.js';
import type { NodeBitmaps } from './node-bitmaps.js';

/**
 * What happens to a job's bitmap when the job ends (seed 004):
 * - `on-success`: success -> the bitmap becomes the writes made during the job;
 *   failure -> as if the job never ran.
 * - `never`: the bitmap is never cleared (differential backups); writes during the job are
 *   merged in.
 * - `always`: success -> as on-success; failure -> (clusters not copied) ∪ (writes during the
 *   job), so a retry copies only the remainder.
 */
export type BitmapSyncMode = 'on-success' | 'never' | 'always';

/** A job's end as its bitmap sees it; a cancelled job counts as failed (QEMU: -ECANCELED). */
export type JobOutcome = 'success' | 'failure' | 'cancel';

/**
 * Parses QEMU's BitmapSyncMode, accepting the old name `conditional` for `on-success`.
 * @throws ERR_BITMAP_SYNC_MODE
 */
export function parseBitmapSyncMode(value: string): BitmapSyncMode {
  switch (value) {
    case 'on-success':
    case 'conditional':
      return 'on-success';
    case 'never':
    case 'always':
      return value;
    default:
      throw new ShearError('ERR_BITMAP_SYNC_MODE', `Cannot use bitmap sync mode "${value}": expected on-success, conditional, never or always`);
  }
}

/**
 * Settles `bm`, which the job froze with createSuccessor() when it started, and returns the
 * bitmap that holds the name afterwards.
 *
 * @param notCopied the job's copy bitmap at its end: every cluster it was to copy and did not
 *   (empty after a success). Any granularity; it is merged, not shared.
 */
export function concludeBitmapSync(
  bitmaps: NodeBitmaps,
  bm: DirtyBitmap,
  mode: BitmapSyncMode,
  outcome: JobOutcome,
  notCopied: SharedBitmap,
): DirtyBitmap {
  const succeeded = outcome === 'success';
  const sync = (succeeded || mode === 'always') && mode !== 'never';
  const result = sync ? bitmaps.abdicate(bm) : bitmaps.reclaim(bm);
  if (!succeeded && mode === 'always') result.bits.merge(notCopied);
  return result;
}
