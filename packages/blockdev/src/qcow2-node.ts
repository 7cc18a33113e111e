import type { BlockIO, HostMappable, PersistentBitmapStore } from '@shear/block';
import type { Qcow2Image } from '@shear/qcow2';

/** A qcow2 image as a graph driver: its BlockIO, plus what the copy engine can use directly. */
export interface Qcow2Node extends BlockIO, HostMappable, PersistentBitmapStore {
  readonly image: Qcow2Image;
  readonly clusterBytes: number;
  writeCompressed(offset: number, data: Uint8Array): Promise<void>;
  writeDeflated(offset: number, packed: Uint8Array): Promise<void>;
}

/**
 * Wraps an open image for the graph. When its file child maps (a plain file), reads and writes
 * can be mapped: the image allocates clusters in the coordinator, a worker moves the data at
 * their host offsets through the file's fd, and the commit links them into the L2 tables
 * afterwards (data before metadata, so a crash leaks clusters at worst).
 */
export function qcow2Driver(image: Qcow2Image): Qcow2Node {
  const node: Qcow2Node = {
    image,
    get length() {
      return image.length;
    },
    get clusterBytes() {
      return image.clusterBytes;
    },
    read: (o, b) => image.read(o, b),
    write: (o, b, opts) => image.write(o, b, opts),
    writeZeroes: (o, n, opts) => image.writeZeroes(o, n, opts),
    discard: (o, n) => image.discard(o, n),
    flush: () => image.flush(),
    blockStatus: (o, n) => image.blockStatus(o, n),
    close: () => image.close(),
    writeCompressed: (o, d) => image.writeCompressed(o, d),
    writeDeflated: (o, d) => image.writeDeflated(o, d),
    // A writable image took its bitmaps when it opened (in use on disk from then on).
    storedBitmaps: async (readOnly) =>
      (readOnly ? await image.loadBitmaps() : image.takenBitmaps).map((b) => ({ name: b.name, granularity: b.granularity, enabled: b.flags.auto, bits: b.bits })),
    storeBitmaps: (bitmaps, opts) => image.storeBitmaps(bitmaps, opts),
    removeBitmaps: (names) => image.removeBitmaps(names),
  };
  // Resolved once the node is open: whether the image can map depends on its file (and backing).
  const m = image.hostMapping();
  if (m?.mapRead) node.mapRead = m.mapRead.bind(m);
  if (m?.mapWrite) node.mapWrite = m.mapWrite.bind(m);
  return node;
}
