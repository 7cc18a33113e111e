import { ShearError } from '@shear/base';
import { SharedBitmap } from '@shear/bitmap';

/** What an operation needs of a bitmap; QEMU's BDRV_BITMAP_* check flags. */
export interface UsageCheck {
  /** Refuse if busy (in use by a job or export, or frozen with a successor). */
  busy?: boolean;
  /** Refuse if loaded read-only. */
  readonly?: boolean;
  /** Refuse if inconsistent (possibly lost bits after a crash). */
  inconsistent?: boolean;
}

/** The checks most operations make (QEMU's BDRV_BITMAP_DEFAULT). */
export const CHECK_DEFAULT: UsageCheck = { busy: true, readonly: true, inconsistent: true };
/** Enable and disable are allowed on read-only bitmaps (QEMU's BDRV_BITMAP_ALLOW_RO). */
export const CHECK_ALLOW_RO: UsageCheck = { busy: true, inconsistent: true };

/** A bitmap as query-named-block-nodes shows it. */
export interface DirtyBitmapInfo {
  name?: string;
  count: number;
  granularity: number;
  recording: boolean;
  busy: boolean;
  persistent: boolean;
  inconsistent?: boolean;
}

/**
 * One dirty bitmap of a node: the bits plus the state QEMU attaches to them. Coordinator-only
 * object; the bits themselves (`bits`) are a SharedBitmap that workers may attach to.
 *
 * Lifecycle with a job (seed 004):
 *   createSuccessor(): this bitmap freezes (busy, not recording); an anonymous successor
 *                      records the writes made while the job runs.
 *   abdicate():        the job succeeded: the successor takes the name and persistence; this
 *                      object is released.
 *   reclaim():         the job failed: the successor's bits are merged back and it is released,
 *                      as if the job never ran.
 */
export class DirtyBitmap {
  #name: string | null;
  readonly node: string;
  readonly bits: SharedBitmap;
  #enabled: boolean;
  #busy = false;
  #persistent: boolean;
  #inconsistent = false;
  #readonly = false;
  #released = false;
  #successor: DirtyBitmap | null = null;

  /** @internal Use NodeBitmaps.add(). */
  constructor(node: string, name: string | null, bits: SharedBitmap, opts: { enabled: boolean; persistent: boolean }) {
    this.node = node;
    this.#name = name;
    this.bits = bits;
    this.#enabled = opts.enabled;
    this.#persistent = opts.persistent;
  }

  get name(): string | null {
    return this.#name;
  }
  get size(): number {
    return this.bits.size;
  }
  get granularity(): number {
    return this.bits.granularity;
  }
  /** Whether writes to the node set bits in this bitmap. */
  get recording(): boolean {
    return this.#enabled;
  }
  get busy(): boolean {
    return this.#busy;
  }
  get persistent(): boolean {
    return this.#persistent;
  }
  get inconsistent(): boolean {
    return this.#inconsistent;
  }
  get readonly(): boolean {
    return this.#readonly;
  }
  get released(): boolean {
    return this.#released;
  }
  get successor(): DirtyBitmap | null {
    return this.#successor;
  }
  /** Frozen: a successor records writes while a job uses this bitmap's point in time. */
  get frozen(): boolean {
    return this.#successor !== null;
  }

  get label(): string {
    return this.#name === null ? `(anonymous bitmap on "${this.node}")` : `"${this.#name}"`;
  }

  /** @throws ERR_BITMAP_BUSY, ERR_BITMAP_READONLY, ERR_BITMAP_INCONSISTENT */
  check(what: UsageCheck): void {
    const ctx = { node: this.node, bitmap: this.#name ?? undefined };
    if (what.busy && this.#busy) {
      throw new ShearError('ERR_BITMAP_BUSY', `Bitmap ${this.label} is currently in use by another operation and cannot be used`, ctx);
    }
    if (what.readonly && this.#readonly) {
      throw new ShearError('ERR_BITMAP_READONLY', `Bitmap ${this.label} is readonly and cannot be modified`, ctx);
    }
    if (what.inconsistent && this.#inconsistent) {
      throw new ShearError('ERR_BITMAP_INCONSISTENT', `Bitmap ${this.label} is inconsistent and cannot be used: it may have lost bits in a crash; remove it with block-dirty-bitmap-remove`, ctx);
    }
  }

  info(): DirtyBitmapInfo {
    const info: DirtyBitmapInfo = {
      count: this.bits.countBytes(),
      granularity: this.granularity,
      // As QEMU reports it: a frozen bitmap records through its successor.
      recording: this.#enabled || (this.#successor?.info().recording ?? false),
      busy: this.#busy,
      persistent: this.#persistent,
    };
    if (this.#name !== null) info.name = this.#name;
    if (this.#inconsistent) info.inconsistent = true;
    return info;
  }

  /** Marks (offset, bytes) dirty if recording; called for every write to the node. */
  markDirty(offset: number, bytes: number): void {
    if (this.#enabled) this.bits.set(offset, bytes);
  }

  /** @internal The registry applies checks first. */
  setEnabled(enabled: boolean): void {
    this.#enabled = enabled;
  }

  /** Marks the bitmap as in use by an operation (an export, a job) or frees it. */
  setBusy(busy: boolean): void {
    this.#busy = busy;
  }

  setPersistent(persistent: boolean): void {
    this.#persistent = persistent;
  }

  /** Loaded state of a stored bitmap. An inconsistent bitmap stops recording: its bits mean nothing. */
  markLoaded(state: { inconsistent?: boolean; readonly?: boolean }): void {
    if (state.inconsistent) {
      this.#inconsistent = true;
      this.#enabled = false;
    }
    if (state.readonly) this.#readonly = true;
  }

  /** @internal Successor handling lives in NodeBitmaps, which also owns the list they appear in. */
  installSuccessor(successor: DirtyBitmap): void {
    this.#successor = successor;
    this.#busy = true;
    successor.#enabled = this.#enabled;
    this.#enabled = false;
  }

  /** @internal Hands name and persistence to the successor and retires this bitmap. */
  handOver(): DirtyBitmap {
    const successor = this.#requireSuccessor();
    successor.#name = this.#name;
    successor.#persistent = this.#persistent;
    this.#name = null;
    this.#persistent = false;
    this.#successor = null;
    this.#busy = false;
    this.#released = true;
    return successor;
  }

  /** @internal Takes back the successor's bits and recording state; the successor is retired. */
  takeBack(): DirtyBitmap {
    const successor = this.#requireSuccessor();
    this.bits.merge(successor.bits);
    this.#enabled = successor.#enabled;
    this.#busy = false;
    this.#successor = null;
    successor.#released = true;
    return successor;
  }

  /** @internal */
  markReleased(): void {
    this.#released = true;
  }

  #requireSuccessor(): DirtyBitmap {
    if (!this.#successor) {
      throw new ShearError('ERR_BITMAP_NO_SUCCESSOR', `Cannot finish bitmap ${this.label}: it has no successor`, { node: this.node });
    }
    return this.#successor;
  }
}
