import { ShearError, assertRange } from '@shear/base';
import { threadId } from 'node:worker_threads';
import { getBitmapKernels } from '@shear/native';
import { COUNT_SHARDS, COUNT_SHARD_FIRST, COUNT_SHARD_STRIDE, HEADER_INT32S, SHARED_FLAG, type Layout, computeLayout, readLayout, writeHeader } from './layout.js';
import { lowestSetBit, maskBetween, popcount32 } from './word-bits.js';

const mergeScratch = { added: 0 };
/** Where a one-word bitmap's merge marks a summary it does not have. */
const SCRATCH_SUMMARY = new Int32Array(1);

/**
 * ORs the source words of summary group `group` (those whose bits are set in `present`) into
 * `words`; returns which of them turned non-zero and leaves the number of new bits in
 * mergeScratch.added. A free function with plain arguments keeps this hot loop monomorphic.
 */
function orGroup(words: Int32Array, base: number, srcWords: Int32Array, srcBase: number, group: number, present: number): number {
  let turnedNonZero = 0;
  let added = 0;
  // A plain scan between the lowest and highest non-zero word keeps dense groups tight.
  const hi = 31 - Math.clz32(present);
  for (let b = lowestSetBit(present); b <= hi; b++) {
    const w = group * 32 + b;
    const s = srcWords[srcBase + w]!;
    // Skipping words that already hold the source bits makes merging into a superset
    // (QEMU's "two full bitmaps" case in seed 003) cost no atomic operation at all.
    if (s === 0 || (words[base + w]! & s) === s) continue;
    const old = Atomics.or(words, base + w, s);
    added += popcount32(s & ~old);
    if (old === 0) turnedNonZero |= 1 << b;
  }
  mergeScratch.added = added;
  return turnedNonZero;
}

/** What crosses a thread boundary: the buffer alone describes the bitmap. */
export interface BitmapHandle {
  readonly buffer: SharedArrayBuffer;
}

export interface DirtyArea {
  offset: number;
  bytes: number;
}

/**
 * A fixed-size bitmap over a byte range, one bit per granule, stored in a SharedArrayBuffer
 * so that the coordinator and worker threads work on the same words.
 *
 * Concurrency contract:
 * - `set`, `reset`, `merge` and `clear` may run in any number of threads at once; every bit
 *   change is an Atomics read-modify-write, so no update is lost, and the count of set bits
 *   is exact (each thread adds the number of bits it actually flipped).
 * - Summary levels obey "a word is non-zero => its summary bit is set" whenever no operation is
 *   in flight. A thread that empties a word clears the summary bit and then re-reads the word,
 *   restoring the bit if a concurrent set got in between; a thread that makes a word non-zero
 *   sets the summary bit after the word. Searches that race with changes may miss bits set
 *   meanwhile, never report a bit that was clear before and after the search.
 * - `copy`, `serialize` and the iterators read without locking: run them on a quiescent bitmap
 *   (or accept a snapshot that mixes before and after).
 * - A bitmap whose `handle` was never taken can only be reached from the thread that made it;
 *   `merge` and `clear` then use plain loads and stores (word-wide, summaries kept in the same
 *   pass), which is several times faster than an atomic per word. Taking the handle marks the
 *   bitmap shared in its header, for good, and every thread then takes the atomic paths.
 *
 * Byte API: bit i covers bytes [i*granularity, (i+1)*granularity). `set` marks every granule
 * the range touches; `reset` requires whole granules (an unaligned reset would forget bytes it
 * does not cover), except that a range may end at `size`.
 */
export class SharedBitmap {
  readonly size: number;
  readonly granularity: number;
  readonly bits: number;
  readonly #buffer: SharedArrayBuffer;
  readonly #words: Int32Array;
  readonly #count: BigInt64Array;
  /** This thread's count shard (BigInt64 index). */
  readonly #shard: number;
  readonly #log2: number;
  readonly #levelStart: number[];
  readonly #levelWords: number[];
  readonly #top: number;

  private constructor(buffer: SharedArrayBuffer, layout: Layout) {
    this.#buffer = buffer;
    this.#words = new Int32Array(buffer);
    this.#count = new BigInt64Array(buffer, 0, HEADER_INT32S / 2);
    this.#shard = COUNT_SHARD_FIRST + (threadId % COUNT_SHARDS) * COUNT_SHARD_STRIDE;
    this.size = layout.size;
    this.granularity = layout.granularity;
    this.bits = layout.bits;
    this.#log2 = layout.granularityLog2;
    this.#levelStart = layout.levelStart;
    this.#levelWords = layout.levelWords;
    this.#top = layout.levelStart.length - 1;
  }

  /** @throws ERR_BITMAP_GRANULARITY, ERR_INVALID_ARGUMENT */
  static create(size: number, granularity: number): SharedBitmap {
    const layout = computeLayout(size, granularity);
    const buffer = new SharedArrayBuffer(layout.totalInt32s * 4);
    writeHeader(new Int32Array(buffer), layout);
    return new SharedBitmap(buffer, layout);
  }

  /**
   * A new bitmap holding the given leaf words (bit i = bit i%32 of word i/32), with summaries
   * and count rebuilt. The caller has checked that no bit past the end is set.
   */
  static fromLeafWords(size: number, granularity: number, leaf: Int32Array): SharedBitmap {
    const bitmap = SharedBitmap.create(size, granularity);
    if (leaf.length !== bitmap.#levelWords[0]) {
      throw new ShearError('ERR_BITMAP_SIZE_MISMATCH', `Cannot load bitmap: ${leaf.length} words for ${bitmap.bits} bits`);
    }
    const words = bitmap.#words;
    const start = bitmap.#levelStart[0]!;
    words.set(leaf, start);
    // Count what was copied, not the source, which another thread may be changing.
    let count = 0;
    for (let i = 0; i < leaf.length; i++) count += popcount32(words[start + i]!);
    // Not shared with anyone yet: plain writes are enough to build the summaries.
    for (let level = 1; level <= bitmap.#top; level++) {
      const below = bitmap.#levelStart[level - 1]!;
      const at = bitmap.#levelStart[level]!;
      for (let w = 0; w < bitmap.#levelWords[level - 1]!; w++) {
        if (words[below + w] !== 0) words[at + (w >>> 5)]! |= 1 << (w & 31);
      }
    }
    bitmap.#count[bitmap.#shard] = BigInt(count);
    return bitmap;
  }

  /** Re-attaches a bitmap posted from another thread; the words are shared, not copied. */
  static attach(handle: BitmapHandle): SharedBitmap {
    return new SharedBitmap(handle.buffer, readLayout(handle.buffer));
  }

  /** The buffer to post to another thread; marks the bitmap shared (see the class comment). */
  get handle(): BitmapHandle {
    if (Atomics.load(this.#words, SHARED_FLAG) === 0) Atomics.store(this.#words, SHARED_FLAG, 1);
    return { buffer: this.#buffer };
  }

  /** Whether another thread may hold this bitmap's buffer. */
  get shared(): boolean {
    return Atomics.load(this.#words, SHARED_FLAG) !== 0;
  }

  /** Bytes of memory the bitmap occupies. */
  get memoryBytes(): number {
    return this.#buffer.byteLength;
  }

  /** Number of set bits; exact, O(1) (a sum of 32 shards). */
  countBits(): number {
    let sum = 0n;
    for (let i = 0; i < COUNT_SHARDS; i++) sum += Atomics.load(this.#count, COUNT_SHARD_FIRST + i * COUNT_SHARD_STRIDE);
    return Number(sum);
  }

  /** Dirty bytes as QEMU counts them: set bits times granularity (the last granule counts whole). */
  countBytes(): number {
    return this.countBits() * this.granularity;
  }

  isEmpty(): boolean {
    return this.countBits() === 0;
  }

  get(offset: number): boolean {
    assertRange(offset, 1, this.size, 'bitmap offset');
    const bit = Math.floor(offset / this.granularity);
    const word = this.#words[this.#levelStart[0]! + Math.floor(bit / 32)]!;
    return ((word >>> (bit % 32)) & 1) === 1;
  }

  /** Marks every granule that (offset, bytes) touches. */
  set(offset: number, bytes: number): void {
    assertRange(offset, bytes, this.size, 'bitmap range');
    if (bytes === 0) return;
    this.#setBits(Math.floor(offset / this.granularity), Math.floor((offset + bytes - 1) / this.granularity));
  }

  /**
   * Clears the granules of (offset, bytes), which must cover whole granules.
   * @throws ERR_INVALID_ARGUMENT for a range that splits a granule
   */
  reset(offset: number, bytes: number): void {
    assertRange(offset, bytes, this.size, 'bitmap range');
    if (bytes === 0) return;
    const end = offset + bytes;
    if (offset % this.granularity !== 0 || (end % this.granularity !== 0 && end !== this.size)) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot reset bitmap range (${offset}, ${bytes}): it must cover whole granules of ${this.granularity} bytes`, { offset, bytes });
    }
    this.#resetBits(offset / this.granularity, Math.ceil(end / this.granularity) - 1);
  }

  /** Clears every bit; O(dirty words), or one memset per level on an unshared bitmap with many. */
  clear(): void {
    // The summary walk costs an atomic per non-zero word; past about one word in 16 a plain fill
    // of every level is cheaper, and only allowed while no other thread can be setting bits.
    if (!this.shared && this.countBits() * 16 > this.#levelWords[0]!) {
      const end = this.#levelStart[this.#top]! + 1;
      this.#words.fill(0, this.#levelStart[0]!, end);
      for (let i = 0; i < COUNT_SHARDS; i++) this.#count[COUNT_SHARD_FIRST + i * COUNT_SHARD_STRIDE] = 0n;
      return;
    }
    this.#resetBits(0, this.bits - 1);
  }

  /**
   * First dirty byte in [offset, offset + bytes), or -1. Returns `offset` itself when the
   * granule containing it is dirty.
   */
  nextDirty(offset: number, bytes = this.size - offset): number {
    assertRange(offset, bytes, this.size, 'bitmap range');
    if (bytes === 0) return -1;
    const bit = this.#findSet(0, Math.floor(offset / this.granularity));
    if (bit < 0) return -1;
    const found = Math.max(offset, bit * this.granularity);
    return found < offset + bytes ? found : -1;
  }

  /** First clean byte in [offset, offset + bytes), or -1. */
  nextClear(offset: number, bytes = this.size - offset): number {
    assertRange(offset, bytes, this.size, 'bitmap range');
    if (bytes === 0) return -1;
    const lastBit = Math.floor((offset + bytes - 1) / this.granularity);
    const bit = this.#findClear(Math.floor(offset / this.granularity), lastBit);
    if (bit < 0) return -1;
    return Math.max(offset, bit * this.granularity);
  }

  /**
   * The first dirty run starting in [offset, end), at most `maxBytes` long and clipped to `end`,
   * or null when [offset, end) is clean.
   */
  nextDirtyArea(offset: number, end: number, maxBytes = Number.MAX_SAFE_INTEGER): DirtyArea | null {
    assertRange(offset, end - offset, this.size, 'bitmap range');
    if (!(maxBytes > 0)) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot search bitmap: maxBytes ${maxBytes} must be positive`);
    const start = this.nextDirty(offset, end - offset);
    if (start < 0) return null;
    const limit = Math.min(end, start + maxBytes);
    const clean = this.nextClear(start, limit - start);
    return { offset: start, bytes: (clean < 0 ? limit : clean) - start };
  }

  /** Dirty runs inside (offset, bytes), in order, each clipped to the range. */
  *dirtyExtents(offset = 0, bytes = this.size - offset): Generator<DirtyArea> {
    const end = offset + bytes;
    let at = offset;
    while (at < end) {
      const area = this.nextDirtyArea(at, end);
      if (!area) return;
      yield area;
      at = area.offset + area.bytes;
    }
  }

  /**
   * ORs `src` into this bitmap. Both must cover the same number of bytes; granularities may
   * differ (a coarser target marks every granule a dirty source byte touches).
   * @throws ERR_BITMAP_SIZE_MISMATCH
   */
  merge(src: SharedBitmap): void {
    if (src.size !== this.size) {
      throw new ShearError('ERR_BITMAP_SIZE_MISMATCH', `Cannot merge bitmaps: sizes differ (${src.size} into ${this.size})`);
    }
    if (src.granularity !== this.granularity) {
      for (const area of src.dirtyExtents()) this.set(area.offset, area.bytes);
      return;
    }
    if (src.#buffer === this.#buffer) return;
    if (!this.shared) {
      this.#mergeExclusive(src);
      return;
    }
    const words = this.#words;
    const srcWords = src.#words;
    const base = this.#levelStart[0]!;
    const srcBase = src.#levelStart[0]!;
    let added = 0;
    if (src.#top === 0) {
      const s = srcWords[srcBase]!;
      if (s !== 0 && (words[base]! & s) !== s) added += popcount32(s & ~Atomics.or(words, base, s));
    } else {
      // Walk the source's first summary level: one read covers 32 leaf words, and the words
      // that turn non-zero are announced to the summary with one atomic per group of 32.
      const l1 = src.#levelStart[1]!;
      const l1Words = src.#levelWords[1]!;
      for (let j = 0; j < l1Words; j++) {
        const v = srcWords[l1 + j]!;
        if (v === 0) continue;
        const turnedNonZero = orGroup(words, base, srcWords, srcBase, j, v);
        added += mergeScratch.added;
        if (turnedNonZero !== 0) this.#markGroupNonZero(1, j, turnedNonZero);
      }
    }
    if (added) Atomics.add(this.#count, this.#shard, BigInt(added));
  }

  /**
   * merge() into a bitmap no other thread can change: one word-wide pass over the leaves that
   * ORs, counts the new bits and marks the words that turned non-zero in level 1, then the
   * levels above rebuilt from level 1 (1/1024 of the leaves). The source is read once, word by
   * word, as the atomic path reads it: a source changed meanwhile gives a mix of before and after.
   */
  #mergeExclusive(src: SharedBitmap): void {
    if (src.isEmpty()) return;
    const kernels = getBitmapKernels();
    const words = this.#words;
    const leafWords = this.#levelWords[0]!;
    if (this.#top === 0) {
      // A single word has no summary above it: give the kernel a scratch word to mark.
      const added = kernels.orWords(words, this.#levelStart[0]!, src.#words, src.#levelStart[0]!, leafWords, SCRATCH_SUMMARY, 0);
      if (added) this.#count[this.#shard] = this.#count[this.#shard]! + BigInt(added);
      return;
    }
    const added = kernels.orWords(words, this.#levelStart[0]!, src.#words, src.#levelStart[0]!, leafWords, words, this.#levelStart[1]!);
    if (added === 0) return;
    this.#count[this.#shard] = this.#count[this.#shard]! + BigInt(added);
    for (let level = 2; level <= this.#top; level++) {
      const below = this.#levelStart[level - 1]!;
      const at = this.#levelStart[level]!;
      const n = this.#levelWords[level - 1]!;
      for (let w = 0; w < n; w++) {
        if (words[below + w] !== 0) words[at + (w >>> 5)]! |= 1 << (w & 31);
      }
    }
  }

  /** A new bitmap with the same geometry and bits (not shared with this one). */
  copy(): SharedBitmap {
    return SharedBitmap.fromLeafWords(this.size, this.granularity, this.leafWords());
  }

  /** Replaces this bitmap's bits with those of `src` (same size and granularity). */
  copyFrom(src: SharedBitmap): void {
    if (src.size !== this.size || src.granularity !== this.granularity) {
      throw new ShearError('ERR_BITMAP_SIZE_MISMATCH', `Cannot copy bitmap: geometry differs (${src.size}/${src.granularity} into ${this.size}/${this.granularity})`);
    }
    this.clear();
    this.merge(src);
  }

  /** The leaf words, read-only by convention; for serialisation and tests. */
  leafWords(): Int32Array {
    return this.#words.subarray(this.#levelStart[0]!, this.#levelStart[0]! + this.#levelWords[0]!);
  }

  /**
   * Checks the summary invariant on a quiescent bitmap: every summary bit is set exactly when
   * its word is non-zero, and the count matches the bits. For tests.
   */
  checkInvariants(): string | null {
    let count = 0;
    const leaf = this.leafWords();
    for (let i = 0; i < leaf.length; i++) count += popcount32(leaf[i]!);
    if (count !== this.countBits()) return `count ${this.countBits()} but ${count} bits set`;
    const tail = this.bits % 32;
    if (tail !== 0 && (leaf[leaf.length - 1]! & (-1 << tail)) !== 0) return 'bits set past the end';
    for (let level = 1; level <= this.#top; level++) {
      for (let w = 0; w < this.#levelWords[level - 1]!; w++) {
        const nonZero = this.#words[this.#levelStart[level - 1]! + w] !== 0;
        const summary = ((this.#words[this.#levelStart[level]! + Math.floor(w / 32)]! >>> (w % 32)) & 1) === 1;
        if (nonZero !== summary) return `level ${level} bit ${w} is ${summary} but the word is ${nonZero ? 'non-zero' : 'zero'}`;
      }
    }
    return null;
  }

  // ---- bit-level machinery; bit indices may exceed 2^31, so no >> on them ----

  #setBits(first: number, last: number): void {
    const words = this.#words;
    const base = this.#levelStart[0]!;
    const fw = Math.floor(first / 32);
    const lw = Math.floor(last / 32);
    let added = 0;
    // Leaf words that turn non-zero, batched per summary word (32 leaf words).
    let group = fw >>> 5;
    let turnedNonZero = 0;
    for (let w = fw; w <= lw; w++) {
      const mask = maskBetween(w === fw ? first % 32 : 0, w === lw ? last % 32 : 31);
      if ((words[base + w]! & mask) === mask) continue;
      const old = Atomics.or(words, base + w, mask);
      added += popcount32(mask & ~old);
      if (old === 0) {
        if (w >>> 5 !== group) {
          if (turnedNonZero !== 0) this.#markGroupNonZero(1, group, turnedNonZero);
          group = w >>> 5;
          turnedNonZero = 0;
        }
        turnedNonZero |= 1 << (w & 31);
      }
    }
    if (turnedNonZero !== 0) this.#markGroupNonZero(1, group, turnedNonZero);
    if (added) Atomics.add(this.#count, this.#shard, BigInt(added));
  }

  #resetBits(first: number, last: number): void {
    const words = this.#words;
    const base = this.#levelStart[0]!;
    const fw = Math.floor(first / 32);
    const lw = Math.floor(last / 32);
    let removed = 0;
    // Visit only non-zero words, found through the summary, so clearing a sparse bitmap is cheap.
    for (let w = this.#nextNonZeroWord(fw); w >= 0 && w <= lw; w = this.#nextNonZeroWord(w + 1)) {
      const mask = maskBetween(w === fw ? first % 32 : 0, w === lw ? last % 32 : 31);
      if ((words[base + w]! & mask) === 0) continue;
      const old = Atomics.and(words, base + w, ~mask);
      removed += popcount32(old & mask);
      if (old !== 0 && (old & ~mask) === 0) this.#markZero(1, w);
    }
    if (removed) Atomics.sub(this.#count, this.#shard, BigInt(removed));
  }

  /** Index of the first non-zero leaf word at or after `from`, or -1. */
  #nextNonZeroWord(from: number): number {
    // A one-word bitmap has no summary level to search.
    if (this.#top === 0) return from === 0 && this.#words[this.#levelStart[0]!] !== 0 ? 0 : -1;
    return this.#findSet(1, from);
  }

  /**
   * The words of level-1 named by `mask` within group `group` (words group*32 ..) became
   * non-zero: set their bits in word `group` of `level`, and continue upwards if that word was zero.
   */
  #markGroupNonZero(level: number, group: number, mask: number): void {
    if (level > this.#top) return;
    const old = Atomics.or(this.#words, this.#levelStart[level]! + group, mask);
    if (old === 0) this.#markNonZero(level + 1, group);
  }

  /** Word `child` of level-1 became non-zero: set its bit in `level`, and upwards while words turn non-zero. */
  #markNonZero(level: number, child: number): void {
    const words = this.#words;
    while (level <= this.#top) {
      const bit = 1 << (child & 31);
      const at = this.#levelStart[level]! + (child >>> 5);
      const old = Atomics.or(words, at, bit);
      if (old !== 0) return;
      child >>>= 5;
      level++;
    }
  }

  /**
   * Word `child` of level-1 became zero: clear its summary bit, then re-read the word; if a
   * concurrent set refilled it, restore the bit (and the levels above) instead.
   */
  #markZero(level: number, child: number): void {
    const words = this.#words;
    while (level <= this.#top) {
      const bit = 1 << (child & 31);
      const at = this.#levelStart[level]! + (child >>> 5);
      const old = Atomics.and(words, at, ~bit);
      if (Atomics.load(words, this.#levelStart[level - 1]! + child) !== 0) {
        this.#markNonZero(level, child);
        return;
      }
      if ((old & bit) === 0 || (old & ~bit) !== 0) return;
      child >>>= 5;
      level++;
    }
  }

  /** First set bit at `level` with index >= from, or -1. Uses the levels above to skip zero words. */
  #findSet(level: number, from: number): number {
    const words = this.#words;
    const start = this.#levelStart[level]!;
    const nWords = this.#levelWords[level]!;
    let w = Math.floor(from / 32);
    if (w >= nWords) return -1;
    let v = words[start + w]! & (-1 << (from % 32));
    if (v !== 0) return w * 32 + lowestSetBit(v);
    if (level === this.#top) return -1;
    for (;;) {
      w = this.#findSet(level + 1, w + 1);
      if (w < 0) return -1;
      v = words[start + w]!;
      // A zero word under a set summary bit is a concurrent clear in progress: keep looking.
      if (v !== 0) return w * 32 + lowestSetBit(v);
    }
  }

  /** First clear bit in [from, last] at the leaf level, or -1. A linear scan: summaries track only non-zero words. */
  #findClear(from: number, last: number): number {
    const words = this.#words;
    const base = this.#levelStart[0]!;
    const lw = Math.floor(last / 32);
    let w = Math.floor(from / 32);
    let v = ~words[base + w]! & (-1 << (from % 32));
    while (v === 0) {
      if (++w > lw) return -1;
      v = ~words[base + w]!;
    }
    const bit = w * 32 + lowestSetBit(v);
    return bit <= last ? bit : -1;
  }
}
