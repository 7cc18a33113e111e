/* Word kernels for @shear/bitmap's exclusive paths (see src/bitmap-kernels.ts). */
#ifndef SHEAR_BITMAP_KERNELS_H
#define SHEAR_BITMAP_KERNELS_H
#define NAPI_VERSION 8
#include <node_api.h>

napi_value BitmapOrWords(napi_env env, napi_callback_info info);

#endif
