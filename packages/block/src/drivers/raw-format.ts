import { ShearError, assertRange } from '@shear/base';
import { RequestTracker } from './request-tracker.js';
import type { BlockIO, BlockStatusExtent, WriteOptions, WriteZeroesOptions } from '../io.js';

/** QEMU requires an explicit raw `size` to be a multiple of this, so sector rounding cannot leak past the window. */
export const RAW_SIZE_ALIGNMENT_BYTES = 512;

/** QEMU's BlockdevOptionsRaw, with the child as a BlockIO. */
export interface RawFormatOptions {
  file: BlockIO;
  /** Where the window starts in the child; default 0. Any byte offset up to the child's length. */
  offset?: number;
  /** Bytes in the window (a multiple of 512); default: the rest of the child after `offset`. */
  size?: number;
}

const OPTION_KEYS: ReadonlySet<string> = new Set(['file', 'offset', 'size']);

/**
 * QEMU's `raw` format driver: a window (offset, size) onto its child. Requests are checked
 * against the window (ERR_OUT_OF_BOUNDS past its end) and passed on shifted by `offset`, with
 * their options (fua, mayUnmap, fastOnly) unchanged; blockStatus answers are shifted back.
 *
 * Validation follows QEMU's raw-format.c: offset <= child length, offset + size <= child
 * length, size a multiple of 512 when given; offset needs no alignment.
 *
 * `length` follows the child as QEMU's raw_getlength does: without `size` it is the child's
 * length minus offset (0 if the child shrank below offset); with `size` it is size, or less if
 * the child shrank. Read-only is the caller's business. The node owns its child: close()
 * waits for requests in flight and closes the child.
 */
export class RawFormatDriver implements BlockIO {
  readonly offset: number;
  /** The `size` option; undefined when the window runs to the end of the child. */
  readonly size: number | undefined;
  readonly #child: BlockIO;
  readonly #requests = new RequestTracker();

  /** @throws ERR_INVALID_ARGUMENT for a window that is negative, unaligned or outside the child */
  constructor(options: RawFormatOptions) {
    if (typeof options !== 'object' || options === null) {
      throw new ShearError('ERR_INVALID_ARGUMENT', 'Cannot open raw node: options must be an object');
    }
    for (const key of Object.keys(options)) {
      if (!OPTION_KEYS.has(key)) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open raw node: unknown option '${key}'`);
    }
    if (typeof options.file !== 'object' || options.file === null) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open raw node: 'file' (the child) is missing`);
    }
    const childLength = options.file.length;
    const offset = options.offset ?? 0;
    if (!Number.isSafeInteger(offset) || offset < 0) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open raw node: offset ${String(offset)} must be a non-negative integer`);
    }
    if (offset > childLength) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open raw node: offset ${offset} is past the end of the child (${childLength} bytes)`, { offset });
    }
    const size = options.size;
    if (size !== undefined) {
      if (!Number.isSafeInteger(size) || size < 0) {
        throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open raw node: size ${String(size)} must be a non-negative integer`);
      }
      if (size > childLength - offset) {
        throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open raw node: offset ${offset} plus size ${size} is past the end of the child (${childLength} bytes)`, { offset, bytes: size });
      }
      if (size % RAW_SIZE_ALIGNMENT_BYTES !== 0) {
        throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open raw node: size ${size} is not a multiple of ${RAW_SIZE_ALIGNMENT_BYTES}`, { bytes: size });
      }
    }
    this.#child = options.file;
    this.offset = offset;
    this.size = size;
  }

  get length(): number {
    const rest = Math.max(0, this.#child.length - this.offset);
    return this.size === undefined ? rest : Math.min(this.size, rest);
  }

  read(offset: number, buf: Uint8Array): Promise<void> {
    return this.#request('read', offset, buf.length, () => this.#child.read(this.offset + offset, buf));
  }

  write(offset: number, buf: Uint8Array, opts?: WriteOptions): Promise<void> {
    return this.#request('write', offset, buf.length, () => this.#child.write(this.offset + offset, buf, opts));
  }

  writeZeroes(offset: number, bytes: number, opts?: WriteZeroesOptions): Promise<void> {
    return this.#request('write zeroes to', offset, bytes, () => this.#child.writeZeroes(this.offset + offset, bytes, opts));
  }

  discard(offset: number, bytes: number): Promise<void> {
    return this.#request('discard', offset, bytes, () => this.#child.discard(this.offset + offset, bytes));
  }

  flush(): Promise<void> {
    return this.#request('flush', 0, 0, () => this.#child.flush());
  }

  /** The child's extents over the shifted range, shifted back (and clipped to the range). */
  blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    return this.#request('query block status of', offset, bytes, async () => {
      if (bytes === 0) return [];
      const extents = await this.#child.blockStatus(this.offset + offset, bytes);
      const end = offset + bytes;
      const out: BlockStatusExtent[] = [];
      for (const e of extents) {
        const from = Math.max(offset, e.offset - this.offset);
        const to = Math.min(end, e.offset - this.offset + e.bytes);
        if (to > from) out.push({ offset: from, bytes: to - from, data: e.data, zero: e.zero, allocated: e.allocated });
      }
      return out;
    });
  }

  /** Waits for requests in flight, then closes the child. Idempotent. */
  close(): Promise<void> {
    return this.#requests.close(() => this.#child.close());
  }

  #request<T>(action: string, offset: number, bytes: number, fn: () => Promise<T>): Promise<T> {
    try {
      if (this.#requests.closed) throw new ShearError('ERR_CLOSED', `Cannot ${action} the raw node: it is closed`);
      assertRange(offset, bytes, this.length, 'range of the raw node');
    } catch (err) {
      return Promise.reject(err);
    }
    // A child that throws instead of rejecting still yields a rejected promise here.
    const run = (async () => fn())();
    return this.#requests.track(run);
  }
}
