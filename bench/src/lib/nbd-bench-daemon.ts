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
import { spawn, type ChildProcess } from 'node:child_process';
import { rmSync } from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { CopyFailure } from './copy-runner.js';
import { QmpClient } from './qmp-client.js';

export type DaemonKind = 'shear' | 'qemu';

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

  private constructor(
    readonly kind: DaemonKind,
    readonly qmp: QmpClient,
    readonly nbdSocket: string,
    readonly command: string,
    private readonly child: ChildProcess,
    private readonly exited: Promise<void>,
    private readonly sockets: string[],
    private readonly stderrText: () => string,
  ) {
    this.liveExported = kind === 'shear';
  }

  static async start(o: NbdBenchDaemonOptions): Promise<NbdBenchDaemon> {
    const qmpSocket = path.join(o.socketDir, `${o.kind}-qmp.sock`);
    const nbdSocket = path.join(o.socketDir, `${o.kind}-nbd.sock`);
    for (const s of [qmpSocket, nbdSocket]) {
      if (Buffer.byteLength(s) > 107) throw new CopyFailure(`Cannot start the ${o.kind} daemon: socket path "${s}" is too long for a UNIX socket`);
      rmSync(s, { force: true });
    }
    const disk = ['--blockdev', `driver=file,node-name=disk0,filename=${o.image}`, '--nbd-server', `addr.type=unix,addr.path=${nbdSocket}`];
    let cmd: string;
    let args: string[];
    if (o.kind === 'shear') {
      cmd = process.execPath;
      args = [o.shearCli, 'daemon', '--qmp', `unix:${qmpSocket}`, ...disk, '--export', 'type=nbd,id=live,node-name=disk0,name=live,writable=on', '--log-level', 'warn'];
    } else {
      cmd = 'qemu-storage-daemon';
      args = ['--chardev', `socket,id=qmp0,path=${qmpSocket},server=on,wait=off`, '--monitor', 'chardev=qmp0', ...disk];
    }
    const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr!.setEncoding('utf8').on('data', (d: string) => { stderr += d; });
    // 'exit' may not follow a spawn 'error', so either ends the wait.
    const exited = new Promise<void>((resolve) => { child.once('exit', () => resolve()); child.once('error', () => resolve()); });
    const failed = new Promise<never>((_, reject) => {
      child.once('error', (err) => reject(new CopyFailure(`Cannot start the ${o.kind} daemon: ${err.message}`)));
      child.once('exit', (code, signal) => reject(new CopyFailure(`The ${o.kind} daemon exited during start-up (${code ?? signal}): ${stderr.trim()}`)));
    });
    failed.catch(() => {});
    const shown = o.kind === 'shear' ? ['node', 'packages/cli/dist/main.js', ...args.slice(1)].join(' ') : [cmd, ...args].join(' ');
    try {
      const qmp = await Promise.race([QmpClient.connect(qmpSocket, 30_000), failed]);
      return new NbdBenchDaemon(o.kind, qmp, nbdSocket, shown, child, exited, [qmpSocket, nbdSocket], () => stderr);
    } catch (err) {
      child.kill('SIGKILL');
      await exited;
      for (const s of [qmpSocket, nbdSocket]) rmSync(s, { force: true });
      throw err instanceof CopyFailure ? err : new CopyFailure(`Cannot start the ${o.kind} daemon: ${(err as Error).message}\n${stderr.trim()}`);
    }
  }

  get stderr(): string {
    return this.stderrText();
  }

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
  async close(): Promise<void> {
    await this.qmp.execute('quit').catch(() => {});
    this.qmp.close();
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 15_000);
    await this.exited;
    clearTimeout(timer);
    for (const s of this.sockets) rmSync(s, { force: true });
  }
}
