import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { QmpClient, type QmpEvent } from '@shear/qmp';
import { SHEAR_BIN } from './cli.js';

export interface DaemonHandle {
  proc: ChildProcess;
  qmp: QmpClient;
  socket: string;
  events: QmpEvent[];
  stderr: () => string;
  /** Runs a command; rejects with the QMP error. */
  cmd<T = unknown>(name: string, args?: Record<string, unknown>): Promise<T>;
  /** Sends quit and waits for the process to exit; returns its exit code. */
  stop(): Promise<number | null>;
  /** SIGKILL, for crash tests. */
  kill(): Promise<void>;
}

/** Starts `shear daemon` on a socket in `dir` and connects a QMP client to it. */
export async function startDaemon(_dir: string, extraArgs: string[] = [], opts: { name?: string } = {}): Promise<DaemonHandle> {
  // UNIX socket paths are limited to about 107 bytes: test directories are too deep for them.
  const sockDir = mkdtempSync(path.join(os.tmpdir(), 'shear-qmp-'));
  const socket = path.join(sockDir, `${opts.name ?? 'qmp'}.sock`);
  const proc = spawn(process.execPath, [SHEAR_BIN, 'daemon', '--qmp', `unix:${socket}`, '--log-level', process.env['SHEAR_TEST_LOG'] ?? 'warn', ...extraArgs], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (d) => {
    stderr += d;
    if (process.env['SHEAR_TEST_LOG']) process.stderr.write(d);
  });
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
  for (let i = 0; i < 200 && !existsSync(socket); i++) {
    if (proc.exitCode !== null) break;
    await new Promise((r) => setTimeout(r, 25));
  }
  if (!existsSync(socket)) {
    proc.kill('SIGKILL');
    throw new Error(`daemon did not start: ${stderr}`);
  }
  const qmp = await QmpClient.connect(socket);
  const events: QmpEvent[] = [];
  qmp.on('event', (e: QmpEvent) => events.push(e));
  return {
    proc,
    qmp,
    socket,
    events,
    stderr: () => stderr,
    cmd: (name, args) => qmp.execute(name, args),
    async stop() {
      if (proc.exitCode === null) {
        await qmp.execute('quit').catch(() => {});
        const timer = setTimeout(() => proc.kill('SIGKILL'), 15_000);
        const code = await exited;
        clearTimeout(timer);
        await qmp.close();
        rmSync(sockDir, { recursive: true, force: true });
        return code;
      }
      await qmp.close();
      rmSync(sockDir, { recursive: true, force: true });
      return proc.exitCode;
    },
    async kill() {
      proc.kill('SIGKILL');
      await exited;
      await qmp.close();
      rmSync(sockDir, { recursive: true, force: true });
    },
  };
}

/** Resolves with the job's final event (BLOCK_JOB_COMPLETED or BLOCK_JOB_CANCELLED). */
export function jobEnd(d: DaemonHandle, id: string, timeoutMs = 60_000): Promise<QmpEvent> {
  return new Promise((resolve, reject) => {
    const seen = d.events.find((e) => (e.event === 'BLOCK_JOB_COMPLETED' || e.event === 'BLOCK_JOB_CANCELLED') && e.data?.['device'] === id);
    if (seen) return resolve(seen);
    const timer = setTimeout(() => reject(new Error(`job ${id} did not end within ${timeoutMs} ms`)), timeoutMs);
    const on = (e: QmpEvent) => {
      if ((e.event === 'BLOCK_JOB_COMPLETED' || e.event === 'BLOCK_JOB_CANCELLED') && e.data?.['device'] === id) {
        clearTimeout(timer);
        d.qmp.off('event', on);
        resolve(e);
      }
    };
    d.qmp.on('event', on);
  });
}
