/**
 * Bytes received and not yet consumed, as a list of chunks (no copying on push). `take` copies
 * only when the bytes asked for span several chunks.
 */
export class ByteQueue {
  #chunks: Uint8Array[] = [];
  /** Bytes of the first chunk already consumed. */
  #head = 0;
  #length = 0;

  get length(): number {
    return this.#length;
  }

  push(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    this.#chunks.push(chunk);
    this.#length += chunk.length;
  }

  /** Removes and returns the first `n` bytes (a view when they lie in one chunk). */
  take(n: number): Buffer {
    if (!Number.isSafeInteger(n) || n < 0 || n > this.#length) throw new RangeError(`Cannot take ${n} bytes from a queue of ${this.#length}`);
    if (n === 0) return Buffer.alloc(0);
    const first = this.#chunks[0]!;
    if (first.length - this.#head >= n) {
      const out = Buffer.from(first.buffer, first.byteOffset + this.#head, n);
      this.#advance(n);
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const chunk = this.#chunks[0]!;
      const piece = Math.min(chunk.length - this.#head, n - filled);
      out.set(chunk.subarray(this.#head, this.#head + piece), filled);
      filled += piece;
      this.#advance(piece);
    }
    return out;
  }

  /** Drops up to `n` bytes; returns how many were dropped. */
  skip(n: number): number {
    let left = Math.min(n, this.#length);
    const dropped = left;
    while (left > 0) {
      const chunk = this.#chunks[0]!;
      const piece = Math.min(chunk.length - this.#head, left);
      this.#advance(piece);
      left -= piece;
    }
    return dropped;
  }

  clear(): void {
    this.#chunks = [];
    this.#head = 0;
    this.#length = 0;
  }

  #advance(n: number): void {
    this.#head += n;
    this.#length -= n;
    if (this.#head === this.#chunks[0]!.length) {
      this.#chunks.shift();
      this.#head = 0;
    }
  }
}
