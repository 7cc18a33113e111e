import t from 'tap';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync, openSync, writeSync, closeSync, ftruncateSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { requireLibnbdPython, requireTools } from '@shear/testkit';
import { readManifest } from '../../packages/cli/src/backup-manifest.js';
import { shear } from '../lib/cli.js';
import { qemuImg } from '../lib/images.js';
import { guestWrite, startQsd } from './pull-harness.js';

const MiB = 2 ** 20;
const C = 65536;
const SIZE = 16 * MiB;

/** A sparse raw disk: cluster c holds byte (c % 251) + 1 when c % 3 === 0, the rest are holes. */
function makeSparseDisk(file: string): void {
  const fd = openSync(file, 'w');
  ftruncateSync(fd, SIZE);
  for (let c = 0; c < SIZE / C; c += 3) writeSync(fd, Buffer.alloc(C, (c % 251) + 1), 0, C, c * C);
  closeSync(fd);
}

const chunkDigests = (data: Buffer): string[] => {
  const out: string[] = [];
  for (let o = 0; o < data.length; o += MiB) out.push(createHash('sha256').update(data.subarray(o, o + MiB)).digest('hex'));
  return out;
};

async function waitNoJobs(cmd: (n: string, a?: Record<string, unknown>) => Promise<unknown>): Promise<void> {
  for (let i = 0; i < 500; i++) {
    const jobs = (await cmd('query-block-jobs')) as unknown[];
    if (jobs.length === 0) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error('the fleecing job did not end');
}

t.test('full then incremental pull from qemu-storage-daemon fleecing exports while a guest writes', async (t) => {
  t.setTimeout(15 * 60_000);
  if (!requireTools(t, 'qemu-storage-daemon', 'qemu-img') || !requireLibnbdPython(t)) return;
  const dir = t.testdir();
  const sockDir = mkdtempSync(path.join(os.tmpdir(), 'shear-pull-'));
  t.teardown(() => rmSync(sockDir, { recursive: true, force: true }));
  const disk = path.join(dir, 'disk.raw');
  makeSparseDisk(disk);
  const qsd = await startQsd(sockDir);
  t.teardown(() => qsd.stop());
  const { cmd } = qsd;
  const nbdSock = path.join(sockDir, 'nbd.sock');
  const live = `nbd+unix:///live?socket=${nbdSock}`;
  const url = `nbd+unix:///vda?socket=${nbdSock}`;
  await cmd('blockdev-add', { driver: 'file', 'node-name': 'disk0', filename: disk });
  await cmd('nbd-server-start', { addr: { type: 'unix', data: { path: nbdSock } } });
  await cmd('block-export-add', { type: 'nbd', id: 'live', 'node-name': 'disk0', name: 'live', writable: true });

  /** A point in time of disk0 exported as "vda" (copy-before-write + snapshot-access, as libvirt and Proxmox do). */
  const fleece = async (n: number, actions: Record<string, unknown>[], bitmaps: unknown[]): Promise<void> => {
    const tmp = path.join(dir, `fleece${n}.tmp`);
    qemuImg('create', '-q', '-f', 'raw', tmp, String(SIZE));
    await cmd('blockdev-add', { driver: 'file', 'node-name': 'tmp', filename: tmp, discard: 'unmap' });
    await cmd('transaction', { actions: [{ type: 'blockdev-backup', data: { 'job-id': 'fleece', device: 'disk0', target: 'tmp', sync: 'none', 'filter-node-name': 'cbw' } }, ...actions] });
    await cmd('blockdev-add', { driver: 'snapshot-access', 'node-name': 'snap', file: 'cbw' });
    await cmd('block-export-add', { type: 'nbd', id: 'vda', 'node-name': 'snap', name: 'vda', writable: true, bitmaps });
  };
  const unfleece = async (): Promise<void> => {
    await cmd('block-export-del', { id: 'vda' });
    for (let i = 0; i < 500 && ((await cmd('query-block-exports')) as { id: string }[]).some((e) => e.id === 'vda'); i++) await new Promise((r) => setTimeout(r, 20));
    await cmd('blockdev-del', { 'node-name': 'snap' });
    await cmd('block-job-cancel', { device: 'fleece' });
    await waitNoJobs(cmd);
    await cmd('blockdev-del', { 'node-name': 'tmp' });
  };

  // Full: b0 starts tracking at the same point in time.
  await fleece(1, [{ type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'b0' } }], []);
  const expected1 = readFileSync(disk);
  const full = path.join(dir, 'full.raw');
  const [r1] = await Promise.all([shear(['pull', '--source', url, '--target', full, '--trim', '--json']), guestWrite(live, [1, 4, 9, 100], 0xaa)]);
  t.equal(r1.code, 0, r1.stderr);
  const s1 = JSON.parse(r1.stdout) as Record<string, number | string | boolean>;
  t.match(s1, { kind: 'full', bytes: SIZE, resumed: false });
  t.equal(s1['copiedBytes'], (Math.ceil(SIZE / C / 3) * C), 'only the data clusters were written');
  t.ok((s1['trimmedBytes'] as number) > 0 && (s1['trimmedBytes'] as number) <= SIZE, 'trimmed bytes counted');
  t.match(qemuImg('compare', '-f', 'raw', '-F', 'raw', writeTmp(dir, 'expected1.raw', expected1), full), /identical/);
  const m1 = await readManifest(full);
  t.same(m1.chunks, chunkDigests(expected1));
  t.match(m1, { kind: 'full', image: 'full.raw', imageFormat: 'raw', parent: null, disk: { size: SIZE, identity: 'nbd:vda', source: url } });
  t.notOk(existsSync(full + '.shear-pull-state'), 'no state file after success');
  await unfleece();

  // Between backups the guest changes clusters 2, 3 (and 1, 4, 9 and 100 already during the
  // full) and zeroes cluster 6, which holds data in the full backup: the overlay must zero it.
  await guestWrite(live, [2, 3], 0xbb);
  await guestWrite(live, [6], 'zero');
  await fleece(2, [{ type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'b1' } }, { type: 'block-dirty-bitmap-disable', data: { node: 'disk0', name: 'b0' } }], [{ node: 'disk0', name: 'b0' }]);
  const expected2 = readFileSync(disk);

  // Bad input first: no such bitmap; a --backing of another disk. Neither leaves a file.
  const inc = path.join(dir, 'inc1.qcow2');
  const bad = await shear(['pull', '--source', url, '--target', inc, '--bitmap', 'nope', '--backing', full]);
  t.equal(bad.code, 3);
  t.match(bad.stderr, /does not offer dirty bitmap "nope"/);
  const other = await shear(['pull', '--source', url, '--target', inc, '--bitmap', 'b0', '--backing', full, '--disk-id', 'vm2/vda']);
  t.equal(other.code, 2);
  t.match(other.stderr, /Cannot use --backing ".*full.raw": it is a backup of disk "nbd:vda" of 16777216 bytes, but this export is disk "vm2\/vda"/);
  t.notOk(existsSync(inc) || existsSync(inc + '.shear-pull-state'), 'nothing left behind');

  const [r2] = await Promise.all([shear(['pull', '--source', url, '--target', inc, '--bitmap', 'b0', '--backing', full, '--json']), guestWrite(live, [2, 7], 0xcc)]);
  t.equal(r2.code, 0, r2.stderr);
  const s2 = JSON.parse(r2.stdout) as Record<string, number | string>;
  t.match(s2, { kind: 'incremental', copiedBytes: 6 * C }, 'clusters 1, 2, 3, 4, 9 and 100 were copied (6, dirty, was zeroed)');
  t.ok(expected2.subarray(6 * C, 7 * C).every((b) => b === 0) && expected1.subarray(6 * C, 7 * C).some((b) => b !== 0), 'cluster 6 went from data to zeroes');
  t.match(qemuImg('compare', '-f', 'raw', writeTmp(dir, 'expected2.raw', expected2), inc), /identical/);
  const info = JSON.parse(qemuImg('info', '--output=json', '--backing-chain', inc)) as { filename: string; 'backing-filename'?: string }[];
  t.equal(info.length, 2);
  t.equal(info[0]!['backing-filename'], 'full.raw', 'the backing file is named relative to the overlay');
  const m2 = await readManifest(inc);
  t.same(m2.chunks, chunkDigests(expected2));
  t.match(m2, { kind: 'incremental', imageFormat: 'qcow2', bitmap: 'b0', parent: { image: 'full.raw', sha256: m1.sha256 } });
  await unfleece();
});

function writeTmp(dir: string, name: string, data: Buffer): string {
  const p = path.join(dir, name);
  writeFileSync(p, data);
  return p;
}
