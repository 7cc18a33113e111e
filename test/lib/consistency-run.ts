import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { startDaemon } from './daemon.js';
import { makeRawImage, qemuImg } from './images.js';
import { Writer, awaitJob, clusterHashes, imageBytes, mismatches } from './consistency.js';

const run = promisify(execFile);

export interface ConsistencyParams {
  dir: string;
  seed: number;
  sizeBytes: number;
  workers: number;
  /** Bitmap granularity; block-copy's cluster is max(64 KiB, target cluster). */
  granularity: number;
  /** Backup speed in bytes/s, so that the writer overlaps the copy. */
  speed: number;
}

export interface ConsistencyReport {
  backups: number;
  writes: number;
  bytesChecked: number;
  mismatchedClusters: number;
  /** Chunks the fleecing cache spilled to its file, and guest writes that waited for space. */
  cacheSpills: number;
  cacheWaits: number;
  details: string[];
}

/**
 * One round of the point-in-time check under load: a guest writes random data through the
 * writable export the whole time, while Shear takes (1) a full push backup, (2) an incremental
 * on top of it, (3) a pull backup of the fleecing export with nbdcopy, and (4) a slow backup
 * drained from a small fleecing cache (full: guest writes wait for space). For each, the guest
 * is paused at the start point just long enough to hash every cluster of the disk, an
 * independent record of what the backup must hold; the backup is then compared with it.
 */
export async function consistencyRound(p: ConsistencyParams): Promise<ConsistencyReport> {
  const report: ConsistencyReport = { backups: 0, writes: 0, bytesChecked: 0, mismatchedClusters: 0, cacheSpills: 0, cacheWaits: 0, details: [] };
  const sockDir = mkdtempSync(path.join(os.tmpdir(), 'shear-cons-'));
  const nbdSock = path.join(sockDir, 'nbd.sock');
  const disk = path.join(p.dir, 'disk.raw');
  makeRawImage(disk, p.sizeBytes, p.seed);
  const d = await startDaemon(p.dir, [
    '--workers', String(p.workers),
    '--blockdev', `driver=file,node-name=disk0,filename=${disk}`,
    '--nbd-server', `addr.type=unix,addr.path=${nbdSock}`,
    '--export', 'type=nbd,id=live,node-name=disk0,name=live,writable=on',
  ]);
  const writer = new Writer(`nbd+unix:///live?socket=${nbdSock}`, p.seed);
  const check = async (label: string, bytes: Buffer, expected: string[]) => {
    const bad = mismatches(expected, bytes);
    report.backups++;
    report.bytesChecked += bytes.length;
    report.mismatchedClusters += bad.length;
    if (bad.length) report.details.push(`${label}: ${bad.length} clusters differ (first ${bad.slice(0, 5).join(', ')})`);
  };
  try {
    const target = (name: string, format: 'raw' | 'qcow2', backing?: string) => {
      const file = path.join(p.dir, `${name}.${format}`);
      if (backing) qemuImg('create', '-q', '-f', 'qcow2', '-b', backing, '-F', 'raw', file, String(p.sizeBytes));
      else qemuImg('create', '-q', '-f', format, file, String(p.sizeBytes));
      return file;
    };
    // (1) full push backup + the bitmap for the next incremental, at one point in time.
    const full = target('full', 'raw');
    await d.cmd('blockdev-add', { driver: 'file', 'node-name': 'full', filename: full });
    await new Promise((r) => setTimeout(r, 200));
    await writer.pause();
    const atFull = clusterHashes(readFileSync(disk));
    await d.cmd('transaction', {
      actions: [
        { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'b0', granularity: p.granularity } },
        { type: 'blockdev-backup', data: { 'job-id': 'full', device: 'disk0', target: 'full', sync: 'full', speed: p.speed } },
      ],
    });
    writer.resume();
    await awaitJob(d, 'full');
    await d.cmd('blockdev-del', { 'node-name': 'full' });
    await check('full push backup', readFileSync(full), atFull);

    // (2) incremental, chained on the full backup.
    await new Promise((r) => setTimeout(r, 200));
    const inc = target('inc', 'qcow2', full);
    await d.cmd('blockdev-add', { driver: 'qcow2', 'node-name': 'inc', file: { driver: 'file', filename: inc } });
    await writer.pause();
    const atInc = clusterHashes(readFileSync(disk));
    await d.cmd('blockdev-backup', { 'job-id': 'inc', device: 'disk0', target: 'inc', sync: 'incremental', bitmap: 'b0', speed: p.speed });
    writer.resume();
    await awaitJob(d, 'inc');
    await d.cmd('blockdev-del', { 'node-name': 'inc' });
    await check('incremental on its chain', await imageBytes(inc, 'qcow2', path.join(p.dir, 'inc-flat.raw')), atInc);

    // (3) pull backup through the fleecing export.
    const tmp = target('fleece-tmp', 'raw');
    await d.cmd('blockdev-add', { driver: 'file', 'node-name': 'tmp', filename: tmp });
    await writer.pause();
    const atPull = clusterHashes(readFileSync(disk));
    await d.cmd('blockdev-backup', { 'job-id': 'fleece', device: 'disk0', target: 'tmp', sync: 'none', 'filter-node-name': 'cbw' });
    writer.resume();
    await d.cmd('blockdev-add', { driver: 'snapshot-access', 'node-name': 'snap', file: 'cbw' });
    await d.cmd('block-export-add', { type: 'nbd', id: 'fleece', 'node-name': 'snap', name: 'fleece' });
    const pulled = path.join(p.dir, 'pulled.raw');
    await run('nbdcopy', [`nbd+unix:///fleece?socket=${nbdSock}`, pulled]);
    await check('pull backup (nbdcopy on the fleecing export)', readFileSync(pulled), atPull);
    const deleted = d.qmp.waitEvent('BLOCK_EXPORT_DELETED', (e) => e['id'] === 'fleece', { timeoutMs: 20_000 });
    await d.cmd('block-export-del', { id: 'fleece' });
    await deleted;
    await d.cmd('blockdev-del', { 'node-name': 'snap' });
    await d.cmd('job-cancel', { id: 'fleece' });
    await awaitJob(d, 'fleece').catch(() => {});
    await d.cmd('blockdev-del', { 'node-name': 'tmp' });

    // (4) a slow backup through a fleecing cache an eighth of the disk's size: it fills, and
    // guest writes wait for the rate-limited drain to free space (none may fail).
    const spill = target('spill', 'raw');
    const slow = target('slow', 'raw');
    await d.cmd('blockdev-add', { driver: 'fleecing-cache', 'node-name': 'cache', 'ram-bytes': p.sizeBytes / 16, 'file-bytes': p.sizeBytes / 16, file: { driver: 'file', filename: spill } });
    await d.cmd('blockdev-add', { driver: 'file', 'node-name': 'slow', filename: slow });
    await writer.pause();
    const atCache = clusterHashes(readFileSync(disk));
    await d.cmd('blockdev-backup', { 'job-id': 'fleece2', device: 'disk0', target: 'cache', sync: 'none', 'filter-node-name': 'cbw2', 'x-shear-cbw-timeout': 60 });
    await d.cmd('blockdev-add', { driver: 'snapshot-access', 'node-name': 'snap2', file: 'cbw2' });
    await d.cmd('blockdev-backup', { 'job-id': 'drain', device: 'snap2', target: 'slow', sync: 'full', 'discard-source': true, speed: p.speed });
    writer.resume();
    await awaitJob(d, 'drain');
    const nodes = await d.cmd<{ 'node-name': string; 'x-shear-cache'?: { spills: number; waits: number } }[]>('query-named-block-nodes');
    const cache = nodes.find((n) => n['node-name'] === 'cache')?.['x-shear-cache'];
    report.cacheSpills = cache?.spills ?? 0;
    report.cacheWaits = cache?.waits ?? 0;
    await d.cmd('blockdev-del', { 'node-name': 'slow' });
    await check('slow backup drained from a fleecing cache', readFileSync(slow), atCache);
    await d.cmd('blockdev-del', { 'node-name': 'snap2' });
    await d.cmd('job-cancel', { id: 'fleece2' });
    await awaitJob(d, 'fleece2').catch(() => {});
    await d.cmd('blockdev-del', { 'node-name': 'cache' });
  } finally {
    report.writes = await writer.stop().catch((err: Error) => {
      // The daemon's warnings say why a guest write failed (a refused copy-before-write, ...).
      report.details.push(`writer: ${err.message}\ndaemon stderr (end): ${d.stderr().slice(-4000)}`);
      return 0;
    });
    await d.stop();
    rmSync(sockDir, { recursive: true, force: true });
  }
  return report;
}
