import t from 'tap';
import { readFileSync } from 'node:fs';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { requireLibnbdPython, requireTools } from '@shear/testkit';
import { startDaemon } from '../lib/daemon.js';
import { qemuImg, qemuImgCheck } from '../lib/images.js';
import { Writer, awaitJob, clusterHashes, imageBytes, mismatches } from '../lib/consistency.js';

const run = promisify(execFile);
const MiB = 2 ** 20;
const SIZE = 32 * MiB;

t.test('kill -9 during a backup under heavy writes: completed backups stay intact, bitmaps come back inconsistent', async (t) => {
  if (!requireTools(t, 'qemu-img', 'nbdcopy') || !requireLibnbdPython(t)) return;
  const dir = t.testdir();
  const sockDir = mkdtempSync(path.join(os.tmpdir(), 'shear-crash-'));
  t.teardown(() => rmSync(sockDir, { recursive: true, force: true }));
  const nbdSock = path.join(sockDir, 'nbd.sock');
  const disk = path.join(dir, 'disk.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', disk, String(SIZE));
  const args = [
    '--blockdev', `driver=qcow2,node-name=disk0,file.driver=file,file.filename=${disk}`,
    '--nbd-server', `addr.type=unix,addr.path=${nbdSock}`,
    '--export', 'type=nbd,id=live,node-name=disk0,name=live,writable=on',
  ];
  let d = await startDaemon(dir, args);
  const writer = new Writer(`nbd+unix:///live?socket=${nbdSock}`, 77);
  await new Promise((r) => setTimeout(r, 300));

  // A backup that completes, with a persistent bitmap from its point in time.
  const full = path.join(dir, 'full.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', full, String(SIZE));
  await d.cmd('blockdev-add', { driver: 'qcow2', 'node-name': 'full', file: { driver: 'file', filename: full } });
  await writer.pause();
  const scratch = path.join(dir, 'flat.raw');
  // The disk at the start point, read through the daemon (it holds the qcow2 metadata).
  const captured = path.join(dir, 'captured.raw');
  await run('nbdcopy', [`nbd+unix:///live?socket=${nbdSock}`, captured]);
  const atFull = clusterHashes(readFileSync(captured));
  await d.cmd('transaction', {
    actions: [
      { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'b0', persistent: true } },
      { type: 'blockdev-backup', data: { 'job-id': 'full', device: 'disk0', target: 'full', sync: 'full' } },
    ],
  });
  writer.resume();
  await awaitJob(d, 'full');
  await d.cmd('blockdev-del', { 'node-name': 'full' });

  // A second, slow backup is running and the guest writes hard when the daemon is killed.
  const second = path.join(dir, 'second.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', second, String(SIZE));
  await d.cmd('blockdev-add', { driver: 'qcow2', 'node-name': 'second', file: { driver: 'file', filename: second } });
  await d.cmd('blockdev-backup', { 'job-id': 'second', device: 'disk0', target: 'second', sync: 'full', speed: 4 * MiB });
  await new Promise((r) => setTimeout(r, 700));
  await d.kill();
  // The guest dies with the daemon (its connection is cut mid-write).
  await writer.stop().catch(() => 0);

  // The completed backup is intact and equals the disk at its start.
  t.equal(qemuImgCheck(full)['check-errors'], 0, 'qemu-img check: the completed backup is clean');
  t.same(mismatches(atFull, await imageBytes(full, 'qcow2', scratch)), [], 'and equals the disk at its point in time');
  // The disk image itself survives the crash (leaks at worst, no corruption), and it did change
  // after the start point: the guest was writing all along.
  t.ok(mismatches(atFull, await imageBytes(disk, 'qcow2', scratch)).length > 0, 'the disk changed after the backup started');
  const check = qemuImgCheck(disk);
  t.equal(check['check-errors'], 0);
  t.notOk(check.corruptions, 'no corruption in the disk image');
  // The interrupted backup's image is not corrupt either.
  t.notOk(qemuImgCheck(second).corruptions, 'the interrupted backup image has no corruption');

  // After restart the bitmap is inconsistent: never trusted, removable.
  d = await startDaemon(dir, args.slice(0, 2));
  t.teardown(() => d.stop());
  const nodes = await d.cmd<{ 'node-name': string; 'dirty-bitmaps': { name: string; inconsistent?: boolean }[] }[]>('query-named-block-nodes');
  t.match(nodes.find((n) => n['node-name'] === 'disk0')!['dirty-bitmaps'], [{ name: 'b0', inconsistent: true }]);
  await d.cmd('block-dirty-bitmap-remove', { node: 'disk0', name: 'b0' });
});
