// A point-in-time NBD export of a running QEMU's disk, set up through that QEMU's own QMP the way
// backup tools do it, in either of QEMU's two fleecing schemes:
// - 'backing-overlay': blockdev-backup sync=none into a qcow2 whose backing is the live disk; the
//   export reads the overlay (libvirt's scheme);
// - 'snapshot-access': blockdev-backup sync=none with a copy-before-write filter node, and a
//   snapshot-access node over that filter as the export (QEMU 7.0's scheme; it takes NBD TRIM).
// The dirty bitmap of the previous backup is frozen and exported in the same transaction that
// starts the next one, so that bitmap and view describe one point in time.
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import type { QmpClient } from '@shear/qmp';

export type FleeceScheme = 'backing-overlay' | 'snapshot-access';

export interface FleeceOptions {
  /** The disk's format node (the one the guest's device uses). */
  node: string;
  /** Its size in bytes. */
  size: number;
  scheme: FleeceScheme;
  /** Directory for the scratch image. */
  dir: string;
  /** A short tag naming this backup's nodes, job and export. */
  tag: string;
  /** Bitmap started at this point: it tracks the writes for the next incremental. */
  nextBitmap: string;
  /** Bitmap of the writes since the previous backup: frozen here and exported (an incremental). */
  bitmap?: string;
  /** A writable export takes NBD TRIM (seed 002); the view itself never changes. */
  writable?: boolean;
}

export interface FleeceExport {
  /** The export's name on the VM's NBD server. */
  name: string;
  /** The bitmap the export carries (meta context `qemu:dirty-bitmap:NAME`), if any. */
  bitmap: string | undefined;
  /**
   * Deletes the export, the snapshot node, the fleecing job and the scratch node, and removes
   * the exported bitmap (its changes are in this backup now). Idempotent.
   */
  end(): Promise<void>;
}

/** Starts the VM's NBD server on a UNIX socket (once per VM). */
export async function startNbdServer(qmp: QmpClient, socket: string): Promise<void> {
  await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: socket } } });
}

/** Adds the first dirty bitmap, before the full backup's point in time is taken. */
export async function addBitmap(qmp: QmpClient, node: string, name: string): Promise<void> {
  await qmp.execute('block-dirty-bitmap-add', { node, name });
}

/**
 * Sets up the export. Call while the VM is paused when the test needs to copy the disk at exactly
 * this point; the VM may run again as soon as this resolves.
 */
export async function startFleece(qmp: QmpClient, o: FleeceOptions): Promise<FleeceExport> {
  const scratch = path.join(o.dir, `fleece-${o.tag}.qcow2`);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', scratch, String(o.size)]);
  const tmpNode = `fleece-${o.tag}`;
  const job = `fleece-job-${o.tag}`;
  const filter = `cbw-${o.tag}`;
  const snap = `snap-${o.tag}`;
  const tmp: Record<string, unknown> = { driver: 'qcow2', 'node-name': tmpNode, file: { driver: 'file', filename: scratch } };
  if (o.scheme === 'backing-overlay') tmp['backing'] = o.node;
  await qmp.execute('blockdev-add', tmp);
  const added: string[] = [tmpNode];
  let jobStarted = false;
  let exportAdded = false;
  let frozen = false;
  const end = async (): Promise<void> => {
    if (exportAdded) {
      const deleted = qmp.waitEvent('BLOCK_EXPORT_DELETED', (e) => e['id'] === o.tag, { timeoutMs: 30_000 });
      await qmp.execute('block-export-del', { id: o.tag });
      await deleted;
      exportAdded = false;
    }
    if (added.includes(snap)) {
      await qmp.execute('blockdev-del', { 'node-name': snap });
      added.splice(added.indexOf(snap), 1);
    }
    if (jobStarted) {
      const gone = qmp.waitEvent('JOB_STATUS_CHANGE', (e) => e['id'] === job && e['status'] === 'null', { timeoutMs: 30_000 });
      await qmp.execute('job-cancel', { id: job });
      await gone;
      jobStarted = false;
    }
    if (added.includes(tmpNode)) {
      await qmp.execute('blockdev-del', { 'node-name': tmpNode });
      added.splice(added.indexOf(tmpNode), 1);
    }
    if (frozen && o.bitmap) {
      await qmp.execute('block-dirty-bitmap-remove', { node: o.node, name: o.bitmap });
      frozen = false;
    }
  };
  try {
    const actions: Record<string, unknown>[] = [];
    if (o.bitmap) actions.push({ type: 'block-dirty-bitmap-disable', data: { node: o.node, name: o.bitmap } });
    actions.push({ type: 'block-dirty-bitmap-add', data: { node: o.node, name: o.nextBitmap } });
    const backup: Record<string, unknown> = { 'job-id': job, device: o.node, target: tmpNode, sync: 'none', 'auto-finalize': true, 'auto-dismiss': true };
    if (o.scheme === 'snapshot-access') backup['filter-node-name'] = filter;
    actions.push({ type: 'blockdev-backup', data: backup });
    await qmp.execute('transaction', { actions });
    jobStarted = true;
    frozen = true;
    let exportNode = tmpNode;
    if (o.scheme === 'snapshot-access') {
      await qmp.execute('blockdev-add', { driver: 'snapshot-access', 'node-name': snap, file: filter });
      added.push(snap);
      exportNode = snap;
    }
    await qmp.execute('block-export-add', {
      type: 'nbd', id: o.tag, 'node-name': exportNode, name: o.tag, writable: o.writable ?? false,
      ...(o.bitmap ? { bitmaps: [{ node: o.node, name: o.bitmap }] } : {}),
    });
    exportAdded = true;
  } catch (err) {
    await end().catch(() => undefined);
    throw err;
  }
  let ended: Promise<void> | undefined;
  return { name: o.tag, bitmap: o.bitmap, end: () => (ended ??= end()) };
}
