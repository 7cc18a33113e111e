// Shear's daemon or qemu-storage-daemon serving one disk over NBD, for the nbd benchmark: a
// file node "disk0" on the live image, an NBD server on a UNIX socket, a writable export "live"
// for the guest stand-in, and on request the fleecing graph (point-in-time view exported as
// "fleece") or a backup job. Each daemon is set up the way its own documentation does it:
//   Shear: live export on disk0 from the start; fleecing = blockdev-backup sync=none with
//          filter-node-name=cbw (the filter takes over disk0's parents, the live export among
//          them), snapshot-access on cbw, export of that.
//   QEMU 7.2: fleecing = blockdev-add copy-before-write {file: disk0, target: tmp} and
//          snapshot-access on it; the live export goes on the filter node (a blockdev-add'ed
//          filter takes over no parents, and it refuses other writers of disk0).
import { performance } from 'node:perf_hooks';
import { CopyFailure } from './copy-runner.js';
import { DaemonProcess, type DaemonKind } from './daemon-process.js';
import type { QmpClient } from './qmp-client.js';

export type { DaemonKind };

export interface NbdBenchDaemonOptions {
  kind: DaemonKind;
  /** The live image; disk0 opens it read-write. */
  image: string;
  /** Where the sockets go (short: UNIX socket paths are limited to 107 bytes). */
  socketDir: string;
  /** packages/cli/dist/main.js, for kind 'shear'. */
  shearCli: string;
}

export interface JobTiming {
  /** performance.now() just before blockdev-backup was sent. */
  startedAt: number;
  /** performance.now() when BLOCK_JOB_COMPLETED arrived. */
  completedAt: number;
  len: number;
}

export class NbdBenchDaemon {
  /** Every QMP command sent, for the results (what exactly was measured). */
  readonly log: string[] = [];
  private liveExported: boolean;

  private constructor(private readonly proc: DaemonProcess) {
    this.liveExported = proc.kind === 'shear';
  }

  static async start(o: NbdBenchDaemonOptions): Promise<NbdBenchDaemon> {
    const proc = await DaemonProcess.launch({
      kind: o.kind,
      socketDir: o.socketDir,
      shearCli: o.shearCli,
      args: (nbdSocket) => [
        '--blockdev', `driver=file,node-name=disk0,filename=${o.image}`,
        '--nbd-server', `addr.type=unix,addr.path=${nbdSocket}`,
        // QEMU's live export waits: its fleecing filter must take disk0 first (see startFleecing).
        ...(o.kind === 'shear' ? ['--export', 'type=nbd,id=live,node-name=disk0,name=live,writable=on'] : []),
      ],
    });
    return new NbdBenchDaemon(proc);
  }

  get kind(): DaemonKind { return this.proc.kind; }
  get qmp(): QmpClient { return this.proc.qmp; }
  get nbdSocket(): string { return this.proc.nbdSocket; }
  get command(): string { return this.proc.command; }
  get stderr(): string { return this.proc.stderr; }

  uri(exportName: 'live' | 'fleece'): string {
    return `nbd+unix:///${exportName}?socket=${this.nbdSocket}`;
  }

  /** Runs a QMP command, logging it; failures carry the daemon's stderr. */
  async cmd<T = unknown>(name: string, args?: Record<string, unknown>): Promise<T> {
    this.log.push(`${name} ${JSON.stringify(args ?? {})}`);
    try {
      return await this.qmp.execute<T>(name, args);
    } catch (err) {
      throw new CopyFailure(`${this.kind} daemon: ${(err as Error).message}${this.stderr ? `\n${this.stderr.trim()}` : ''}`);
    }
  }

  /** The live export on disk0 with no filter (QEMU adds it now; Shear has it from start-up). */
  async exposeLive(): Promise<void> {
    if (this.liveExported) return;
    await this.cmd('block-export-add', { type: 'nbd', id: 'live', 'node-name': 'disk0', name: 'live', writable: true });
    this.liveExported = true;
  }

  /**
   * The snapshot point: copy-before-write from disk0 into `tmpFile` (a sparse raw file of the
   * image's size), snapshot-access on the filter exported as "fleece", and the live export
   * writing through the filter.
   */
  async startFleecing(tmpFile: string): Promise<void> {
    await this.cmd('blockdev-add', { driver: 'file', 'node-name': 'tmp', filename: tmpFile });
    if (this.kind === 'shear') {
      await this.cmd('transaction', { actions: [{ type: 'blockdev-backup', data: { 'job-id': 'fleece', device: 'disk0', target: 'tmp', sync: 'none', 'filter-node-name': 'cbw' } }] });
      await this.cmd('blockdev-add', { driver: 'snapshot-access', 'node-name': 'snap', file: 'cbw' });
    } else {
      if (this.liveExported) throw new CopyFailure('Cannot start QEMU fleecing: the live export already holds disk0');
      await this.cmd('blockdev-add', { driver: 'copy-before-write', 'node-name': 'cbw', file: 'disk0', target: 'tmp' });
      await this.cmd('blockdev-add', { driver: 'snapshot-access', 'node-name': 'snap', file: 'cbw' });
      await this.cmd('block-export-add', { type: 'nbd', id: 'live', 'node-name': 'cbw', name: 'live', writable: true });
      this.liveExported = true;
    }
    await this.cmd('block-export-add', { type: 'nbd', id: 'fleece', 'node-name': 'snap', name: 'fleece' });
  }

  /**
   * Sends blockdev-backup sync=full of disk0 into node `target` (job-id bench0) and resolves when
   * the command returned, i.e. at the job's point in time (filter inserted); `done` then resolves
   * when the job completed, and fails unless it completed without error and copied its length.
   */
  async startBackup(target: string, maxWorkers?: number): Promise<{ startedAt: number; done: Promise<JobTiming> }> {
    const args: Record<string, unknown> = { 'job-id': 'bench0', device: 'disk0', target, sync: 'full' };
    if (maxWorkers !== undefined) args['x-perf'] = { 'max-workers': maxWorkers };
    const startedAt = performance.now();
    await this.cmd('blockdev-backup', args);
    const done = this.qmp.waitEvent(['BLOCK_JOB_COMPLETED', 'BLOCK_JOB_CANCELLED'], (e) => e.data['device'] === 'bench0').then(
      (e) => {
        if (e.event !== 'BLOCK_JOB_COMPLETED' || e.data['error'] !== undefined || e.data['offset'] !== e.data['len']) {
          throw new CopyFailure(`The ${this.kind} backup job ended badly: ${e.event} ${JSON.stringify(e.data)}`);
        }
        return { startedAt, completedAt: e.receivedAt, len: Number(e.data['len']) };
      },
      (err: Error) => {
        throw new CopyFailure(`${this.kind} backup job: ${err.message}${this.stderr ? `\n${this.stderr.trim()}` : ''}`);
      },
    );
    done.catch(() => {});
    return { startedAt, done };
  }

  /** startBackup() and wait for the job. */
  async backup(target: string, maxWorkers?: number): Promise<JobTiming> {
    return (await this.startBackup(target, maxWorkers)).done;
  }

  /** Sends quit and waits for the exit; kills the daemon if it has not gone within 15 s. */
  /** Stops the daemon; returns its peak RSS before quit, when known. */
  async close(): Promise<number | undefined> {
    return this.proc.close(15_000);
  }
}
