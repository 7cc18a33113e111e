import { createRequire } from 'node:module';
import { fallbackForcedByEnv, ADDON_PATH } from './load.js';

/**
 * Word loops for @shear/bitmap's exclusive paths. Not atomic: callers use them only on words
 * that no other thread can write at the same time.
 */
export interface BitmapKernels {
  /** 'addon' or 'js', for benchmarks and tests. */
  readonly kind: 'addon' | 'js';
  /**
   * ORs src[srcIndex .. srcIndex+count) into dst[dstIndex ..); returns the number of bits that
   * were clear in dst and set in src. Each dst word i (counted from dstIndex) that is non-zero
   * afterwards has bit i%32 of summary[summaryIndex + floor(i/32)] set (no bit is cleared): the
   * summary stays true of dst if it was before. The three ranges must not overlap (dst === src
   * is a no-op).
   */
  orWords(dst: Int32Array, dstIndex: number, src: Int32Array, srcIndex: number, count: number, summary: Int32Array, summaryIndex: number): number;
}

type OrWords = BitmapKernels['orWords'];

interface KernelBinding {
  bitmapOrWords: OrWords;
}

/**
 * Bits set in each 16-bit value: V8 has no popcount, and two table loads beat the bit tricks.
 * Built on first use: every worker thread loads this module, and few ever need the JS kernel.
 */
let popcount16: Uint8Array | undefined;
function popcountTable(): Uint8Array {
  if (!popcount16) {
    popcount16 = new Uint8Array(65536);
    for (let i = 1; i < 65536; i++) popcount16[i] = popcount16[i >>> 1]! + (i & 1);
  }
  return popcount16;
}

/**
 * The plain-JS kernel, in two passes over zero-based views: V8 compiles a loop without index
 * offsets and with one store per word several times faster than one that also keeps the
 * summary word (measured on Node 20: 1 ms against 10 ms for 2 MiB of dense words).
 */
const orWordsJs: OrWords = (dst, dstIndex, src, srcIndex, count, summary, summaryIndex) => {
  if (dst === src) return 0;
  const d = dst.subarray(dstIndex, dstIndex + count);
  const added = orCount(d, src.subarray(srcIndex, srcIndex + count));
  markNonZero(d, summary.subarray(summaryIndex, summaryIndex + Math.ceil(count / 32)));
  return added;
};

function orCount(dst: Int32Array, src: Int32Array): number {
  const POPCOUNT16 = popcountTable();
  let added = 0;
  for (let i = 0; i < src.length; i++) {
    const s = src[i]!;
    if (s === 0) continue;
    const d = dst[i]!;
    const fresh = s & ~d;
    if (fresh === 0) continue;
    dst[i] = d | s;
    added += POPCOUNT16[fresh & 0xffff]! + POPCOUNT16[fresh >>> 16]!;
  }
  return added;
}

/** Sets the summary bit of every non-zero word (a merge only ever turns words non-zero). */
function markNonZero(words: Int32Array, summary: Int32Array): void {
  const n = words.length;
  for (let g = 0, j = 0; g < n; g += 32, j++) {
    let m = 0;
    const end = g + 32 < n ? g + 32 : n;
    for (let i = g; i < end; i++) if (words[i] !== 0) m |= 1 << (i - g);
    if (m !== 0) summary[j]! |= m;
  }
}

export const JS_BITMAP_KERNELS: BitmapKernels = { kind: 'js', orWords: orWordsJs };

/** The addon's kernels, or null when it is not built, out of date, or SHEAR_NATIVE=0. */
export function loadAddonBitmapKernels(path = ADDON_PATH): BitmapKernels | null {
  try {
    const binding = createRequire(import.meta.url)(path) as Partial<KernelBinding>;
    const fn = binding.bitmapOrWords;
    if (typeof fn !== 'function') return null;
    return { kind: 'addon', orWords: fn };
  } catch {
    return null;
  }
}

let shared: BitmapKernels | undefined;

/** This thread's kernels: the addon's when it loads (and SHEAR_NATIVE is not 0), else plain JS. */
export function getBitmapKernels(): BitmapKernels {
  shared ??= (fallbackForcedByEnv() ? null : loadAddonBitmapKernels()) ?? JS_BITMAP_KERNELS;
  return shared;
}
