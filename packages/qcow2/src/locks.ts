/** A FIFO async mutex: `run` executes its function after every earlier one has settled. */
export class AsyncMutex {
  #tail: Promise<unknown> = Promise.resolve();

  run<T>(fn: () => Promise<T>): Promise<T> {
    const result = this.#tail.then(fn);
    this.#tail = result.catch(() => undefined);
    return result;
  }
}

interface Holder {
  start: number;
  end: number;
  exclusive: boolean;
  released: Promise<void>;
  release: () => void;
}

/**
 * Shared/exclusive locks on ranges of guest clusters. A request waits only for conflicting
 * holders that registered before it (FIFO), so waits form no cycle. Reads take shared locks,
 * anything that changes content or mapping takes exclusive ones.
 */
export class RangeLock {
  #holders = new Set<Holder>();

  async acquire(start: number, end: number, exclusive: boolean): Promise<() => void> {
    const waitFor: Promise<void>[] = [];
    for (const h of this.#holders) {
      if (h.start < end && start < h.end && (exclusive || h.exclusive)) waitFor.push(h.released);
    }
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    const holder: Holder = { start, end, exclusive, released, release };
    this.#holders.add(holder);
    if (waitFor.length > 0) await Promise.all(waitFor);
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this.#holders.delete(holder);
      holder.release();
    };
  }

  get busy(): boolean {
    return this.#holders.size > 0;
  }
}
