import { ShearError, assertRange } from '@shear/base';
import type { BlockIO, BlockStatusExtent, WriteOptions, WriteZeroesOptions } from '../io.js';

/** QEMU's default size for null-co (its `size` option). */
export const NULL_DEFAULT_LENGTH_BYTES = 1024 * 1024 * 1024;

export interface NullDriverOptions {
  /** Bytes the node serves; default NULL_DEFAULT_LENGTH_BYTES. */
  length?: number;
  /**
   * Reads fill the buffer with zeroes (QEMU's `read-zeroes`). Default true here; QEMU 7.2
   * defaults to false, where reads leave the buffer as it was. A QMP layer wanting QEMU's
   * default passes false.
   */
  readZeroes?: boolean;
  /** Delay of every request in nanoseconds (QEMU's `latency-ns`); default 0. Timer resolution is 1 ms. */
  latencyNs?: number;
}

/**
 * QEMU's `null-co`: a device of a given length that stores nothing. Writes, zeroing and discards
 * are dropped. Block status is one extent: with readZeroes {data: false, zero: true}, else
 * {data: false, zero: false} (content unspecified); allocated: true either way, since no
 * backing file could supply the content (QEMU reports "not present" without read-zeroes).
 */
export class NullDriver implements BlockIO {
  readonly length: number;
  readonly readZeroes: boolean;
  readonly latencyNs: number;
  #closed = false;

  constructor(opts: NullDriverOptions = {}) {
    this.length = opts.length ?? NULL_DEFAULT_LENGTH_BYTES;
    assertRange(0, this.length, Number.MAX_SAFE_INTEGER, 'null device length');
    this.readZeroes = opts.readZeroes ?? true;
    this.latencyNs = opts.latencyNs ?? 0;
    if (!Number.isSafeInteger(this.latencyNs) || this.latencyNs < 0) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot use latency ${this.latencyNs} ns: must be a non-negative integer`);
    }
  }

  async read(offset: number, buf: Uint8Array): Promise<void> {
    this.#check('read', offset, buf.length);
    if (buf.length === 0) return;
    await this.#delay();
    if (this.readZeroes) buf.fill(0);
  }

  async write(offset: number, buf: Uint8Array, _opts?: WriteOptions): Promise<void> {
    this.#check('write', offset, buf.length);
    if (buf.length > 0) await this.#delay();
  }

  async writeZeroes(offset: number, bytes: number, _opts?: WriteZeroesOptions): Promise<void> {
    this.#check('write zeroes to', offset, bytes);
    if (bytes > 0) await this.#delay();
  }

  async discard(offset: number, bytes: number): Promise<void> {
    this.#check('discard', offset, bytes);
    if (bytes > 0) await this.#delay();
  }

  async flush(): Promise<void> {
    this.#check('flush', 0, 0);
    await this.#delay();
  }

  async blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    this.#check('query block status of', offset, bytes);
    if (bytes === 0) return [];
    return [{ offset, bytes, data: false, zero: this.readZeroes, allocated: true }];
  }

  async close(): Promise<void> {
    this.#closed = true;
  }

  #check(action: string, offset: number, bytes: number): void {
    if (this.#closed) throw new ShearError('ERR_CLOSED', `Cannot ${action} the null device: it is closed`);
    assertRange(offset, bytes, this.length, 'range of the null device');
  }

  async #delay(): Promise<void> {
    if (this.latencyNs > 0) await new Promise((resolve) => setTimeout(resolve, this.latencyNs / 1e6));
  }
}
