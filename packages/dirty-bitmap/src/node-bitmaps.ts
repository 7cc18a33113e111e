import { ShearError } from '@shear/base';
import { SharedBitmap } from '@shear/bitmap';
import { CHECK_ALLOW_RO, CHECK_DEFAULT, DirtyBitmap, type DirtyBitmapInfo } from './dirty-bitmap.js';
import { checkBitmapName, checkGranularity, defaultGranularity } from './limits.js';

export interface AddBitmapOptions {
  name: string;
  /** Bytes per bit; default from the node's cluster size (see defaultGranularity). */
  granularity?: number;
  persistent?: boolean;
  /** Created not recording (QEMU's `disabled`). */
  disabled?: boolean;
}

/**
 * The dirty bitmaps of one node, named and anonymous, and every operation QMP exposes on them.
 * Every refusal happens before any change, so a failed call changes nothing.
 *
 * The node calls markDirty() for every write before the write completes, so no write can
 * escape a recording bitmap.
 */
export class NodeBitmaps {
  readonly node: string;
  /** Bytes the bitmaps cover: the node's length. */
  readonly size: number;
  readonly #clusterBytes: number | undefined;
  #all: DirtyBitmap[] = [];

  constructor(node: string, size: number, opts: { clusterBytes?: number } = {}) {
    this.node = node;
    this.size = size;
    this.#clusterBytes = opts.clusterBytes;
  }

  /** Every bitmap of the node, anonymous successors included, in creation order. */
  list(): readonly DirtyBitmap[] {
    return this.#all;
  }

  info(): DirtyBitmapInfo[] {
    return this.#all.map((b) => b.info());
  }

  find(name: string): DirtyBitmap | undefined {
    return this.#all.find((b) => b.name === name);
  }

  /** @throws ERR_BITMAP_NOT_FOUND */
  get(name: string): DirtyBitmap {
    const bm = this.find(name);
    if (!bm) throw new ShearError('ERR_BITMAP_NOT_FOUND', `Dirty bitmap "${name}" not found on node "${this.node}"`, { node: this.node, bitmap: name });
    return bm;
  }

  /** @throws ERR_BITMAP_NAME, ERR_BITMAP_EXISTS, ERR_BITMAP_GRANULARITY */
  add(opts: AddBitmapOptions): DirtyBitmap {
    checkBitmapName(opts.name);
    if (this.find(opts.name)) {
      throw new ShearError('ERR_BITMAP_EXISTS', `Cannot add bitmap "${opts.name}" to node "${this.node}": a bitmap with this name already exists`, { node: this.node, bitmap: opts.name });
    }
    const granularity = opts.granularity ?? defaultGranularity(this.#clusterBytes);
    checkGranularity(granularity);
    const bm = new DirtyBitmap(this.node, opts.name, SharedBitmap.create(this.size, granularity), {
      enabled: !opts.disabled,
      persistent: opts.persistent ?? false,
    });
    this.#all.push(bm);
    return bm;
  }

  /**
   * Adds a bitmap read from storage (qcow2 bitmaps extension, sidecar). `bits` null or
   * `inconsistent` means the stored bits cannot be trusted (in use when the process died): the
   * bitmap is listed, refuses every use but removal, and records nothing.
   * @throws ERR_BITMAP_NAME, ERR_BITMAP_EXISTS, ERR_BITMAP_GRANULARITY, ERR_BITMAP_SIZE_MISMATCH
   */
  addLoaded(opts: { name: string; granularity: number; enabled: boolean; bits: SharedBitmap | null; inconsistent?: boolean; readonly?: boolean }): DirtyBitmap {
    if (opts.bits && (opts.bits.size !== this.size || opts.bits.granularity !== opts.granularity)) {
      throw new ShearError('ERR_BITMAP_SIZE_MISMATCH', `Cannot load bitmap "${opts.name}" on node "${this.node}": it covers ${opts.bits.size} bytes at granularity ${opts.bits.granularity}, the node ${this.size} bytes`, { node: this.node, bitmap: opts.name });
    }
    const bm = this.add({ name: opts.name, granularity: opts.granularity, persistent: true, disabled: !opts.enabled });
    if (opts.bits) bm.bits.merge(opts.bits);
    bm.markLoaded({ inconsistent: opts.inconsistent === true || opts.bits === null, readonly: opts.readonly === true });
    return bm;
  }

  /**
   * Removes a named bitmap. Inconsistent bitmaps may be removed (it is the only thing they
   * allow); busy and read-only ones may not.
   * @throws ERR_BITMAP_NOT_FOUND, ERR_BITMAP_BUSY, ERR_BITMAP_READONLY
   */
  remove(name: string): DirtyBitmap {
    const bm = this.get(name);
    bm.check({ busy: true, readonly: true });
    this.#drop(bm);
    return bm;
  }

  /** @throws ERR_BITMAP_NOT_FOUND, ERR_BITMAP_BUSY, ERR_BITMAP_READONLY, ERR_BITMAP_INCONSISTENT */
  clear(name: string): void {
    const bm = this.get(name);
    bm.check(CHECK_DEFAULT);
    bm.bits.clear();
  }

  /** @throws ERR_BITMAP_NOT_FOUND, ERR_BITMAP_BUSY, ERR_BITMAP_INCONSISTENT */
  enable(name: string): void {
    const bm = this.get(name);
    bm.check(CHECK_ALLOW_RO);
    bm.setEnabled(true);
  }

  /** @throws ERR_BITMAP_NOT_FOUND, ERR_BITMAP_BUSY, ERR_BITMAP_INCONSISTENT */
  disable(name: string): void {
    const bm = this.get(name);
    bm.check(CHECK_ALLOW_RO);
    bm.setEnabled(false);
  }

  /**
   * ORs every source into the named target. Sources may belong to other nodes of the same
   * length and may have another granularity. All checks run before the first bit changes.
   * @throws ERR_BITMAP_NOT_FOUND, ERR_BITMAP_BUSY, ERR_BITMAP_READONLY, ERR_BITMAP_INCONSISTENT, ERR_BITMAP_SIZE_MISMATCH
   */
  merge(target: string, sources: readonly DirtyBitmap[]): void {
    const dst = this.get(target);
    dst.check(CHECK_DEFAULT);
    for (const src of sources) {
      src.check({ inconsistent: true });
      if (src.size !== dst.size) {
        throw new ShearError('ERR_BITMAP_SIZE_MISMATCH', `Cannot merge bitmap ${src.label} into ${dst.label}: sizes differ (${src.size} and ${dst.size} bytes)`, { node: this.node, bitmap: target });
      }
    }
    for (const src of sources) if (src !== dst) dst.bits.merge(src.bits);
  }

  /** Sets (offset, bytes) in every recording bitmap of the node. */
  markDirty(offset: number, bytes: number): void {
    for (const bm of this.#all) bm.markDirty(offset, bytes);
  }

  /**
   * Freezes `bm` for a job: it becomes busy and stops recording, and an anonymous successor
   * (listed on the node) records writes from now on.
   * @throws ERR_BITMAP_BUSY, ERR_BITMAP_HAS_SUCCESSOR, ERR_BITMAP_INCONSISTENT
   */
  createSuccessor(bm: DirtyBitmap): DirtyBitmap {
    this.#owned(bm);
    if (bm.frozen) {
      throw new ShearError('ERR_BITMAP_HAS_SUCCESSOR', `Cannot create a successor for bitmap ${bm.label}: it already has one`, { node: this.node });
    }
    bm.check({ busy: true, inconsistent: true });
    const successor = new DirtyBitmap(this.node, null, SharedBitmap.create(this.size, bm.granularity), { enabled: false, persistent: false });
    bm.installSuccessor(successor);
    this.#all.push(successor);
    return successor;
  }

  /** The job succeeded: the successor becomes the bitmap (same name, same place in the list). */
  abdicate(bm: DirtyBitmap): DirtyBitmap {
    this.#owned(bm);
    const successor = bm.successor;
    const result = bm.handOver();
    // The successor takes the parent's place so listings keep their order.
    this.#all = this.#all.filter((b) => b !== successor).map((b) => (b === bm ? result : b));
    return result;
  }

  /** The job failed: the successor's writes are merged back, as if the job never ran. */
  reclaim(bm: DirtyBitmap): DirtyBitmap {
    this.#owned(bm);
    const successor = bm.takeBack();
    this.#all = this.#all.filter((b) => b !== successor);
    return bm;
  }

  #owned(bm: DirtyBitmap): void {
    if (!this.#all.includes(bm)) {
      throw new ShearError('ERR_BITMAP_NOT_FOUND', `Bitmap ${bm.label} does not belong to node "${this.node}"`, { node: this.node });
    }
  }

  #drop(bm: DirtyBitmap): void {
    this.#all = this.#all.filter((b) => b !== bm);
    bm.markReleased();
  }
}
