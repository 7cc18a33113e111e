import { ShearError, assertRange, isPowerOfTwo } from '@shear/base';
import type { BlockIO, BlockStatusExtent, WriteOptions, WriteZeroesOptions } from '../io.js';

export const DEFAULT_MEMORY_CHUNK_BYTES = 64 * 1024;
/** blockStatus visits at most this many stored chunks per call; callers loop for the rest. */
const BLOCK_STATUS_MAX_CHUNKS = 65536;

/** A chunk that was zeroed without unmapping: reads zero, reported as allocated data. */
const ZEROED = 'zeroed' as const;
type Chunk = Uint8Array | typeof ZEROED;

export interface MemoryDriverOptions {
  length: number;
  /** Unit of storage (a power of two); default DEFAULT_MEMORY_CHUNK_BYTES. */
  chunkBytes?: number;
}

/**
 * A block node held in memory, sparse: only written chunks take memory, so a 1 TiB node costs
 * nothing until written. Never-written and unmapped chunks read as zeroes and report
 * {data: false, zero: true}; written chunks {data: true, zero: false}; chunks zeroed without
 * mayUnmap {data: true, zero: true}. Everything is allocated (no backing). discard drops whole
 * chunks and zeroes partial ones, so discarded ranges read as zeroes.
 */
export class MemoryDriver implements BlockIO {
  readonly length: number;
  readonly chunkBytes: number;
  readonly #chunks = new Map<number, Chunk>();
  /** Stored chunk indexes in order, rebuilt when a chunk is added or dropped. */
  #sortedKeys: number[] | undefined;
  #closed = false;

  constructor(opts: MemoryDriverOptions) {
    assertRange(0, opts.length, Number.MAX_SAFE_INTEGER, 'memory device length');
    this.length = opts.length;
    this.chunkBytes = opts.chunkBytes ?? DEFAULT_MEMORY_CHUNK_BYTES;
    if (!isPowerOfTwo(this.chunkBytes)) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot use chunk size ${this.chunkBytes}: must be a power of two`);
    }
  }

  /** Bytes of chunk data held (for tests and accounting). */
  get storedBytes(): number {
    let total = 0;
    for (const chunk of this.#chunks.values()) if (chunk !== ZEROED) total += chunk.length;
    return total;
  }

  async read(offset: number, buf: Uint8Array): Promise<void> {
    this.#check('read', offset, buf.length);
    this.#forEachPiece(offset, buf.length, (index, from, to, at) => {
      const chunk = this.#chunks.get(index);
      const target = buf.subarray(at, at + (to - from));
      if (chunk === undefined || chunk === ZEROED) target.fill(0);
      else target.set(chunk.subarray(from, to));
    });
  }

  async write(offset: number, buf: Uint8Array, _opts?: WriteOptions): Promise<void> {
    this.#check('write', offset, buf.length);
    this.#forEachPiece(offset, buf.length, (index, from, to, at) => {
      this.#dataChunk(index).set(buf.subarray(at, at + (to - from)), from);
    });
  }

  async writeZeroes(offset: number, bytes: number, opts: WriteZeroesOptions = {}): Promise<void> {
    this.#check('write zeroes to', offset, bytes);
    this.#zero(offset, bytes, opts.mayUnmap ? 'unmap' : 'keep');
  }

  async discard(offset: number, bytes: number): Promise<void> {
    this.#check('discard', offset, bytes);
    this.#zero(offset, bytes, 'unmap');
  }

  async flush(): Promise<void> {
    this.#check('flush', 0, 0);
  }

  async blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    this.#check('query block status of', offset, bytes);
    const extents: BlockStatusExtent[] = [];
    const end = offset + bytes;
    const c = this.chunkBytes;
    let visited = 0;
    for (let pos = offset; pos < end && visited < BLOCK_STATUS_MAX_CHUNKS; ) {
      const index = Math.floor(pos / c);
      const chunk = this.#chunks.get(index);
      let stop: number;
      let data: boolean;
      let zero: boolean;
      if (chunk === undefined) {
        // Jump to the next stored chunk in one step, however far.
        const next = this.#nextStoredIndex(index + 1);
        stop = next === undefined ? end : Math.min(end, next * c);
        data = false;
        zero = true;
      } else {
        stop = Math.min(end, (index + 1) * c);
        data = true;
        zero = chunk === ZEROED;
        visited++;
      }
      const last = extents[extents.length - 1];
      if (last && last.data === data && last.zero === zero) last.bytes += stop - pos;
      else extents.push({ offset: pos, bytes: stop - pos, data, zero, allocated: true });
      pos = stop;
    }
    return extents;
  }

  async close(): Promise<void> {
    this.#closed = true;
    this.#chunks.clear();
    this.#sortedKeys = undefined;
  }

  #check(action: string, offset: number, bytes: number): void {
    if (this.#closed) throw new ShearError('ERR_CLOSED', `Cannot ${action} the memory device: it is closed`);
    assertRange(offset, bytes, this.length, 'range of the memory device');
  }

  /** Calls fn for each chunk the range touches: chunk index, [from, to) inside it, position in the range. */
  #forEachPiece(offset: number, bytes: number, fn: (index: number, from: number, to: number, at: number) => void): void {
    const c = this.chunkBytes;
    for (let pos = offset, end = offset + bytes; pos < end; ) {
      const index = Math.floor(pos / c);
      const from = pos - index * c;
      const to = Math.min(c, end - index * c);
      fn(index, from, to, pos - offset);
      pos = index * c + to;
    }
  }

  #chunkLength(index: number): number {
    return Math.min(this.chunkBytes, this.length - index * this.chunkBytes);
  }

  #dataChunk(index: number): Uint8Array {
    const chunk = this.#chunks.get(index);
    if (chunk instanceof Uint8Array) return chunk;
    const fresh = new Uint8Array(this.#chunkLength(index));
    if (chunk === undefined) this.#sortedKeys = undefined;
    this.#chunks.set(index, fresh);
    return fresh;
  }

  #zero(offset: number, bytes: number, how: 'unmap' | 'keep'): void {
    this.#forEachPiece(offset, bytes, (index, from, to) => {
      const chunk = this.#chunks.get(index);
      if (from === 0 && to === this.#chunkLength(index)) {
        if (how === 'unmap') {
          if (this.#chunks.delete(index)) this.#sortedKeys = undefined;
        } else {
          if (chunk === undefined) this.#sortedKeys = undefined;
          this.#chunks.set(index, ZEROED);
        }
      } else if (chunk instanceof Uint8Array) {
        chunk.fill(0, from, to);
      }
      // A partial piece of an absent or zeroed chunk already reads as zeroes.
    });
  }

  #nextStoredIndex(from: number): number | undefined {
    this.#sortedKeys ??= [...this.#chunks.keys()].sort((a, b) => a - b);
    const keys = this.#sortedKeys;
    let lo = 0;
    let hi = keys.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((keys[mid] as number) < from) lo = mid + 1;
      else hi = mid;
    }
    return keys[lo];
  }
}
