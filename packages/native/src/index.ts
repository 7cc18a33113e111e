export type {
  AlignedBuffer,
  DirectIOAlignment,
  FadviseAdvice,
  FallocateMode,
  FallocateOptions,
  NativeIO,
  NativeSupport,
} from './types.js';
export { SYNC_FILE_RANGE } from './types.js';
export { ADDON_PATH, NATIVE_ENV_VAR, fallbackForcedByEnv, getNative, loadNative, type LoadNativeOptions } from './load.js';
export { FALLBACK_COPY_CHUNK_BYTES } from './fallback.js';
export { codeForErrno, errnoName, ioError } from './errors.js';
export { JS_BITMAP_KERNELS, getBitmapKernels, loadAddonBitmapKernels, type BitmapKernels } from './bitmap-kernels.js';
