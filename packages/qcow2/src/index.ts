export {
  Qcow2Image,
  type Qcow2OpenOptions,
  type Qcow2Info,
  type Qcow2WriteMapping,
  type MappedExtent,
} from './image.js';
export { formatQcow2, planLayout, DEFAULT_CLUSTER_BYTES, DEFAULT_REFCOUNT_BITS, type Qcow2CreateOptions, type Qcow2Layout } from './create.js';
export type { GrowableIO } from './growable-io.js';
export type { StoredBitmap, BitmapToStore } from './bitmaps-store.js';
