import { ShearError, isPowerOfTwo, log2Exact } from '@shear/base';

/**
 * Where everything lives inside one SharedArrayBuffer, so a bitmap is fully described by its
 * buffer and can be re-attached in any thread without copying.
 *
 * ```
 * Int32 index  0: magic   1: layout version   2: log2(granularity)   3: number of levels
 *              4,5: size in bytes (lo, hi)    6,7: bits (lo, hi)    8: shared flag   9..15: reserved
 *  bytes 64..2111: 32 count shards, one BigInt64 per 64-byte cache line
 *  then: level 0 (the bits), then level 1, 2, ... (summaries), each padded to 8 bytes
 * ```
 * The count of set bits is the sum of the shards. Each thread adds the bits it flips to its own
 * shard (by threadId), so threads setting bits at once do not fight over one cache line.
 * Level k+1 holds one bit per word of level k: set when that word is non-zero. The top level is
 * a single word. Memory is one bit per granule plus about 1/31 of that for the summaries.
 */
export const LAYOUT_MAGIC = 0x53484231; // "SHB1"
export const LAYOUT_VERSION = 2;
export const COUNT_SHARDS = 32;
/** BigInt64 index of shard 0; shards are 8 BigInt64s (64 bytes) apart. */
export const COUNT_SHARD_FIRST = 8;
export const COUNT_SHARD_STRIDE = 8;
export const HEADER_INT32S = 16 + COUNT_SHARDS * 16;
/**
 * Int32 index of the shared flag: 0 while the bitmap has never been handed to another thread
 * (its `handle` never taken), so only its creating thread can change it; 1 for ever after.
 */
export const SHARED_FLAG = 8;

/** The smallest and largest granularity a raw bitmap accepts (named bitmaps are stricter). */
export const MIN_GRANULARITY_BYTES = 1;
export const MAX_GRANULARITY_BYTES = 2 ** 40;

export interface Layout {
  size: number;
  granularity: number;
  granularityLog2: number;
  bits: number;
  /** Int32 index where each level starts, level 0 first. */
  levelStart: number[];
  /** Words in each level. */
  levelWords: number[];
  totalInt32s: number;
}

export function computeLayout(size: number, granularity: number): Layout {
  if (!isPowerOfTwo(granularity) || granularity < MIN_GRANULARITY_BYTES || granularity > MAX_GRANULARITY_BYTES) {
    throw new ShearError('ERR_BITMAP_GRANULARITY', `Cannot create bitmap: granularity ${granularity} is not a power of two between ${MIN_GRANULARITY_BYTES} and ${MAX_GRANULARITY_BYTES}`);
  }
  if (!Number.isSafeInteger(size) || size <= 0) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot create bitmap: size ${size} must be a positive integer`);
  }
  const bits = Math.ceil(size / granularity);
  const levelStart: number[] = [];
  const levelWords: number[] = [];
  let at = HEADER_INT32S;
  let words = Math.ceil(bits / 32);
  for (;;) {
    levelStart.push(at);
    levelWords.push(words);
    at += words + (words & 1); // keep each level 8-byte aligned
    if (words === 1) break;
    words = Math.ceil(words / 32);
  }
  if (at > 2 ** 32) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot create bitmap: ${bits} bits do not fit in one shared buffer`);
  }
  return { size, granularity, granularityLog2: log2Exact(granularity), bits, levelStart, levelWords, totalInt32s: at };
}

export function writeHeader(words: Int32Array, layout: Layout): void {
  words[0] = LAYOUT_MAGIC;
  words[1] = LAYOUT_VERSION;
  words[2] = layout.granularityLog2;
  words[3] = layout.levelStart.length;
  words[4] = layout.size % 2 ** 32;
  words[5] = Math.floor(layout.size / 2 ** 32);
  words[6] = layout.bits % 2 ** 32;
  words[7] = Math.floor(layout.bits / 2 ** 32);
}

export function readLayout(buffer: SharedArrayBuffer): Layout {
  if (buffer.byteLength < HEADER_INT32S * 4) {
    throw new ShearError('ERR_BITMAP_CORRUPT', 'Cannot attach bitmap: buffer is smaller than a bitmap header');
  }
  const words = new Int32Array(buffer, 0, HEADER_INT32S);
  if (words[0] !== LAYOUT_MAGIC || words[1] !== LAYOUT_VERSION) {
    throw new ShearError('ERR_BITMAP_CORRUPT', 'Cannot attach bitmap: buffer does not hold a bitmap of this layout version');
  }
  const size = (words[4]! >>> 0) + (words[5]! >>> 0) * 2 ** 32;
  const layout = computeLayout(size, 2 ** words[2]!);
  if (layout.totalInt32s * 4 !== buffer.byteLength) {
    throw new ShearError('ERR_BITMAP_CORRUPT', 'Cannot attach bitmap: buffer length does not match its header');
  }
  return layout;
}
