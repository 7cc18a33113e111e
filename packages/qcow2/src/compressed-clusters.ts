import { ShearError, assertRange } from '@shear/base';
import type { Allocator } from './allocator.js';
import { deflateCluster, inflateCluster } from './compressed.js';
import { encodeCompressed, type ClusterEntry } from './entries.js';
import { readPadded } from './file-util.js';
import type { GrowableIO } from './growable-io.js';
import { COMPRESSION_ZLIB } from './header.js';
import type { ImageGuard } from './image-guard.js';
import type { RangeLock } from './locks.js';
import type { Qcow2Metadata } from './metadata.js';

/** Inflated clusters kept, so that reads of parts of one compressed cluster inflate it once. */
const CACHE_ENTRIES = 8;

/**
 * The compressed clusters of an image: reading them (inflated, with a small cache) and writing
 * them, compressed here or deflated by the caller in a worker thread. Only zlib is supported.
 */
export class CompressedClusters {
  readonly #file: GrowableIO;
  readonly #md: Qcow2Metadata;
  readonly #guard: ImageGuard;
  readonly #locks: RangeLock;
  readonly #enterChange: () => Promise<() => void>;
  /** Writes data that does not compress, as a normal cluster. */
  readonly #writePlain: (offset: number, data: Uint8Array) => Promise<void>;
  readonly #C: number;
  readonly #length: number;
  readonly #zlib: boolean;
  readonly #cache = new Map<string, Uint8Array>();

  constructor(args: {
    file: GrowableIO;
    md: Qcow2Metadata;
    guard: ImageGuard;
    locks: RangeLock;
    enterChange: () => Promise<() => void>;
    writePlain: (offset: number, data: Uint8Array) => Promise<void>;
    diskBytes: number;
    compressionType: number;
  }) {
    this.#file = args.file;
    this.#md = args.md;
    this.#guard = args.guard;
    this.#locks = args.locks;
    this.#enterChange = args.enterChange;
    this.#writePlain = args.writePlain;
    this.#C = args.md.clusterBytes;
    this.#length = args.diskBytes;
    this.#zlib = args.compressionType === COMPRESSION_ZLIB;
  }

  /** The inflated content of the compressed cluster `e` (shared with the cache: do not change it). */
  async read(e: ClusterEntry): Promise<Uint8Array> {
    if (!this.#zlib) {
      throw new ShearError('ERR_NOT_IMPLEMENTED', 'Cannot read qcow2 compressed cluster: zstd compression is not supported');
    }
    const key = `${e.hi}:${e.lo}`;
    const hit = this.#cache.get(key);
    if (hit) return hit;
    const raw = new Uint8Array(e.compressedBytes);
    await readPadded(this.#file, e.hostOffset, raw);
    const out = inflateCluster(raw, this.#C, e.hostOffset);
    this.#cache.set(key, out);
    if (this.#cache.size > CACHE_ENTRIES) {
      this.#cache.delete(this.#cache.keys().next().value!);
    }
    return out;
  }

  /** Drops the cache: host space it was read from may have been freed and reused. */
  forget(): void {
    this.#cache.clear();
  }

  /** See Qcow2Image.writeCompressed. */
  async write(offset: number, data: Uint8Array): Promise<void> {
    const { alloc } = this.#guard.checkWritable('write compressed data to');
    const C = this.#C;
    assertRange(offset, data.length, this.#length, 'compressed write');
    if (offset % C !== 0 || (data.length !== C && offset + data.length !== this.#length) || data.length === 0) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot write compressed data at (${offset}, ${data.length}): it must be one whole cluster of ${C} bytes`, {
        offset,
        bytes: data.length,
      });
    }
    this.#checkZlib();
    let padded = data;
    if (data.length < C) {
      padded = new Uint8Array(C);
      padded.set(data);
    }
    const packed = deflateCluster(padded);
    if (!packed) return this.#writePlain(offset, data);
    return this.#store(offset, packed, alloc);
  }

  /** See Qcow2Image.writeDeflated. */
  async writeDeflated(offset: number, packed: Uint8Array): Promise<void> {
    const { alloc } = this.#guard.checkWritable('write compressed data to');
    const C = this.#C;
    assertRange(offset, 1, this.#length, 'compressed write');
    if (offset % C !== 0 || packed.length === 0 || packed.length >= C) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot store deflated cluster at ${offset}: it must start a cluster and be smaller than ${C} bytes (got ${packed.length})`, { offset, bytes: packed.length });
    }
    this.#checkZlib();
    return this.#store(offset, packed, alloc);
  }

  #checkZlib(): void {
    if (!this.#zlib) throw new ShearError('ERR_NOT_IMPLEMENTED', 'Cannot write compressed data to qcow2 image: zstd compression is not supported');
  }

  async #store(offset: number, packed: Uint8Array, alloc: Allocator): Promise<void> {
    const g = offset / this.#C;
    const leave = await this.#enterChange();
    const release = await this.#locks.acquire(g, g + 1, true).catch((err: unknown) => {
      leave();
      throw err;
    });
    try {
      const host = await this.#md.mutex.run(() => alloc.allocateCompressed(packed.length));
      try {
        await this.#file.write(host, packed);
      } catch (err) {
        await this.#md.mutex.run(() => alloc.releaseCompressedNow(host, packed.length));
        throw err;
      }
      await this.#md.mutex.run(async () => {
        const [old] = await this.#md.lookupRange(g, 1);
        await this.#md.setEntries([{ g, raw: encodeCompressed(host, packed.length, this.#md.clusterBits) }]);
        this.#md.dropOld(old!);
      });
    } finally {
      release();
      leave();
    }
  }
}
