import { FileDriver, type BlockIO, type ChildEdge, type HostExtent, type HostMappable, type WriteMapping } from '@shear/block';
import type { Qcow2Image } from '@shear/qcow2';

/** A qcow2 image as a graph driver: its BlockIO, plus what the copy engine can use directly. */
export interface Qcow2Node extends BlockIO, HostMappable {
  readonly image: Qcow2Image;
  readonly clusterBytes: number;
  writeCompressed(offset: number, data: Uint8Array): Promise<void>;
}

/**
 * Wraps an open image. When its file child is a plain (not O_DIRECT) file, writes can be
 * mapped: the image allocates clusters in the coordinator, a worker writes the data at their
 * host offsets through the file's fd, and the commit links them into the L2 tables afterwards
 * (data before metadata, so a crash leaks clusters at worst).
 */
export function qcow2Driver(image: Qcow2Image, file: ChildEdge): Qcow2Node {
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
  };
  const fileDriver = file.child.isOpen ? file.child.driver : undefined;
  if (fileDriver instanceof FileDriver && !fileDriver.direct) {
    node.mapWrite = async (offset, bytes): Promise<WriteMapping> => {
      const m = await image.mapForWrite(offset, bytes);
      const extents: HostExtent[] = m.extents.map((e) => ({ kind: 'fd', fd: fileDriver.fd, hostOffset: e.hostOffset, bytes: e.bytes }));
      return {
        extents,
        commit: () => image.commitMapping(m),
        abort: () => image.abortMapping(m),
      };
    };
  }
  return node;
}
