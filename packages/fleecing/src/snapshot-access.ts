import { ShearError } from '@shear/base';
import { PERM_ALL, PERM_CONSISTENT_READ, isSnapshotSource, type BlockIO, type BlockNode, type BlockStatusExtent, type ChildEdge, type DriverInfo, type PointInTimeView, type SnapshotSource } from '@shear/block';

/**
 * Whatever its parents do (a fleecing export takes write to send discards), the view only
 * reads its filter: nothing it does writes the source.
 */
export const SNAPSHOT_ACCESS_INFO: DriverInfo = { name: 'snapshot-access', childPerms: () => ({ perm: PERM_CONSISTENT_READ, shared: PERM_ALL }) };

/**
 * QEMU's `snapshot-access`: the point-in-time view of the copy-before-write filter below it, as
 * a node that exports can serve. Reads see the disk as it was when the filter started; writes
 * are refused (EPERM); discard tells the filter the reader has those clusters (fleecing TRIM).
 */
export class SnapshotAccess implements BlockIO, PointInTimeView {
  readonly #cbw: SnapshotSource;

  /** @throws ERR_INVALID_ARGUMENT unless `file` is a copy-before-write node (a SnapshotSource) */
  constructor(file: ChildEdge) {
    const driver = file.child.isOpen ? file.child.driver : undefined;
    if (!isSnapshotSource(driver)) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open snapshot-access on node "${file.child.name}": it is not a copy-before-write filter`, { node: file.child.name });
    }
    this.#cbw = driver;
  }

  get filter(): SnapshotSource {
    return this.#cbw;
  }

  preservedDataNode(): BlockNode {
    return this.#cbw.targetEdge.child;
  }

  get length(): number {
    return this.#cbw.length;
  }

  read(offset: number, buf: Uint8Array): Promise<void> {
    return this.#cbw.snapshotRead(offset, buf);
  }

  async write(offset: number, buf: Uint8Array): Promise<void> {
    throw this.#readOnly('write', offset, buf.length);
  }

  async writeZeroes(offset: number, bytes: number): Promise<void> {
    throw this.#readOnly('write zeroes to', offset, bytes);
  }

  async discard(offset: number, bytes: number): Promise<void> {
    await this.#cbw.snapshotDiscard(offset, bytes);
  }

  async flush(): Promise<void> {}

  blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    return this.#cbw.snapshotBlockStatus(offset, bytes);
  }

  async close(): Promise<void> {}

  #readOnly(op: string, offset: number, bytes: number): ShearError {
    return new ShearError('ERR_READ_ONLY', `Cannot ${op} a snapshot-access node: the point-in-time view is read-only`, { offset, bytes, op, errno: 'EPERM' });
  }
}
