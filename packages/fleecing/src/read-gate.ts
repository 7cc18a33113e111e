/**
 * How many snapshot reads may be in flight at once. A pull (nbdcopy: 4 connections of up to 32
 * requests each) would otherwise fill libuv's thread pool (4 threads) with a queue of reads, and
 * the guest's copy-before-write and write, which need the same threads, would wait behind all of
 * them: the guest first, the reader with what is left.
 */
export const SNAPSHOT_READ_SLOTS = 2;
/** While a guest write is under way, snapshot reads get this many slots. */
export const SNAPSHOT_READ_SLOTS_GUEST_WAITING = 1;

/**
 * Admission of snapshot reads, guest writes first. A read takes a slot before it touches any
 * node and before it enters the filter's request table, so a read waiting here holds nothing a
 * guest write could wait for. Waiting reads are admitted in arrival order. Coordinator-only.
 */
export class ReadGate {
  #reading = 0;
  #guestWrites = 0;
  readonly #waiting: (() => void)[] = [];

  get reading(): number {
    return this.#reading;
  }

  get waiting(): number {
    return this.#waiting.length;
  }

  /** Resolves when the read may start; call the returned function once it is done. */
  async enter(): Promise<() => void> {
    if (this.#waiting.length > 0 || this.#reading >= this.#limit()) {
      await new Promise<void>((resolve) => this.#waiting.push(resolve));
    } else {
      this.#reading++;
    }
    let left = false;
    return () => {
      if (left) return;
      left = true;
      this.#reading--;
      this.#admit();
    };
  }

  /** A guest write starts: reads not yet admitted get fewer slots until it ends. */
  guestWriteStarted(): void {
    this.#guestWrites++;
  }

  guestWriteEnded(): void {
    this.#guestWrites--;
    this.#admit();
  }

  #limit(): number {
    return this.#guestWrites > 0 ? SNAPSHOT_READ_SLOTS_GUEST_WAITING : SNAPSHOT_READ_SLOTS;
  }

  #admit(): void {
    while (this.#waiting.length > 0 && this.#reading < this.#limit()) {
      this.#reading++;
      this.#waiting.shift()!();
    }
  }
}
