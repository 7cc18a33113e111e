import { ShearError, assertRange } from '@shear/base';
import { filterChildPerms, type BlockIO, type BlockStatusExtent, type ChildEdge, type DriverInfo } from '@shear/block';

export const FLEECING_CACHE_INFO: DriverInfo = { name: 'fleecing-cache', childPerms: filterChildPerms };
export const CACHE_CHUNK_BYTES = 64 * 1024;

export interface FleecingCacheOptions {
  /** Bytes the cache serves (the source's length). */
  length: number;
  /** RAM for preserved data; chunks beyond it spill to `file`. */
  ramBytes: number;
  /** A local spill file (a node as long as the source); none: RAM only. */
  file?: ChildEdge;
  /** The most bytes the spill file may hold; default: as much as the source. */
  fileBytes?: number;
}

export interface FleecingCacheStats {
  ramBytes: number;
  fileBytes: number;
  /** Chunks that went to the spill file because RAM was full. */
  spills: number;
  /** Chunks freed by discard (drained to the backup target). */
  drained: number;
}

/**
 * A copy-before-write target for slow or remote backups (seed 000): preserved clusters land in
 * RAM first and in a local spill file when RAM is full, so a guest write waits for a memory copy
 * (or a local write), never for the slow target. A backup job drains it to the slow target
 * (discard-source frees each chunk as it lands there).
 *
 * Chunks never written read as zeroes (the filter only reads back what it preserved). When RAM
 * and the spill file are both full, writes fail with ERR_NO_SPACE and the filter's on-cbw-error
 * policy decides: the guest write fails, or the snapshot is given up. Never a silent loss.
 */
export class FleecingCache implements BlockIO {
  readonly length: number;
  readonly ramLimit: number;
  readonly fileLimit: number;
  readonly #file: ChildEdge | undefined;
  readonly #ram = new Map<number, Uint8Array>();
  readonly #onFile = new Set<number>();
  #spills = 0;
  #drained = 0;

  constructor(opts: FleecingCacheOptions) {
    assertRange(0, opts.length, Number.MAX_SAFE_INTEGER, 'cache length');
    if (!Number.isSafeInteger(opts.ramBytes) || opts.ramBytes < 0) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open fleecing cache: ram-bytes ${opts.ramBytes} must be a non-negative integer`);
    }
    if (opts.file && opts.file.length < opts.length) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open fleecing cache: the spill file (${opts.file.length} bytes) is smaller than the cache (${opts.length} bytes)`);
    }
    this.length = opts.length;
    this.ramLimit = opts.ramBytes;
    this.#file = opts.file;
    this.fileLimit = opts.file ? (opts.fileBytes ?? opts.length) : 0;
  }

  get stats(): FleecingCacheStats {
    return { ramBytes: this.#ram.size * CACHE_CHUNK_BYTES, fileBytes: this.#onFile.size * CACHE_CHUNK_BYTES, spills: this.#spills, drained: this.#drained };
  }

  /** Held chunks as ranges, RAM first: what a drain should copy before anything else. */
  *heldRanges(): Generator<{ offset: number; bytes: number }> {
    for (const set of [[...this.#ram.keys()], [...this.#onFile]]) {
      for (const c of set.sort((a, b) => a - b)) yield { offset: c * CACHE_CHUNK_BYTES, bytes: Math.min(CACHE_CHUNK_BYTES, this.length - c * CACHE_CHUNK_BYTES) };
    }
  }

  async read(offset: number, buf: Uint8Array): Promise<void> {
    assertRange(offset, buf.length, this.length, 'cache read');
    await this.#pieces(offset, buf.length, async (c, from, to, at) => {
      const target = buf.subarray(at, at + (to - from));
      const held = this.#ram.get(c);
      if (held) target.set(held.subarray(from, to));
      else if (this.#onFile.has(c)) await this.#file!.read(c * CACHE_CHUNK_BYTES + from, target);
      else target.fill(0);
    });
  }

  async write(offset: number, buf: Uint8Array): Promise<void> {
    assertRange(offset, buf.length, this.length, 'cache write');
    await this.#pieces(offset, buf.length, async (c, from, to, at) => {
      const size = Math.min(CACHE_CHUNK_BYTES, this.length - c * CACHE_CHUNK_BYTES);
      let chunk: Uint8Array;
      if (from === 0 && to === size) chunk = Uint8Array.from(buf.subarray(at, at + size));
      else {
        chunk = new Uint8Array(size);
        await this.read(c * CACHE_CHUNK_BYTES, chunk);
        chunk.set(buf.subarray(at, at + (to - from)), from);
      }
      await this.#store(c, chunk);
    });
  }

  async writeZeroes(offset: number, bytes: number): Promise<void> {
    assertRange(offset, bytes, this.length, 'cache write');
    // Preserved zeroes are simply chunks the cache does not hold: they read as zeroes.
    await this.#pieces(offset, bytes, async (c, from, to) => {
      const size = Math.min(CACHE_CHUNK_BYTES, this.length - c * CACHE_CHUNK_BYTES);
      if (from === 0 && to === size) return this.#drop(c, false);
      return this.write(c * CACHE_CHUNK_BYTES + from, new Uint8Array(to - from));
    });
  }

  /** The data reached the backup target (or is not needed): its space is freed. */
  async discard(offset: number, bytes: number): Promise<void> {
    assertRange(offset, bytes, this.length, 'cache discard');
    const first = Math.ceil(offset / CACHE_CHUNK_BYTES);
    const end = offset + bytes >= this.length ? Math.ceil(this.length / CACHE_CHUNK_BYTES) : Math.floor((offset + bytes) / CACHE_CHUNK_BYTES);
    for (let c = first; c < end; c++) await this.#drop(c, true);
  }

  async flush(): Promise<void> {
    await this.#file?.flush();
  }

  async blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    assertRange(offset, bytes, this.length, 'cache block status');
    const out: BlockStatusExtent[] = [];
    await this.#pieces(offset, bytes, async (c, from, to) => {
      const held = this.#ram.has(c) || this.#onFile.has(c);
      const last = out.at(-1);
      const at = c * CACHE_CHUNK_BYTES + from;
      if (last && last.data === held && last.offset + last.bytes === at) last.bytes += to - from;
      else out.push({ offset: at, bytes: to - from, data: held, zero: !held, allocated: true });
    });
    return out;
  }

  async close(): Promise<void> {
    this.#ram.clear();
  }

  async #store(c: number, chunk: Uint8Array): Promise<void> {
    if (this.#ram.has(c) || this.#ram.size * CACHE_CHUNK_BYTES + CACHE_CHUNK_BYTES <= this.ramLimit) {
      this.#ram.set(c, chunk);
      if (this.#onFile.delete(c)) await this.#file!.discard(c * CACHE_CHUNK_BYTES, chunk.length).catch(() => {});
      return;
    }
    if (!this.#file || (!this.#onFile.has(c) && (this.#onFile.size + 1) * CACHE_CHUNK_BYTES > this.fileLimit)) {
      throw new ShearError('ERR_NO_SPACE', `Cannot preserve (${c * CACHE_CHUNK_BYTES}, ${chunk.length}): the fleecing cache is full (${this.ramLimit} bytes of RAM, ${this.fileLimit} bytes of spill file)`, { offset: c * CACHE_CHUNK_BYTES, bytes: chunk.length, errno: 'ENOSPC' });
    }
    await this.#file.write(c * CACHE_CHUNK_BYTES, chunk);
    if (!this.#onFile.has(c)) this.#spills++;
    this.#onFile.add(c);
  }

  async #drop(c: number, drained: boolean): Promise<void> {
    const inRam = this.#ram.delete(c);
    const onFile = this.#onFile.delete(c);
    if (onFile) await this.#file!.discard(c * CACHE_CHUNK_BYTES, Math.min(CACHE_CHUNK_BYTES, this.length - c * CACHE_CHUNK_BYTES)).catch(() => {});
    if (drained && (inRam || onFile)) this.#drained++;
  }

  async #pieces(offset: number, bytes: number, fn: (chunk: number, from: number, to: number, at: number) => Promise<void>): Promise<void> {
    let at = 0;
    while (at < bytes) {
      const pos = offset + at;
      const c = Math.floor(pos / CACHE_CHUNK_BYTES);
      const from = pos - c * CACHE_CHUNK_BYTES;
      const to = Math.min(CACHE_CHUNK_BYTES, from + (bytes - at), this.length - c * CACHE_CHUNK_BYTES);
      await fn(c, from, to, at);
      at += to - from;
    }
  }
}
