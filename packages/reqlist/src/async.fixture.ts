/**
 * Test helpers for forcing interleavings by hand. The table never uses timers, so once
 * `flush()` returns, every reaction to what the test did synchronously has run: a promise
 * still pending then is blocked, not slow.
 */
export function flush(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

export interface Tracked<T> {
  readonly promise: Promise<T>;
  readonly settled: boolean;
  readonly value: T | undefined;
  readonly error: unknown;
}

/** Watches a promise so a test can ask, after flush(), whether it has settled yet. */
export function track<T>(promise: Promise<T>): Tracked<T> {
  const state = { promise, settled: false, value: undefined as T | undefined, error: undefined as unknown };
  promise.then(
    (v) => {
      state.settled = true;
      state.value = v;
    },
    (e: unknown) => {
      state.settled = true;
      state.error = e;
    },
  );
  return state;
}

export interface Deferred<T = void> {
  readonly promise: Promise<T>;
  resolve(value: T): void;
}

export function deferred<T = void>(): Deferred<T> {
  let resolve!: (value: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}

/**
 * Named gates an async flow stops at; the test opens them one at a time, in the order the
 * interleaving under test needs.
 */
export class Gates {
  readonly #pending: { label: string; open: () => void }[] = [];

  /** Called by the flow: resolves when the test opens a gate with this label. */
  at(label: string): Promise<void> {
    const d = deferred();
    this.#pending.push({ label, open: () => d.resolve() });
    return d.promise;
  }

  /** Labels of the gates flows are stopped at, oldest first. */
  get waiting(): string[] {
    return this.#pending.map((g) => g.label);
  }

  /** Opens the oldest gate with this label and lets everything it unblocks run. */
  async open(label: string): Promise<void> {
    const i = this.#pending.findIndex((g) => g.label === label);
    if (i < 0) throw new Error(`no flow is waiting at gate "${label}" (waiting: ${this.waiting.join(', ') || 'none'})`);
    const [gate] = this.#pending.splice(i, 1);
    gate!.open();
    await flush();
  }
}
