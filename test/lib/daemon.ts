import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { QmpClient, type QmpEvent } from '@shear/qmp';
import { SHEAR_BIN, childEnv } from './cli.js';

export interface DaemonHandle {
  proc: ChildProcess;
  qmp: QmpClient;
  socket: string;
  events: QmpEvent[];
  stderr: () => string;
  /** Runs a command; rejects with the QMP error. */
  cmd<T = unknown>(name: string, args?: Record<string, unknown>): Promise<T>;
  /**
   * Sends quit and waits for the process to exit; returns its exit code. Throws when the daemon
   * had to be killed (it did not exit within 15 s of quit), or when it had released every node
   * and job yet still held descriptors on files (see assertReleased).
   */
  stop(): Promise<number | null>;
  /** x-shear-query-resources: the daemon's descriptors, handles, worker pool, nodes and jobs. */
  resources(): Promise<DaemonResources>;
  /**
   * Asserts the daemon holds nothing of a test's: no nodes, no jobs, no descriptor on any file
   * (images, sidecars), no copy task in flight or queued. Call after dismissing the jobs and
   * deleting the exports and nodes.
   */
  assertReleased(): Promise<DaemonResources>;
  /** SIGKILL, for crash tests. */
  kill(): Promise<void>;
}

export interface DaemonResources {
  fds: { fd: number; target: string }[];
  /** Descriptors on regular files (not the daemon's own code). */
  files: string[];
  handles: Record<string, number>;
  pool: { workers: number; threads: number; 'in-flight': number; queued: number } | null;
  nodes: string[];
  jobs: string[];
}

/** What is left of a test's in the daemon, one line each; empty when everything was released. */
export function unreleased(r: DaemonResources): string[] {
  const left: string[] = [];
  if (r.nodes.length) left.push(`nodes still open: ${r.nodes.join(', ')}`);
  if (r.jobs.length) left.push(`jobs not dismissed: ${r.jobs.join(', ')}`);
  for (const f of r.files) left.push(`a descriptor on ${f} is still open`);
  if (r.pool && (r.pool['in-flight'] || r.pool.queued)) left.push(`copy tasks still in flight: ${r.pool['in-flight']} (${r.pool.queued} queued)`);
  return left;
}

/** Starts `shear daemon` on a socket in `dir` and connects a QMP client to it. */
export async function startDaemon(_dir: string, extraArgs: string[] = [], opts: { name?: string; env?: NodeJS.ProcessEnv } = {}): Promise<DaemonHandle> {
  // UNIX socket paths are limited to about 107 bytes: test directories are too deep for them.
  const sockDir = mkdtempSync(path.join(os.tmpdir(), 'shear-qmp-'));
  const socket = path.join(sockDir, `${opts.name ?? 'qmp'}.sock`);
  const proc = spawn(process.execPath, [SHEAR_BIN, 'daemon', '--qmp', `unix:${socket}`, '--log-level', process.env['SHEAR_TEST_LOG'] ?? 'warn', ...extraArgs], { stdio: ['ignore', 'ignore', 'pipe'], env: childEnv(opts.env) });
  let stderr = '';
  proc.stderr!.on('data', (d) => {
    stderr += d;
    if (process.env['SHEAR_TEST_LOG']) process.stderr.write(d);
  });
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
  // Waits for a state (the socket exists, or the process ended), not a time: on a loaded machine
  // a daemon can take far longer than usual to start. The bound only catches a hung start.
  const startBy = Date.now() + 120_000;
  while (!existsSync(socket) && proc.exitCode === null && proc.signalCode === null && Date.now() < startBy) {
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
    resources: () => qmp.execute<DaemonResources>('x-shear-query-resources'),
    async assertReleased() {
      const r = await qmp.execute<DaemonResources>('x-shear-query-resources');
      const left = unreleased(r);
      if (left.length) throw new Error(`the daemon did not release everything:\n  ${left.join('\n  ')}`);
      return r;
    },
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) {
        // A daemon whose test released every node and job must hold no file any more.
        const before = await qmp.execute<DaemonResources>('x-shear-query-resources').catch(() => undefined);
        const heldFiles = before && before.nodes.length === 0 && before.jobs.length === 0 ? unreleased(before) : [];
        await qmp.execute('quit').catch(() => {});
        let killed = false;
        const timer = setTimeout(() => {
          killed = true;
          proc.kill('SIGKILL');
        }, 15_000);
        const code = await exited;
        clearTimeout(timer);
        await qmp.close();
        rmSync(sockDir, { recursive: true, force: true });
        if (killed) throw new Error(`daemon ${proc.pid} did not exit within 15 s of quit and was killed; stderr:\n${stderr}`);
        if (heldFiles.length) throw new Error(`the daemon released every node and job but still held:\n  ${heldFiles.join('\n  ')}`);
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
