// A remote-looking NBD target: nbdkit's file plugin on a UNIX socket, with its delay filter adding
// a fixed latency to every read and write (rdelay/wdelay; nbdkit-delay-filter(1)).
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { CopyFailure } from './copy-runner.js';

export interface NbdkitTargetOptions {
  /** The file served (must exist, of the wanted size). */
  file: string;
  socket: string;
  /** Added to every read and write; 0 serves without the delay filter. */
  delayMs: number;
}

/** One nbdkit process in the foreground; owns it until stop(). */
export class NbdkitTarget {
  private constructor(private readonly child: ChildProcess, private readonly exited: Promise<void>, readonly socket: string, readonly command: string, private readonly pidFile: string) {}

  /** Starts nbdkit and resolves once it listens (it writes its PID file only then). */
  static async start(o: NbdkitTargetOptions): Promise<NbdkitTarget> {
    const pidFile = `${o.socket}.pid`;
    rmSync(pidFile, { force: true });
    rmSync(o.socket, { force: true });
    const delay = o.delayMs > 0 ? ['--filter=delay'] : [];
    const params = o.delayMs > 0 ? [`rdelay=${o.delayMs}ms`, `wdelay=${o.delayMs}ms`] : [];
    const args = ['-f', '-U', o.socket, '-P', pidFile, ...delay, 'file', `file=${o.file}`, ...params];
    const child = spawn('nbdkit', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr!.setEncoding('utf8').on('data', (d: string) => { stderr += d; });
    const exited = new Promise<void>((resolve) => { child.once('exit', () => resolve()); child.once('error', () => resolve()); });
    let gone = false;
    void exited.then(() => { gone = true; });
    const t = new NbdkitTarget(child, exited, o.socket, ['nbdkit', ...args].join(' '), pidFile);
    for (let i = 0; i < 500 && !gone; i++) {
      if (existsSync(pidFile) && readFileSync(pidFile, 'utf8').trim() !== '') return t;
      await new Promise((r) => setTimeout(r, 20));
    }
    await t.stop();
    throw new CopyFailure(`Cannot start nbdkit (${t.command}): ${stderr.trim() || 'no PID file within 10 s'}`);
  }

  async stop(): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 10_000);
    await this.exited;
    clearTimeout(timer);
    rmSync(this.pidFile, { force: true });
    rmSync(this.socket, { force: true });
  }
}
