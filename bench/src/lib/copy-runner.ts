// Running, timing and checking one copy: child processes, page-cache control, fsync of the
// target, verification, and QEMU's backup job in a qemu-storage-daemon driven over QMP.
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { closeSync, fsyncSync, openSync, readSync, rmSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { processPeakRss, withPeakRss } from './peak-rss.js';
import { QmpClient } from './qmp-client.js';

/** A copy that did not finish: the command, its exit and the end of what it printed. */
export class CopyFailure extends Error {}

export interface Timed {
  /** performance.now() when the copy was started (command spawned, or job command sent). */
  startedAt: number;
  /** performance.now() when the copy ended (process exited, or job completed and target closed). */
  endedAt: number;
  /** Anything the tool reported about itself (Shear's JSON summary, the job's event). */
  report?: Record<string, unknown>;
  /** The process's peak RSS (GNU time), or the daemon's high-water mark, when known. */
  peakRssBytes?: number;
}

export interface CommandResult { code: number | null; signal: string | null; stdout: string; stderr: string; startedAt: number; endedAt: number }

export function runCommand(cmd: string, args: string[], timeoutMs = 30 * 60_000): Promise<CommandResult> {
  return new Promise((resolve, reject) => {
    const startedAt = performance.now();
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => { stdout += d; });
    child.stderr.setEncoding('utf8').on('data', (d: string) => { stderr += d; });
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.once('error', (err) => { clearTimeout(timer); reject(err); });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, startedAt, endedAt: performance.now() });
    });
  });
}

export function commandLine(cmd: string, args: string[]): string {
  return [cmd, ...args].map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`)).join(' ');
}

/**
 * Runs a copy command and fails unless it exits 0. Its peak RSS is measured with GNU time, whose
 * own start-up (a fork and an exec, about a millisecond) falls inside the timed window.
 */
export async function timedCommand(cmd: string, args: string[]): Promise<Timed> {
  const w = withPeakRss(cmd, args);
  const r = await runCommand(w.cmd, w.args);
  const peakRssBytes = w.read();
  if (r.code !== 0) {
    const tail = (r.stderr + r.stdout).trim().split('\n').slice(-8).join('\n');
    throw new CopyFailure(`${commandLine(cmd, args)} exited with ${r.code ?? r.signal}:\n${tail}`);
  }
  return { startedAt: r.startedAt, endedAt: r.endedAt, report: lastJsonLine(r.stdout), ...(peakRssBytes ? { peakRssBytes } : {}) };
}

function lastJsonLine(stdout: string): Record<string, unknown> | undefined {
  const line = stdout.trim().split('\n').pop();
  if (!line?.startsWith('{')) return undefined;
  try {
    return JSON.parse(line) as Record<string, unknown>;
  } catch {
    return undefined;
  }
}

/** Opens and fsyncs a file; returns the milliseconds it took. */
export function fsyncFile(file: string): number {
  const t0 = performance.now();
  const fd = openSync(file, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  return performance.now() - t0;
}

export function syncAll(): void {
  execFileSync('sync');
}

/** Writes dirty pages back and drops the page cache (needs root). */
export function dropCaches(): void {
  syncAll();
  writeFileSync('/proc/sys/vm/drop_caches', '3');
}

export function canDropCaches(): boolean {
  try {
    writeFileSync('/proc/sys/vm/drop_caches', '1');
    return true;
  } catch {
    return false;
  }
}

/** Reads the whole file so it sits in the page cache. */
export function warmFile(file: string): void {
  const buf = Buffer.allocUnsafe(8 * 2 ** 20);
  const fd = openSync(file, 'r');
  try {
    let pos = 0;
    for (let n = readSync(fd, buf, 0, buf.length, pos); n > 0; n = readSync(fd, buf, 0, buf.length, pos)) pos += n;
  } finally {
    closeSync(fd);
  }
}

/** Percentage of the file's pages in the page cache (fincore), or NaN when it cannot tell. */
export function cachedPercent(file: string): number {
  try {
    const res = Number(execFileSync('fincore', ['--bytes', '--noheadings', '--output', 'RES', file], { encoding: 'utf8' }).trim());
    return (100 * res) / Math.max(1, statSync(file).size);
  } catch {
    return NaN;
  }
}

export type Verdict = 'ok' | 'MISMATCH' | 'ERROR';

/** Compares the target's content with the source: cmp for raw, qemu-img compare for qcow2. */
export async function verifyCopy(src: string, dst: string, format: 'raw' | 'qcow2'): Promise<{ verdict: Verdict; detail: string }> {
  const r = format === 'raw'
    ? await runCommand('cmp', [src, dst])
    : await runCommand('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', src, dst]);
  const detail = (r.stdout + r.stderr).trim();
  if (r.code === 0) return { verdict: 'ok', detail };
  return { verdict: r.code === 1 ? 'MISMATCH' : 'ERROR', detail: detail || `exit ${r.code ?? r.signal}` };
}

export interface QsdBackupOptions {
  source: string;
  /** An existing target of the source's size: a sparse raw file or a qcow2 made by qemu-img. */
  target: string;
  targetFormat: 'raw' | 'qcow2';
  /** Where the QMP socket goes. */
  workDir: string;
  maxWorkers?: number;
  compress?: boolean;
}

/**
 * QEMU's own backup job (blockdev-backup sync=full) in a fresh qemu-storage-daemon. Times from
 * sending blockdev-backup until the completion event and the target's node is closed
 * (blockdev-del, which writes qcow2 metadata back); daemon start-up and graph setup are not
 * timed. Fails if the job reports an error or did not copy its whole length.
 */
export async function qsdBackup(o: QsdBackupOptions): Promise<Timed> {
  const socket = path.join(o.workDir, 'qsd-qmp.sock');
  if (Buffer.byteLength(socket) > 107) throw new CopyFailure(`Cannot start qemu-storage-daemon: socket path "${socket}" is too long for a UNIX socket (set BENCH_DIR shorter)`);
  rmSync(socket, { force: true });
  const daemon: ChildProcess = spawn('qemu-storage-daemon', ['--chardev', `socket,id=qmp0,path=${socket},server=on,wait=off`, '--monitor', 'chardev=qmp0'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  daemon.stderr!.setEncoding('utf8').on('data', (d: string) => { stderr += d; });
  // 'exit' may not follow a spawn 'error', so either ends the wait.
  const exited = new Promise<void>((resolve) => { daemon.once('exit', () => resolve()); daemon.once('error', () => resolve()); });
  const spawnError = new Promise<never>((_, reject) => daemon.once('error', (err) => reject(new CopyFailure(`Cannot start qemu-storage-daemon: ${err.message}`))));
  spawnError.catch(() => {});
  let qmp: QmpClient | undefined;
  try {
    qmp = await Promise.race([QmpClient.connect(socket), spawnError]);
    await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'src', filename: o.source, 'read-only': true });
    const file = { driver: 'file', filename: o.target };
    await qmp.execute('blockdev-add', o.targetFormat === 'raw' ? { ...file, 'node-name': 'tgt' } : { driver: 'qcow2', 'node-name': 'tgt', file });
    const args: Record<string, unknown> = { 'job-id': 'bench0', device: 'src', target: 'tgt', sync: 'full' };
    if (o.compress) args['compress'] = true;
    if (o.maxWorkers !== undefined) args['x-perf'] = { 'max-workers': o.maxWorkers };
    const startedAt = performance.now();
    await qmp.execute('blockdev-backup', args);
    const done = await qmp.waitEvent(['BLOCK_JOB_COMPLETED', 'BLOCK_JOB_CANCELLED'], (e) => e.data['device'] === 'bench0');
    if (done.event !== 'BLOCK_JOB_COMPLETED' || done.data['error'] !== undefined || done.data['offset'] !== done.data['len']) {
      throw new CopyFailure(`QEMU backup job ended badly: ${done.event} ${JSON.stringify(done.data)}`);
    }
    await qmp.execute('blockdev-del', { 'node-name': 'tgt' });
    const endedAt = performance.now();
    const peakRssBytes = processPeakRss(daemon.pid);
    return { startedAt, endedAt, ...(peakRssBytes ? { peakRssBytes } : {}), report: { jobSeconds: (done.receivedAt - startedAt) / 1000, len: done.data['len'], qmp: JSON.stringify(args) } };
  } catch (err) {
    if (err instanceof CopyFailure) throw err;
    throw new CopyFailure(`QEMU backup job failed: ${(err as Error).message}${stderr ? `\nqemu-storage-daemon: ${stderr.trim()}` : ''}`);
  } finally {
    if (qmp) {
      await qmp.execute('quit').catch(() => {});
      qmp.close();
    }
    const timer = setTimeout(() => daemon.kill('SIGKILL'), qmp ? 10_000 : 0);
    await exited;
    clearTimeout(timer);
    rmSync(socket, { force: true });
  }
}
