import { mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startDaemon, type DaemonHandle, type DaemonResources } from '../lib/daemon.js';
import { makeRawImage } from '../lib/images.js';

export const DISK_BYTES = 8 * 2 ** 20;
export const RO_BYTES = 4 * 2 ** 20;

/** The exports the NBD lanes use; none of these names appears in a QMP seed. */
export const EXPORTS = {
  live: { name: 'live', writable: true, fleecing: false, size: DISK_BYTES },
  ro: { name: 'ro', writable: false, fleecing: false, size: RO_BYTES },
  pull: { name: 'pull', writable: false, fleecing: true, size: DISK_BYTES, bitmap: 'b0' },
} as const;
export type ExportKey = keyof typeof EXPORTS;

export interface Memory {
  rssBytes: number;
  hwmBytes: number;
  heapUsedBytes?: number;
  heapTotalBytes?: number;
}

/**
 * A real daemon set up as a user of pull backups would: a live disk exported writable, a second
 * disk exported read-only, and a fleecing (snapshot-access) export of the live disk's
 * point-in-time view with the bitmap of changes. Owns the daemon and its directories.
 */
export class FuzzEnv {
  readonly d: DaemonHandle;
  readonly dir: string;
  readonly nbdSock: string;
  readonly #sockDir: string;
  /** Names of the nodes, bitmaps and exports that exist before any input. */
  baseline!: { nodes: string[]; exports: string[]; bitmaps: string[] };

  private constructor(d: DaemonHandle, dir: string, sockDir: string) {
    this.d = d;
    this.dir = dir;
    this.#sockDir = sockDir;
    this.nbdSock = path.join(sockDir, 'nbd.sock');
  }

  static async start(): Promise<FuzzEnv> {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'shear-fuzz-'));
    const sockDir = mkdtempSync(path.join(os.tmpdir(), 'shear-fuzz-s-'));
    const disk = path.join(dir, 'disk.raw');
    const ro = path.join(dir, 'ro.raw');
    const tmp = path.join(dir, 'fleece.tmp');
    makeRawImage(disk, DISK_BYTES, 71);
    makeRawImage(ro, RO_BYTES, 72);
    writeFileSync(tmp, '');
    truncateSync(tmp, DISK_BYTES);
    let d: DaemonHandle;
    try {
      d = await startDaemon(dir, [
        '--blockdev', `driver=file,node-name=disk0,filename=${disk}`,
        '--blockdev', `driver=file,node-name=ro0,filename=${ro}`,
        '--blockdev', 'driver=null-co,node-name=scratch0,size=4194304',
        '--allow-dir', dir,
      ], { name: 'fuzz' });
    } catch (err) {
      rmSync(dir, { recursive: true, force: true });
      rmSync(sockDir, { recursive: true, force: true });
      throw err;
    }
    const env = new FuzzEnv(d, dir, sockDir);
    try {
      await d.cmd('nbd-server-start', { addr: { type: 'unix', path: env.nbdSock } });
      await d.cmd('block-dirty-bitmap-add', { node: 'disk0', name: 'b0' });
      await d.cmd('block-export-add', { type: 'nbd', id: 'fz-live', 'node-name': 'disk0', name: 'live', writable: true });
      await d.cmd('block-export-add', { type: 'nbd', id: 'fz-ro', 'node-name': 'ro0', name: 'ro' });
      await d.cmd('blockdev-add', { driver: 'file', 'node-name': 'tmp', filename: tmp });
      await d.cmd('transaction', {
        actions: [
          { type: 'block-dirty-bitmap-disable', data: { node: 'disk0', name: 'b0' } },
          { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'b1' } },
          { type: 'blockdev-backup', data: { 'job-id': 'fz-fleece', device: 'disk0', target: 'tmp', sync: 'none', 'filter-node-name': 'cbw' } },
        ],
      });
      await d.cmd('blockdev-add', { driver: 'snapshot-access', 'node-name': 'snap', file: 'cbw' });
      await d.cmd('block-export-add', { type: 'nbd', id: 'fz-pull', 'node-name': 'snap', name: 'pull', bitmaps: [{ node: 'disk0', name: 'b0' }] });
      env.baseline = await env.state();
    } catch (err) {
      await env.close().catch(() => {});
      throw err;
    }
    return env;
  }

  get pid(): number {
    return this.d.proc.pid!;
  }

  get alive(): boolean {
    return this.d.proc.exitCode === null && this.d.proc.signalCode === null;
  }

  /** VmRSS and VmHWM from /proc, the V8 heap from x-shear-query-resources when it tells. */
  async memory(): Promise<Memory> {
    const status = readFileSync(`/proc/${this.pid}/status`, 'utf8');
    const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? 0) * 1024;
    const r = (await this.d.resources()) as DaemonResources & { memory?: { heapUsed: number; heapTotal: number } };
    return { rssBytes: kb('VmRSS'), hwmBytes: kb('VmHWM'), heapUsedBytes: r.memory?.heapUsed, heapTotalBytes: r.memory?.heapTotal };
  }

  /** Sockets the daemon holds (QMP and NBD listeners and connections). */
  async socketFds(): Promise<number> {
    const r = await this.d.resources();
    return r.fds.filter((f) => f.target.startsWith('socket:')).length;
  }

  async state(): Promise<{ nodes: string[]; exports: string[]; bitmaps: string[] }> {
    const nodes = await this.d.cmd<{ 'node-name': string; 'dirty-bitmaps'?: { name: string }[] }[]>('query-named-block-nodes');
    const exports = await this.d.cmd<{ id: string }[]>('query-block-exports');
    return {
      nodes: nodes.map((n) => n['node-name']).sort(),
      exports: exports.map((e) => e.id).sort(),
      bitmaps: nodes.flatMap((n) => (n['dirty-bitmaps'] ?? []).map((b) => `${n['node-name']}/${b.name}`)).sort(),
    };
  }

  /**
   * Removes what accepted inputs created (bitmaps, exports, nodes, jobs), so the memory figure
   * after the campaign compares like with like. Returns what was removed.
   */
  async removeCreated(): Promise<string[]> {
    const removed: string[] = [];
    const now = await this.state();
    for (const id of now.exports.filter((e) => !this.baseline.exports.includes(e))) {
      await this.d.cmd('block-export-del', { id, mode: 'hard' }).then(() => removed.push(`export ${id}`), () => {});
    }
    for (const j of (await this.d.resources()).jobs.filter((j) => j !== 'fz-fleece')) {
      await this.d.cmd('job-cancel', { id: j }).catch(() => {});
      await this.d.cmd('job-dismiss', { id: j }).then(() => removed.push(`job ${j}`), () => {});
    }
    for (const b of now.bitmaps.filter((b) => !this.baseline.bitmaps.includes(b))) {
      const [node, name] = [b.slice(0, b.indexOf('/')), b.slice(b.indexOf('/') + 1)];
      await this.d.cmd('block-dirty-bitmap-remove', { node, name }).then(() => removed.push(`bitmap ${b}`), () => {});
    }
    for (const n of now.nodes.filter((n) => !this.baseline.nodes.includes(n))) {
      await this.d.cmd('blockdev-del', { 'node-name': n }).then(() => removed.push(`node ${n}`), () => {});
    }
    return removed;
  }

  /** Takes the pull setup apart and quits; returns the daemon's exit code. */
  async close(): Promise<number | null> {
    try {
      if (this.alive) {
        await this.d.cmd('block-export-del', { id: 'fz-pull' }).catch(() => {});
        await this.d.cmd('block-export-del', { id: 'fz-live' }).catch(() => {});
        await this.d.cmd('block-export-del', { id: 'fz-ro' }).catch(() => {});
      }
      return await this.d.stop();
    } finally {
      rmSync(this.dir, { recursive: true, force: true });
      rmSync(this.#sockDir, { recursive: true, force: true });
    }
  }
}
