import { ShearError } from '@shear/base';
import { SharedBitmap } from '@shear/bitmap';
import { hasHostFile, hasPersistentBitmapStore, type BlockNode } from '@shear/block';
import { loadSidecar, markSidecarInUse, removeFromSidecar, storeSidecar, type DirtyBitmap } from '@shear/dirty-bitmap';

/**
 * Where a node keeps its persistent dirty bitmaps: qcow2 images in their own bitmaps extension
 * (so `qemu-img info` and `qemu-img bitmap` see them), raw files in a sidecar file beside them.
 *
 * Lifecycle (QEMU's semantics): bitmaps are loaded when the node opens and marked in use on
 * disk at once, so that after a crash they load as inconsistent (only removal allowed) and are
 * never trusted; on clean close, and on request, they are stored with the in-use flag clear.
 */
export interface BitmapStorage {
  /** The driver that keeps them in its own data ('qcow2'), or 'sidecar'. */
  readonly kind: string;
  /** Stores every persistent bitmap of the node; `inUse` false = consistent on disk. */
  store(opts: { inUse: boolean }): Promise<void>;
  /** Deletes stored bitmaps (block-dirty-bitmap-remove of a persistent bitmap). */
  remove(names: readonly string[]): Promise<void>;
}

const storages = new WeakMap<BlockNode, BitmapStorage>();

export function bitmapStorageOf(node: BlockNode): BitmapStorage | undefined {
  return storages.get(node);
}

/**
 * The bits to store for a bitmap: a frozen bitmap (a job runs) is stored as its own bits plus its
 * successor's, which is what it becomes if the job fails: never less than a later reclaim.
 */
function bitsToStore(bm: DirtyBitmap): SharedBitmap {
  if (!bm.successor) return bm.bits;
  const union = bm.bits.copy();
  union.merge(bm.successor.bits);
  return union;
}

function persistentOf(node: BlockNode): DirtyBitmap[] {
  return node.bitmaps.list().filter((b) => b.persistent && b.name !== null && !b.inconsistent);
}

/**
 * Loads the node's stored bitmaps into it and attaches its storage. Called right after the
 * node opened, before anything can write to it.
 */
export async function attachBitmapStorage(node: BlockNode): Promise<void> {
  const driver = node.driver;
  if (hasPersistentBitmapStore(driver)) {
    for (const b of await driver.storedBitmaps(node.readOnly)) {
      node.bitmaps.addLoaded({ name: b.name, granularity: b.granularity, enabled: b.enabled, bits: b.bits, inconsistent: b.bits === null, readonly: node.readOnly });
    }
    if (node.readOnly) return;
    const storage: BitmapStorage = {
      kind: node.info.name,
      store: (opts) => driver.storeBitmaps(persistentOf(node).map((b) => ({ name: b.name!, granularity: b.granularity, bits: bitsToStore(b), enabled: b.recording || b.frozen })), opts),
      remove: (names) => driver.removeBitmaps(names),
    };
    storages.set(node, storage);
    node.addCloseHook(() => storage.store({ inUse: false }));
    return;
  }
  if (hasHostFile(driver)) {
    const path = driver.path;
    const contents = await loadSidecar(path);
    for (const b of contents?.bitmaps ?? []) {
      node.bitmaps.addLoaded({ name: b.name, granularity: b.granularity, enabled: b.enabled, bits: b.bits, inconsistent: b.inconsistent, readonly: node.readOnly });
    }
    if (node.readOnly) return;
    // Taken: marked in use before any write can reach the image.
    if (contents && contents.bitmaps.length > 0) await markSidecarInUse(path);
    let needsMark = false;
    let marking: Promise<void> | undefined;
    node.setWriteGate(() => {
      if (!needsMark) return marking;
      needsMark = false;
      marking = markSidecarInUse(path).finally(() => (marking = undefined));
      return marking;
    });
    const storage: BitmapStorage = {
      kind: 'sidecar',
      async store(opts) {
        const bitmaps = persistentOf(node);
        if (bitmaps.length === 0 && !contents) return;
        await storeSidecar(path, bitmaps.map((b) => ({ name: b.name!, granularity: b.granularity, bits: bitsToStore(b), enabled: b.recording || b.frozen })), opts);
        // A consistent sidecar must be marked in use again before the next write lands.
        if (!opts.inUse) needsMark = true;
      },
      remove: (names) => removeFromSidecar(path, names),
    };
    storages.set(node, storage);
    node.addCloseHook(() => storage.store({ inUse: false }));
  }
}

/** @throws ERR_NOT_IMPLEMENTED when the node cannot keep persistent bitmaps */
export function requireBitmapStorage(node: BlockNode): BitmapStorage {
  const s = storages.get(node);
  if (!s) {
    throw new ShearError('ERR_NOT_IMPLEMENTED', `Cannot store dirty bitmaps on node "${node.name}": only writable qcow2 and file nodes can keep persistent bitmaps`, { node: node.name });
  }
  return s;
}
