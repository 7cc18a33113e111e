/**
 * Reusable read buffers for the NBD server. A fresh buffer per READ reply is garbage the moment
 * the socket has flushed it; at a few GiB/s of pulls that is most of the collector's work and
 * shows up as write latency for the guest. Buffers come in power-of-two size classes and go
 * back to the pool once the socket has written them out.
 *
 * Coordinator-only. The pool holds at most `maxBytes` idle; beyond that released buffers are
 * left to the collector.
 */
export class BufferPool {
  readonly #free = new Map<number, ArrayBuffer[]>();
  readonly #mine = new WeakSet<ArrayBuffer>();
  readonly #maxBytes: number;
  #idleBytes = 0;

  constructor(maxBytes = 64 * 1024 * 1024) {
    this.#maxBytes = maxBytes;
  }

  /** A buffer of exactly `length` bytes (contents undefined). */
  acquire(length: number): Buffer {
    const size = sizeClass(length);
    const ab = this.#free.get(size)?.pop();
    if (ab) {
      this.#idleBytes -= size;
      return Buffer.from(ab, 0, length);
    }
    const fresh = new ArrayBuffer(size);
    this.#mine.add(fresh);
    return Buffer.from(fresh, 0, length);
  }

  /** Gives a buffer from acquire() back; it must not be used afterwards. */
  release(buf: Buffer): void {
    const ab = buf.buffer;
    if (!(ab instanceof ArrayBuffer) || !this.#mine.has(ab)) return;
    if (this.#idleBytes + ab.byteLength > this.#maxBytes) return;
    let list = this.#free.get(ab.byteLength);
    if (!list) this.#free.set(ab.byteLength, (list = []));
    list.push(ab);
    this.#idleBytes += ab.byteLength;
  }

  get idleBytes(): number {
    return this.#idleBytes;
  }
}

/** The smallest power of two ≥ length, at least 4 KiB. */
function sizeClass(length: number): number {
  return Math.max(4096, 2 ** Math.ceil(Math.log2(Math.max(1, length))));
}
