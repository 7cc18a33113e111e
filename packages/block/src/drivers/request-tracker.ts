/**
 * A driver's bookkeeping for close(): whether it is closed, which requests are in flight, and the
 * one close that waits for them before releasing what the driver holds.
 */
export class RequestTracker {
  #closed = false;
  #closing: Promise<void> | undefined;
  readonly #inflight = new Set<Promise<unknown>>();

  get closed(): boolean {
    return this.#closed;
  }

  /** Keeps `p` in flight until it settles, so close() waits for it. */
  track<T>(p: Promise<T>): Promise<T> {
    this.#inflight.add(p);
    const forget = () => void this.#inflight.delete(p);
    p.then(forget, forget);
    return p;
  }

  /** Marks the driver closed, waits for the requests in flight, then runs `release` once. Idempotent. */
  close(release: () => Promise<void>): Promise<void> {
    this.#closed = true;
    this.#closing ??= (async () => {
      await Promise.allSettled([...this.#inflight]);
      await release();
    })();
    return this.#closing;
  }
}
