import { readPadded } from './file-util.js';
import type { GrowableIO } from './growable-io.js';

export interface L2Table {
  offset: number;
  data: Uint8Array;
  view: DataView;
  dirty: boolean;
}

/**
 * A bounded LRU cache of L2 tables with write-back. Callers serialise calls (the image's
 * metadata mutex) and use one table at a time: a table obtained from `get` may be evicted by
 * the next `get`/`create`, so callers finish changing it (and mark it dirty) first.
 *
 * Before a dirty table is written, `beforeWriteBack` runs: it makes the refcounts and data the
 * table points at durable, which is the ordering rule "refcounts and data before references".
 */
export class L2Cache {
  readonly #file: GrowableIO;
  readonly #clusterBytes: number;
  readonly #maxTables: number;
  readonly #beforeWriteBack: () => Promise<void>;
  #tables = new Map<number, L2Table>();

  constructor(file: GrowableIO, clusterBytes: number, maxTables: number, beforeWriteBack: () => Promise<void>) {
    this.#file = file;
    this.#clusterBytes = clusterBytes;
    this.#maxTables = Math.max(4, maxTables);
    this.#beforeWriteBack = beforeWriteBack;
  }

  async get(offset: number): Promise<L2Table> {
    const hit = this.#tables.get(offset);
    if (hit) {
      this.#tables.delete(offset);
      this.#tables.set(offset, hit);
      return hit;
    }
    const data = new Uint8Array(this.#clusterBytes);
    await readPadded(this.#file, offset, data);
    return this.#insert({ offset, data, view: new DataView(data.buffer), dirty: false });
  }

  /** A new, zeroed table at `offset` (already allocated by the caller); it starts dirty. */
  async create(offset: number, initial?: Uint8Array): Promise<L2Table> {
    const data = initial ? initial.slice() : new Uint8Array(this.#clusterBytes);
    return this.#insert({ offset, data, view: new DataView(data.buffer), dirty: true });
  }

  async #insert(t: L2Table): Promise<L2Table> {
    this.#tables.set(t.offset, t);
    while (this.#tables.size > this.#maxTables) await this.#evictOne(t);
    return t;
  }

  async #evictOne(keep: L2Table): Promise<void> {
    let victim: L2Table | undefined;
    for (const t of this.#tables.values()) {
      if (t !== keep && !t.dirty) {
        victim = t;
        break;
      }
    }
    if (!victim) {
      for (const t of this.#tables.values()) {
        if (t !== keep) {
          victim = t;
          break;
        }
      }
      if (!victim) return;
      await this.#beforeWriteBack();
      await this.#writeTable(victim);
    }
    this.#tables.delete(victim.offset);
  }

  async #writeTable(t: L2Table): Promise<void> {
    t.dirty = false;
    try {
      await this.#file.write(t.offset, t.data);
    } catch (err) {
      t.dirty = true;
      throw err;
    }
  }

  get hasDirty(): boolean {
    for (const t of this.#tables.values()) if (t.dirty) return true;
    return false;
  }

  /** Writes every dirty table (the caller has made refcounts and data durable first). */
  async writeBack(): Promise<boolean> {
    let wrote = false;
    for (const t of [...this.#tables.values()]) {
      if (!t.dirty) continue;
      await this.#writeTable(t);
      wrote = true;
    }
    return wrote;
  }

  clear(): void {
    this.#tables.clear();
  }
}
