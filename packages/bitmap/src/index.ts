export { SharedBitmap, type BitmapHandle, type DirtyArea } from './shared-bitmap.js';
export { serializeBitmap, deserializeBitmap } from './serialize.js';
export { MIN_GRANULARITY_BYTES, MAX_GRANULARITY_BYTES } from './layout.js';
