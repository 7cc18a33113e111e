/*
 * bitmapOrWords(dst, dstIndex, src, srcIndex, count, summary, summaryIndex) -> bits added
 *
 * ORs `count` 32-bit words of src (from srcIndex) into dst (from dstIndex) and returns how many
 * bits were clear in dst and set in src. Each dst word i (counted from dstIndex) that turns
 * from zero to non-zero sets bit i%32 of summary[summaryIndex + i/32]: the next level of the
 * bitmap's summary, kept true in the same pass. Plain loads and stores, not atomic: @shear/bitmap
 * calls it only on a bitmap no other thread can write (one never handed out). Why native: the
 * count needs a popcount per word, and V8 has no popcount instruction, so a JS merge that keeps
 * an exact count is slower than a plain OR loop; here the OR, the skip of zero source words and
 * the popcount run at memory speed.
 *
 * Both arrays must be Int32Arrays; the ranges are checked against their lengths, since an
 * out-of-range store here would corrupt memory instead of throwing.
 */
#include "bitmap_kernels.h"

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

static bool get_words(napi_env env, napi_value value, int32_t **data, size_t *length) {
  bool is_typedarray = false;
  napi_typedarray_type type;
  napi_value arraybuffer;
  size_t byte_offset;
  void *ptr = NULL;
  if (napi_is_typedarray(env, value, &is_typedarray) != napi_ok || !is_typedarray) {
    napi_throw_type_error(env, "ERR_INVALID_ARGUMENT", "Expected an Int32Array");
    return false;
  }
  if (napi_get_typedarray_info(env, value, &type, length, &ptr, &arraybuffer, &byte_offset) != napi_ok || type != napi_int32_array) {
    napi_throw_type_error(env, "ERR_INVALID_ARGUMENT", "Expected an Int32Array");
    return false;
  }
  *data = (int32_t *)ptr;
  return true;
}

static bool get_index(napi_env env, napi_value value, int64_t *out) {
  if (napi_get_value_int64(env, value, out) != napi_ok || *out < 0) {
    napi_throw_range_error(env, "ERR_INVALID_ARGUMENT", "Expected a non-negative integer");
    return false;
  }
  return true;
}

/*
 * One pass in groups of 32 words (one summary bit each): a group whose source words are all zero
 * costs one OR-reduction; otherwise every word is ORed and stored without branches, the new bits
 * are counted 64 at a time, and the words that turned non-zero are collected into the group's
 * summary word. Where the CPU has AVX2 (chosen once per call) the same pass runs 8 words at a
 * time, the popcount done with a nibble table; the portable loop otherwise.
 */
#define OR_LOOP                                                                      \
  uint64_t added = 0;                                                                \
  for (size_t g = 0; g < count; g += 32) {                                           \
    size_t n = count - g < 32 ? count - g : 32;                                      \
    const uint32_t *s = (const uint32_t *)src + g;                                   \
    uint32_t *d = (uint32_t *)dst + g;                                               \
    uint32_t any = 0;                                                                \
    for (size_t k = 0; k < n; k++) any |= s[k];                                      \
    if (any == 0) continue;                                                          \
    uint32_t turned = 0;                                                             \
    for (size_t k = 0; k < n; k++) {                                                 \
      uint32_t sv = s[k], dv = d[k];                                                 \
      added += (uint64_t)__builtin_popcount(sv & ~dv);                               \
      turned |= (uint32_t)(dv == 0 && sv != 0) << k;                                 \
      d[k] = dv | sv;                                                                \
    }                                                                                \
    if (turned) summary[g >> 5] |= (int32_t)turned;                                  \
  }                                                                                  \
  return added;

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* Bits set in each byte of v: two 16-entry table look-ups per byte (one per nibble). */
__attribute__((target("avx2"))) static inline __m256i popcount_bytes(__m256i v) {
  const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  __m256i lo = _mm256_and_si256(v, low);
  __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
  return _mm256_add_epi8(_mm256_shuffle_epi8(table, lo), _mm256_shuffle_epi8(table, hi));
}

/* The same pass, 8 words at a time: whole groups of 32 words with AVX2, any tail portably. */
__attribute__((target("avx2,popcnt"))) static uint64_t or_words_avx2(int32_t *restrict dst, const int32_t *restrict src, size_t count, int32_t *restrict summary) {
  uint64_t added = 0;
  const __m256i zero = _mm256_setzero_si256();
  size_t whole = count & ~(size_t)31;
  for (size_t g = 0; g < whole; g += 32) {
    const __m256i *s = (const __m256i *)(src + g);
    __m256i *d = (__m256i *)(dst + g);
    __m256i s0 = _mm256_loadu_si256(s), s1 = _mm256_loadu_si256(s + 1), s2 = _mm256_loadu_si256(s + 2), s3 = _mm256_loadu_si256(s + 3);
    __m256i any = _mm256_or_si256(_mm256_or_si256(s0, s1), _mm256_or_si256(s2, s3));
    if (_mm256_testz_si256(any, any)) continue;
    __m256i sv[4] = {s0, s1, s2, s3};
    __m256i bytes = zero;
    uint32_t turned = 0;
    for (int k = 0; k < 4; k++) {
      __m256i dv = _mm256_loadu_si256(d + k);
      /* At most 8 per byte per vector, 32 after four: no byte overflows before the sum below. */
      bytes = _mm256_add_epi8(bytes, popcount_bytes(_mm256_andnot_si256(dv, sv[k])));
      __m256i was_zero = _mm256_cmpeq_epi32(dv, zero);
      __m256i src_zero = _mm256_cmpeq_epi32(sv[k], zero);
      uint32_t mask = (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(src_zero, was_zero)));
      turned |= mask << (8 * k);
      _mm256_storeu_si256(d + k, _mm256_or_si256(dv, sv[k]));
    }
    __m256i sums = _mm256_sad_epu8(bytes, zero);
    added += (uint64_t)_mm256_extract_epi64(sums, 0) + (uint64_t)_mm256_extract_epi64(sums, 1) +
             (uint64_t)_mm256_extract_epi64(sums, 2) + (uint64_t)_mm256_extract_epi64(sums, 3);
    if (turned) summary[g >> 5] |= (int32_t)turned;
  }
  for (size_t i = whole; i < count; i++) {
    uint32_t sv = (uint32_t)src[i], dv = (uint32_t)dst[i];
    added += (uint64_t)__builtin_popcount(sv & ~dv);
    if (dv == 0 && sv != 0) summary[i >> 5] |= (int32_t)(1u << (i & 31));
    dst[i] = (int32_t)(dv | sv);
  }
  return added;
}
#endif

static uint64_t or_words_portable(int32_t *restrict dst, const int32_t *restrict src, size_t count, int32_t *restrict summary) {
  OR_LOOP
}

static uint64_t or_words(int32_t *dst, const int32_t *src, size_t count, int32_t *summary) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("popcnt") && __builtin_cpu_supports("avx2")) return or_words_avx2(dst, src, count, summary);
#endif
  return or_words_portable(dst, src, count, summary);
}

napi_value BitmapOrWords(napi_env env, napi_callback_info info) {
  size_t argc = 7;
  napi_value argv[7], out;
  int32_t *dst, *src, *summary;
  size_t dst_len, src_len, summary_len;
  int64_t dst_index, src_index, count, summary_index;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  if (argc < 7) {
    napi_throw_type_error(env, "ERR_INVALID_ARGUMENT", "bitmapOrWords takes 7 arguments");
    return NULL;
  }
  if (!get_words(env, argv[0], &dst, &dst_len) || !get_index(env, argv[1], &dst_index) ||
      !get_words(env, argv[2], &src, &src_len) || !get_index(env, argv[3], &src_index) ||
      !get_index(env, argv[4], &count) || !get_words(env, argv[5], &summary, &summary_len) ||
      !get_index(env, argv[6], &summary_index))
    return NULL;
  if ((uint64_t)dst_index + (uint64_t)count > dst_len || (uint64_t)src_index + (uint64_t)count > src_len ||
      (uint64_t)summary_index + ((uint64_t)count + 31) / 32 > summary_len) {
    napi_throw_range_error(env, "ERR_INVALID_ARGUMENT", "bitmapOrWords: range past the end of an array");
    return NULL;
  }
  /* The three ranges must not overlap (the loop is compiled with `restrict`); the bitmap's
     levels are disjoint, and a merge of a bitmap into itself changes nothing. */
  if (dst == src) {
    napi_value zero;
    if (napi_create_double(env, 0, &zero) != napi_ok) return NULL;
    return zero;
  }
  if (summary == dst && summary_index < dst_index + count && dst_index < summary_index + (count + 31) / 32) {
    napi_throw_range_error(env, "ERR_INVALID_ARGUMENT", "bitmapOrWords: summary overlaps the target words");
    return NULL;
  }
  uint64_t added = or_words(dst + dst_index, src + src_index, (size_t)count, summary + summary_index);
  if (napi_create_double(env, (double)added, &out) != napi_ok) return NULL;
  return out;
}
