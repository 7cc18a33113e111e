export { DirtyBitmap, CHECK_DEFAULT, CHECK_ALLOW_RO, type DirtyBitmapInfo, type UsageCheck } from './dirty-bitmap.js';
export { NodeBitmaps, type AddBitmapOptions } from './node-bitmaps.js';
export { parseBitmapSyncMode, concludeBitmapSync, type BitmapSyncMode, type JobOutcome } from './sync-mode.js';
export {
  MIN_BITMAP_GRANULARITY_BYTES,
  MAX_BITMAP_GRANULARITY_BYTES,
  MAX_BITMAP_NAME_BYTES,
  defaultGranularity,
  checkGranularity,
  checkBitmapName,
} from './limits.js';
export {
  loadSidecar,
  storeSidecar,
  markSidecarInUse,
  removeFromSidecar,
  sidecarPath,
  SIDECAR_SUFFIX,
  type SidecarBitmap,
  type SidecarContents,
  type SidecarBitmapToStore,
} from './sidecar.js';
