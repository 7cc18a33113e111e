// The process side of a benchmark's block daemon, Shear's (`shear daemon`) or QEMU's
// (qemu-storage-daemon): sockets, spawn, QMP connect, stop. The benches' daemon classes add
// what they do with it (fill bitmaps, fleecing graphs, backup jobs).
import { spawn, type ChildProcess } from 'node:child_process';
import { rmSync } from 'node:fs';
import path from 'node:path';
import { CopyFailure } from './copy-runner.js';
import { processPeakRss } from './peak-rss.js';
import { QmpClient } from './qmp-client.js';

export type DaemonKind = 'shear' | 'qemu';

export interface DaemonLaunch {
  kind: DaemonKind;
  /** Where the sockets go (kept short: UNIX socket paths are limited to 107 bytes). */
  socketDir: string;
  /** packages/cli/dist/main.js; needed for kind 'shear'. */
  shearCli?: string | undefined;
  /** The daemon's arguments after its QMP monitor, given the NBD server's socket path. */
  args: (nbdSocket: string) => string[];
}

/** One running daemon process; close() stops it on every path (quit, then SIGKILL). */
export class DaemonProcess {
  private constructor(
    readonly kind: DaemonKind,
    readonly qmp: QmpClient,
    readonly nbdSocket: string,
    /** The command line as a reader would rerun it (for the results). */
    readonly command: string,
    private readonly child: ChildProcess,
    private readonly exited: Promise<void>,
    private readonly sockets: string[],
    private readonly stderrText: () => string,
  ) {}

  static async launch(o: DaemonLaunch): Promise<DaemonProcess> {
    const qmpSocket = path.join(o.socketDir, `${o.kind}-qmp.sock`);
    const nbdSocket = path.join(o.socketDir, `${o.kind}-nbd.sock`);
    const sockets = [qmpSocket, nbdSocket];
    for (const s of sockets) {
      if (Buffer.byteLength(s) > 107) throw new CopyFailure(`Cannot start the ${o.kind} daemon: socket path "${s}" is too long for a UNIX socket (set BENCH_DIR shorter)`);
      rmSync(s, { force: true });
    }
    let cmd: string;
    let args: string[];
    if (o.kind === 'shear') {
      if (!o.shearCli) throw new CopyFailure('Cannot start the Shear daemon: no CLI path given');
      cmd = process.execPath;
      args = [o.shearCli, 'daemon', '--qmp', `unix:${qmpSocket}`, '--log-level', 'warn', ...o.args(nbdSocket)];
    } else {
      cmd = 'qemu-storage-daemon';
      args = ['--chardev', `socket,id=qmp0,path=${qmpSocket},server=on,wait=off`, '--monitor', 'chardev=qmp0', ...o.args(nbdSocket)];
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
    const shown = [o.kind === 'shear' ? 'node packages/cli/dist/main.js' : cmd, ...args.slice(o.kind === 'shear' ? 1 : 0)].join(' ');
    try {
      const qmp = await Promise.race([QmpClient.connect(qmpSocket, 30_000), failed]);
      return new DaemonProcess(o.kind, qmp, nbdSocket, shown, child, exited, sockets, () => stderr);
    } catch (err) {
      child.kill('SIGKILL');
      await exited;
      for (const s of sockets) rmSync(s, { force: true });
      throw err instanceof CopyFailure ? err : new CopyFailure(`Cannot start the ${o.kind} daemon: ${(err as Error).message}\n${stderr.trim()}`);
    }
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  /** The daemon's peak RSS so far (VmHWM), in bytes; read it before close(). */
  peakRssBytes(): number | undefined {
    return processPeakRss(this.child.pid);
  }

  get stderr(): string {
    return this.stderrText();
  }

  /** Stops the daemon; returns its peak RSS (VmHWM) as it was just before quit, when known. */
  async close(graceMs = 15_000): Promise<number | undefined> {
    const peak = this.peakRssBytes();
    await this.qmp.execute('quit').catch(() => {});
    this.qmp.close();
    const timer = setTimeout(() => this.child.kill('SIGKILL'), graceMs);
    await this.exited;
    clearTimeout(timer);
    for (const s of this.sockets) rmSync(s, { force: true });
    return peak;
  }
}
