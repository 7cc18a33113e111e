/**
 * A list of undo and commit steps, registered by each action as it makes its change, so that a
 * group of actions either all stay or all go (QEMU's prepare/commit/abort). Actions change
 * state at once and register how to take the change back; `abort` runs the undo steps in
 * reverse order, `commit` the commit steps in order; `clean` steps run after either.
 */
export interface TransactionAction {
  commit?: () => void;
  abort?: () => void;
  clean?: () => void;
}

export class Transaction {
  #actions: TransactionAction[] = [];
  #done = false;

  add(action: TransactionAction): void {
    if (this.#done) throw new Error('transaction already finished');
    this.#actions.push(action);
  }

  commit(): void {
    this.#finish(() => {
      for (const a of this.#actions) a.commit?.();
    });
  }

  abort(): void {
    this.#finish(() => {
      for (const a of [...this.#actions].reverse()) a.abort?.();
    });
  }

  #finish(run: () => void): void {
    if (this.#done) return;
    this.#done = true;
    try {
      run();
    } finally {
      for (const a of [...this.#actions].reverse()) a.clean?.();
    }
  }
}

/** Runs `fn` inside a transaction: commits if it returns, aborts and rethrows if it throws. */
export function inTransaction<T>(fn: (tx: Transaction) => T): T {
  const tx = new Transaction();
  let result: T;
  try {
    result = fn(tx);
  } catch (err) {
    tx.abort();
    throw err;
  }
  tx.commit();
  return result;
}
