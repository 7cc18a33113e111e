/**
 * Ownership of resources. Whatever holds an fd, a worker, a socket or a timer is owned by
 * exactly one store, and disposing the store releases its children in reverse order of
 * registration, on every path, even when one of them throws.
 */
export interface AsyncDisposableLike {
  [Symbol.asyncDispose](): Promise<void>;
}
export interface DisposableLike {
  [Symbol.dispose](): void;
}

type Entry = () => void | Promise<void>;

export class DisposableStore implements AsyncDisposableLike {
  #entries: Entry[] = [];
  #disposed = false;

  get isDisposed(): boolean {
    return this.#disposed;
  }

  /** Registers `fn` to run at disposal; if the store is already disposed it runs at once. */
  defer(fn: Entry): void {
    if (this.#disposed) {
      void Promise.resolve().then(fn);
      return;
    }
    this.#entries.push(fn);
  }

  add<T extends AsyncDisposableLike | DisposableLike>(resource: T): T {
    this.defer(() => {
      if (Symbol.asyncDispose in resource) return (resource as AsyncDisposableLike)[Symbol.asyncDispose]();
      (resource as DisposableLike)[Symbol.dispose]();
    });
    return resource;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    if (this.#disposed) return;
    this.#disposed = true;
    const errors: unknown[] = [];
    for (const fn of this.#entries.reverse()) {
      try {
        await fn();
      } catch (err) {
        errors.push(err);
      }
    }
    this.#entries = [];
    if (errors.length === 1) throw errors[0];
    if (errors.length > 1) throw new AggregateError(errors, 'Cannot release all resources: several disposers failed');
  }

  dispose(): Promise<void> {
    return this[Symbol.asyncDispose]();
  }
}
