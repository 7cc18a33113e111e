interface Entry {
  start: number;
  end: number;
  write: boolean;
  done: Promise<void>;
  release: () => void;
}

/**
 * Arrival order for overlapping requests (of one export across its connections, or of one
 * client driver's read-modify-writes): a request waits for every earlier, still running request
 * whose range overlaps its own when either of the two writes. Reads run side by side, and so do
 * requests on disjoint ranges. This gives overlapping pipelined writes the order the client
 * sent them in (nbd-tester-client's integrityhuge test relies on it) and keeps a read from
 * seeing half of an earlier write.
 *
 * A request registers itself synchronously (in arrival order) and cannot wait for a later one,
 * so the waits form no cycle.
 */
export class OverlapOrder {
  #active = new Set<Entry>();

  get size(): number {
    return this.#active.size;
  }

  /**
   * Registers (offset, bytes) now; `ready` resolves once the earlier conflicting requests are
   * done. `release` must be called exactly once when the request is finished (also on failure).
   */
  enter(offset: number, bytes: number, write: boolean): { ready: Promise<void>; release: () => void } {
    const end = offset + bytes;
    const waits: Promise<void>[] = [];
    if (bytes > 0) {
      for (const e of this.#active) {
        if ((write || e.write) && e.start < end && offset < e.end) waits.push(e.done);
      }
    }
    let resolve!: () => void;
    const done = new Promise<void>((r) => (resolve = r));
    const entry: Entry = {
      start: offset,
      end,
      write,
      done,
      release: () => {
        if (!this.#active.delete(entry)) return;
        resolve();
      },
    };
    if (bytes > 0) this.#active.add(entry);
    else resolve();
    return { ready: waits.length === 0 ? Promise.resolve() : Promise.all(waits).then(() => undefined), release: entry.release };
  }
}
