/**
 * A replay of QEMU's iotest 257 (bitmap-sync backups: every sync mode x bitmap mode x failure
 * mode, and the API rejection cases) through QMP and NBD, against either qemu-storage-daemon
 * (the oracle) or Shear's daemon. Written from the test's description of what it does, not
 * from its code: each step records what a script would see (events without timestamps, bitmap
 * counts and SHA-256s, error classes and texts, image comparisons) into a transcript, and the
 * caller compares the two daemons' transcripts.
 *
 * Guest writes go through an NBD export of the source on both daemons (qemu-io as the NBD
 * client), so the same path carries them; while a backup runs the export writes through the
 * job's filter, as the upstream test writes to `backup-top`.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { QmpClient, type QmpEvent } from '@shear/qmp';
import { startDaemon } from './daemon.js';

const run = promisify(execFile);
export const LIBNBD_PYTHON = '/usr/bin/python3';
const SIZE = 64 * 1024 * 1024;
const GRANULARITY = 64 * 1024;

export type BitmapMode = 'never' | 'on-success' | 'always';
export type SyncMode = 'bitmap' | 'full' | 'top';
export type Failure = 'none' | 'simulated' | 'intermediate';

/** The upstream test's four write groups: (pattern byte, offset, length). */
const GROUPS: [number, number, number][][] = [
  [[0x49, 0x0000000, GRANULARITY], [0x6c, 0x0100000, GRANULARITY], [0x6f, 0x2000000, GRANULARITY], [0x76, 0x3ff0000, GRANULARITY]],
  [[0x65, 0x0000000, GRANULARITY], [0x77, 0x00f8000, GRANULARITY], [0x72, 0x2008000, GRANULARITY], [0x69, 0x3fe0000, GRANULARITY]],
  [[0x74, 0x0010000, GRANULARITY], [0x69, 0x00e8000, GRANULARITY], [0x6e, 0x2018000, GRANULARITY], [0x67, 0x3fe0000, 2 * GRANULARITY]],
  [[0xaa, 0x0010000, 3 * GRANULARITY], [0xbb, 0x00d8000, GRANULARITY], [0xcc, 0x2028000, GRANULARITY], [0xdd, 0x3fc0000, GRANULARITY]],
];

/** The combinations of the upstream main(), in its order. */
export function combinations(): { bitmapMode: BitmapMode; sync: SyncMode; failure: Failure }[] {
  const out: { bitmapMode: BitmapMode; sync: SyncMode; failure: Failure }[] = [];
  for (const bitmapMode of ['never', 'on-success', 'always'] as const) {
    for (const failure of ['simulated', 'intermediate', 'none'] as const) out.push({ bitmapMode, sync: 'bitmap', failure });
  }
  for (const sync of ['full', 'top'] as const) {
    for (const bitmapMode of ['on-success', 'always'] as const) {
      for (const failure of ['simulated', 'intermediate', 'none'] as const) out.push({ bitmapMode, sync, failure });
    }
  }
  return out;
}

/** One daemon under test: QMP, its events, and where its NBD server listens. */
export interface Daemon {
  kind: 'qemu' | 'shear';
  cmd<T = unknown>(name: string, args?: Record<string, unknown>): Promise<T>;
  events: QmpEvent[];
  nbdSocket: string;
  stop(): Promise<void>;
}

export async function startQsd(): Promise<Daemon> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'qsd257-'));
  const sock = path.join(dir, 'qmp.sock');
  const proc: ChildProcess = spawn('qemu-storage-daemon', ['--chardev', `socket,path=${sock},server=on,wait=off,id=m0`, '--monitor', 'chardev=m0'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (d) => (stderr += d));
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
  for (let i = 0; i < 400 && !existsSync(sock) && proc.exitCode === null; i++) await new Promise((r) => setTimeout(r, 25));
  if (!existsSync(sock)) {
    proc.kill('SIGKILL');
    await exited;
    rmSync(dir, { recursive: true, force: true });
    throw new Error(`qemu-storage-daemon did not start: ${stderr}`);
  }
  const qmp = await QmpClient.connect(sock);
  return wrap('qemu', qmp, path.join(dir, 'nbd.sock'), async () => {
    await qmp.execute('quit').catch(() => {});
    const timer = setTimeout(() => proc.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
    await qmp.close();
    rmSync(dir, { recursive: true, force: true });
  });
}

export async function startShear(dir: string): Promise<Daemon> {
  const d = await startDaemon(dir);
  const sockDir = mkdtempSync(path.join(os.tmpdir(), 'shear257-'));
  return wrap('shear', d.qmp, path.join(sockDir, 'nbd.sock'), async () => {
    await d.stop();
    rmSync(sockDir, { recursive: true, force: true });
  });
}

function wrap(kind: Daemon['kind'], qmp: QmpClient, nbdSocket: string, stop: () => Promise<void>): Daemon {
  const events: QmpEvent[] = [];
  qmp.on('event', (e: QmpEvent) => events.push(e));
  return { kind, cmd: (name, args) => qmp.execute(name, args), events, nbdSocket, stop };
}

/** What a step saw; the two daemons' lists must be equal. */
export type Transcript = unknown[];

/** Waits until an event matching `pred` has arrived (from index `from` of the event list). */
async function waitEvent(d: Daemon, pred: (e: QmpEvent) => boolean, what: string, from = 0): Promise<QmpEvent> {
  const deadline = Date.now() + 120_000;
  for (;;) {
    const e = d.events.slice(from).find(pred);
    if (e) return e;
    if (Date.now() > deadline) throw new Error(`${d.kind}: no ${what} within 120 s; events: ${JSON.stringify(d.events.slice(from))}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

const ended = (id: string) => (e: QmpEvent) => (e.event === 'BLOCK_JOB_COMPLETED' || e.event === 'BLOCK_JOB_CANCELLED') && e.data?.['device'] === id;
const pendingEvent = (id: string) => (e: QmpEvent) => e.event === 'BLOCK_JOB_PENDING' && e.data?.['id'] === id;
const statusIs = (id: string, status: string) => (e: QmpEvent) => e.event === 'JOB_STATUS_CHANGE' && e.data?.['id'] === id && e.data?.['status'] === status;

/**
 * The events since `from`, without timestamps, in order. One difference is left out on
 * purpose: QEMU starts a job inside the drained section of blockdev-backup, so a job reports
 * running, paused, running as it starts; Shear's job just runs. That first paused/running
 * pair is dropped.
 */
function eventsSince(d: Daemon, from: number): unknown[] {
  const out = d.events.slice(from).map((e) => ({ event: e.event, data: e.data }));
  const status = (i: number) => (out[i]?.event === 'JOB_STATUS_CHANGE' ? (out[i]!.data as { status?: string })['status'] : undefined);
  const firstRun = out.findIndex((_, i) => status(i) === 'running');
  if (firstRun >= 0 && status(firstRun + 1) === 'paused' && status(firstRun + 2) === 'running') out.splice(firstRun + 1, 2);
  return out;
}

function nbdUri(d: Daemon): string {
  return `nbd+unix:///drive0?socket=${d.nbdSocket}`;
}

/**
 * Guest writes through libnbd (nbdsh), which sends nothing but the writes: qemu-io flushes when
 * it closes (even with cache=unsafe, its NBD driver flushes to the OS), and a flush is what
 * arms the intermediate failure, so only the explicit arming step may flush.
 */
async function nbdWrite(d: Daemon, writes: [number, number, number][]): Promise<void> {
  const script = ['import nbd, sys', 'h = nbd.NBD()', 'h.connect_uri(sys.argv[1])', ...writes.map(([byte, off, len]) => `h.pwrite(bytes([${byte}]) * ${len}, ${off})`), 'h.shutdown()'].join('\n');
  // Debian's python3 has the libnbd bindings; the python3 first on PATH may not.
  await run(LIBNBD_PYTHON, ['-c', script, nbdUri(d)]);
}

async function nbdFlush(d: Daemon): Promise<void> {
  await run('qemu-io', ['-f', 'raw', '-c', 'flush', nbdUri(d)]);
}

/** drive0's bitmaps as the upstream test looks at them: named and anonymous, count and state, plus the named one's SHA-256. */
async function bitmaps(d: Daemon): Promise<unknown> {
  const nodes = await d.cmd<{ 'node-name': string; 'dirty-bitmaps'?: Record<string, unknown>[] }[]>('query-named-block-nodes');
  const node = nodes.find((n) => n['node-name'] === 'drive0');
  // Anonymous bitmaps that do not record are QEMU's block-copy internals (its copy bitmap); the
  // upstream test looks only at named ones and the recording successor.
  const list = (node?.['dirty-bitmaps'] ?? []).filter((b) => b['name'] !== undefined || b['recording'] === true).map((b) => ({ name: b['name'] ?? '', count: b['count'], granularity: b['granularity'], recording: b['recording'], busy: b['busy'] }));
  list.sort((a, b) => String(a.name).localeCompare(String(b.name)) || Number(a.count) - Number(b.count));
  const named = list.find((b) => b.name === 'bitmap0');
  const sha256 = named ? (await d.cmd<{ sha256: string }>('x-debug-block-dirty-bitmap-sha256', { node: 'drive0', name: 'bitmap0' })).sha256 : null;
  return { bitmaps: list, sha256 };
}

async function addTarget(d: Daemon, file: string, node: string): Promise<void> {
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', file, String(SIZE)]);
  await d.cmd('blockdev-add', { driver: 'qcow2', 'node-name': node, file: { driver: 'file', filename: file } });
}

function backupArgs(jobId: string, target: string, sync: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { 'job-id': jobId, device: 'drive0', target, sync, 'filter-node-name': 'backup-top', 'x-perf': { 'max-workers': 1 }, ...extra };
}

/** A full backup to a fresh image, run to its end (auto-finalize, auto-dismiss). */
async function referenceBackup(d: Daemon, dir: string, n: number, log: Transcript): Promise<string> {
  const file = path.join(dir, `fbackup${n}`);
  await addTarget(d, file, `ref_target_${n}`);
  const from = d.events.length;
  await d.cmd('blockdev-backup', backupArgs(`ref_backup_${n}`, `ref_target_${n}`, 'full'));
  await waitEvent(d, statusIs(`ref_backup_${n}`, 'null'), `end of ref_backup_${n}`, from);
  log.push({ step: `reference backup ${n}`, events: eventsSince(d, from) });
  return file;
}

async function writes(d: Daemon, n: number, log: Transcript): Promise<void> {
  await nbdWrite(d, GROUPS[n]!);
  log.push({ step: `write group ${n}`, ...(await bitmaps(d) as object) });
}

async function compareImages(image: string, reference: string, base?: string): Promise<string> {
  if (base) await run('qemu-img', ['rebase', '-u', '-b', base, '-F', 'qcow2', image]);
  try {
    await run('qemu-img', ['compare', image, reference]);
    return 'identical';
  } catch (err) {
    const code = (err as { code?: number }).code;
    if (code === 1) return 'mismatch';
    throw err;
  }
}

/**
 * One combination of test_bitmap_sync: writes, reference backups, the test backup (with its
 * failure), a recovery backup, and the image checks. Returns the transcript.
 */
export async function bitmapSyncCase(d: Daemon, dir: string, c: { bitmapMode: BitmapMode; sync: SyncMode; failure: Failure }): Promise<Transcript> {
  const log: Transcript = [];
  const img = path.join(dir, 'img');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(SIZE)]);
  const file: Record<string, unknown> =
    c.failure === 'intermediate'
      ? {
          driver: 'blkdebug',
          image: { driver: 'file', filename: img },
          // A flush arms the rule; the next read moves it on; the read after that fails once.
          'set-state': [
            { event: 'flush_to_disk', state: 1, new_state: 2 },
            { event: 'read_aio', state: 2, new_state: 3 },
          ],
          'inject-error': [{ event: 'read_aio', errno: 5, state: 3, immediately: false, once: true }],
        }
      : { driver: 'file', filename: img };
  await d.cmd('blockdev-add', { driver: 'qcow2', 'node-name': 'drive0', file });
  await d.cmd('nbd-server-start', { addr: { type: 'unix', data: { path: d.nbdSocket } } });
  await d.cmd('block-export-add', { type: 'nbd', id: 'exp0', 'node-name': 'drive0', name: 'drive0', writable: true });

  await writes(d, 0, log);
  const fbackup0 = await referenceBackup(d, dir, 0, log);
  await d.cmd('block-dirty-bitmap-add', { node: 'drive0', name: 'bitmap0', granularity: GRANULARITY });
  await writes(d, 1, log);
  const fbackup1 = await referenceBackup(d, dir, 1, log);

  if (c.failure === 'intermediate') await nbdFlush(d);
  const bsync1 = path.join(dir, 'bsync1');
  await addTarget(d, bsync1, 'backup_target_1');
  let from = d.events.length;
  await d.cmd('blockdev-backup', backupArgs('backup_1', 'backup_target_1', c.sync, { bitmap: 'bitmap0', 'bitmap-mode': c.bitmapMode, 'auto-finalize': false }));
  // Either the job waits for finalize (pending) or it has already failed.
  // BLOCK_JOB_PENDING is the last event of the pending state (a job that waits for finalize).
  const first = await waitEvent(d, (e) => pendingEvent('backup_1')(e) || ended('backup_1')(e), 'pending or end of backup_1', from);
  if (!ended('backup_1')(first)) {
    log.push({ step: 'backup 1 pending', events: eventsSince(d, from) });
    await writes(d, 2, log);
    from = d.events.length;
    await d.cmd(c.failure === 'simulated' ? 'job-cancel' : 'job-finalize', { id: 'backup_1' });
  }
  await waitEvent(d, statusIs('backup_1', 'null'), 'end of backup_1', from);
  log.push({ step: 'backup 1 end', events: eventsSince(d, from), ...(await bitmaps(d) as object) });

  await writes(d, 3, log);
  const fbackup2 = await referenceBackup(d, dir, 2, log);
  const bsync2 = path.join(dir, 'bsync2');
  await addTarget(d, bsync2, 'backup_target_2');
  from = d.events.length;
  await d.cmd('blockdev-backup', backupArgs('backup_2', 'backup_target_2', 'bitmap', { bitmap: 'bitmap0', 'bitmap-mode': c.bitmapMode, 'auto-finalize': false }));
  await waitEvent(d, pendingEvent('backup_2'), 'pending of backup_2', from);
  await d.cmd('job-finalize', { id: 'backup_2' });
  await waitEvent(d, statusIs('backup_2', 'null'), 'end of backup_2', from);
  log.push({ step: 'backup 2', events: eventsSince(d, from), ...(await bitmaps(d) as object) });

  await d.cmd('block-dirty-bitmap-remove', { node: 'drive0', name: 'bitmap0' });
  log.push({ step: 'bitmap removed', ...(await bitmaps(d) as object) });
  from = d.events.length;
  await d.cmd('block-export-del', { id: 'exp0' });
  await waitEvent(d, (e) => e.event === 'BLOCK_EXPORT_DELETED', 'export deletion', from);
  await d.cmd('nbd-server-stop');
  for (const node of ['ref_target_0', 'ref_target_1', 'backup_target_1', 'ref_target_2', 'backup_target_2', 'drive0']) await d.cmd('blockdev-del', { 'node-name': node });

  const keepFirst = c.failure === 'none' || c.bitmapMode === 'always';
  log.push({
    step: 'verification',
    bsync1: await compareImages(bsync1, fbackup1, fbackup0),
    bsync2: await compareImages(bsync2, fbackup2, keepFirst ? bsync1 : fbackup0),
    img: await compareImages(img, fbackup2),
  });
  return log;
}

/** test_backup_api: the invocations blockdev-backup must refuse, with their errors. */
export async function apiCases(d: Daemon, dir: string): Promise<Transcript> {
  const log: Transcript = [];
  const img = path.join(dir, 'img');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(SIZE)]);
  await d.cmd('blockdev-add', { driver: 'qcow2', 'node-name': 'drive0', file: { driver: 'file', filename: img } });
  await addTarget(d, path.join(dir, 'bsync1'), 'backup_target');
  await d.cmd('block-dirty-bitmap-add', { node: 'drive0', name: 'bitmap0', granularity: GRANULARITY });
  const all = ['on-success', 'always', 'never', undefined];
  const cases: Record<string, [string | undefined, (string | undefined)[]][]> = {
    incremental: [[undefined, all], ['bitmap404', all], ['bitmap0', ['always', 'never']]],
    bitmap: [[undefined, all], ['bitmap404', all], ['bitmap0', [undefined]]],
    full: [[undefined, ['on-success', 'always', 'never']], ['bitmap404', all], ['bitmap0', ['never', undefined]]],
    top: [[undefined, ['on-success', 'always', 'never']], ['bitmap404', all], ['bitmap0', ['never', undefined]]],
    none: [[undefined, ['on-success', 'always', 'never']], ['bitmap404', all], ['bitmap0', all]],
  };
  for (const [sync, rows] of Object.entries(cases)) {
    for (const [bitmap, modes] of rows) {
      for (const mode of modes) {
        const args = backupArgs('api_job', 'backup_target', sync, { ...(bitmap ? { bitmap } : {}), ...(mode ? { 'bitmap-mode': mode } : {}) });
        const outcome = await d.cmd('blockdev-backup', args).then(
          () => 'started',
          (err: { qmpClass?: string; desc?: string }) => ({ class: err.qmpClass, desc: err.desc }),
        );
        log.push({ sync, bitmap: bitmap ?? null, mode: mode ?? null, outcome });
      }
    }
  }
  await d.cmd('blockdev-del', { 'node-name': 'backup_target' });
  await d.cmd('blockdev-del', { 'node-name': 'drive0' });
  return log;
}
