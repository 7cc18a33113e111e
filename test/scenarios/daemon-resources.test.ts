// The daemon gives back everything a test took: once its jobs are dismissed and its exports and
// nodes removed, it holds no descriptor on any image and no copy task, whichever way the jobs
// ended (completed, failed, cancelled) and whether an NBD server, client or export was involved.
import t, { type Test } from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { requireTools } from '@shear/testkit';
import { jobEnd, startDaemon, type DaemonHandle } from '../lib/daemon.js';
import { makeRawImage, qemuImg } from '../lib/images.js';

const MiB = 2 ** 20;
const SIZE = 16 * MiB;

async function rawTarget(d: DaemonHandle, dir: string, name: string): Promise<string> {
  const file = path.join(dir, `${name}.raw`);
  qemuImg('create', '-q', '-f', 'raw', file, String(SIZE));
  await d.cmd('blockdev-add', { driver: 'file', 'node-name': name, filename: file });
  return file;
}

async function start(t: Test): Promise<{ d: DaemonHandle; dir: string; disk: string }> {
  const dir = t.testdir();
  const disk = path.join(dir, 'disk.raw');
  makeRawImage(disk, SIZE, 41);
  const d = await startDaemon(dir, ['--blockdev', `driver=file,node-name=disk0,filename=${disk}`, '--workers', '2']);
  t.teardown(() => d.stop());
  return { d, dir, disk };
}

t.test('while nodes are open they are named, with the files they hold', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const { d, disk } = await start(t);
  const r = await d.resources();
  t.same(r.nodes, ['disk0']);
  t.ok(r.files.includes(disk), 'the disk is held open');
  t.ok(r.pool && r.pool.workers === 2 && r.pool.threads <= 2, 'the pool has at most its two threads');
  await t.rejects(d.assertReleased(), /nodes still open: disk0[\s\S]*descriptor on .*disk\.raw/);
  await d.cmd('blockdev-del', { 'node-name': 'disk0' });
  const after = await d.assertReleased();
  t.same(after.files, []);
});

t.test('completed, failed and cancelled backups leave nothing behind', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const { d, dir } = await start(t);
  await d.cmd('x-shear-io', { node: 'disk0', command: 'write -P 0x11 0 1M' }); // a guest, attached

  await rawTarget(d, dir, 'ok');
  await d.cmd('blockdev-backup', { 'job-id': 'ok', device: 'disk0', target: 'ok', sync: 'full' });
  t.notOk((await jobEnd(d, 'ok')).data?.['error'], 'the full backup completed');
  await d.cmd('blockdev-del', { 'node-name': 'ok' });

  const failing = path.join(dir, 'failing.raw');
  qemuImg('create', '-q', '-f', 'raw', failing, String(SIZE));
  await d.cmd('blockdev-add', { driver: 'blkdebug', 'node-name': 'bad', 'inject-error': [{ event: 'write_aio', errno: 5 }], image: { driver: 'file', filename: failing } });
  await d.cmd('blockdev-backup', { 'job-id': 'bad', device: 'disk0', target: 'bad', sync: 'full' });
  t.ok((await jobEnd(d, 'bad')).data?.['error'], 'the backup to a failing target failed');
  await d.cmd('blockdev-del', { 'node-name': 'bad' });

  await rawTarget(d, dir, 'slow');
  await d.cmd('blockdev-backup', { 'job-id': 'slow', device: 'disk0', target: 'slow', sync: 'full', speed: MiB, 'auto-dismiss': false });
  await d.cmd('x-shear-io', { node: 'disk0', command: 'write -P 0x22 8M 1M' }); // copy-before-write while it runs
  await d.cmd('job-cancel', { id: 'slow' });
  await jobEnd(d, 'slow');
  await d.cmd('job-dismiss', { id: 'slow' });
  await d.cmd('blockdev-del', { 'node-name': 'slow' });

  await d.cmd('blockdev-del', { 'node-name': 'disk0' });
  await d.assertReleased();
  t.pass('no node, job, image descriptor or copy task left');
});

t.test('a fleecing export read through an NBD client node leaves nothing behind', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const { d, dir } = await start(t);
  const sockDir = mkdtempSync(path.join(os.tmpdir(), 'shear-res-'));
  t.teardown(() => rmSync(sockDir, { recursive: true, force: true }));
  const nbdSock = path.join(sockDir, 'nbd.sock');
  await d.cmd('nbd-server-start', { addr: { type: 'unix', path: nbdSock } });
  await d.cmd('x-shear-io', { node: 'disk0', command: 'read 0 4k' }); // the guest, attached before the filter
  await rawTarget(d, dir, 'tmp');
  await d.cmd('blockdev-backup', { 'job-id': 'fleece', device: 'disk0', target: 'tmp', sync: 'none', 'filter-node-name': 'cbw' });
  await d.cmd('blockdev-add', { driver: 'snapshot-access', 'node-name': 'snap', file: 'cbw' });
  await d.cmd('block-export-add', { type: 'nbd', id: 'fleece', 'node-name': 'snap', name: 'fleece' });
  // The daemon reads its own export: a client socket and a server connection.
  await d.cmd('blockdev-add', { driver: 'nbd', 'node-name': 'remote', server: { type: 'unix', path: nbdSock }, export: 'fleece' });
  await d.cmd('x-shear-io', { node: 'disk0', command: 'write -P 0x33 0 2M' });
  await d.cmd('x-shear-io', { node: 'remote', command: 'read 0 4M' });
  await d.cmd('blockdev-del', { 'node-name': 'remote' });
  const deleted = d.qmp.waitEvent('BLOCK_EXPORT_DELETED', (e) => e['id'] === 'fleece', { timeoutMs: 10_000 });
  await d.cmd('block-export-del', { id: 'fleece' });
  await deleted;
  await d.cmd('blockdev-del', { 'node-name': 'snap' });
  await d.cmd('job-cancel', { id: 'fleece' });
  await jobEnd(d, 'fleece');
  await d.cmd('nbd-server-stop');
  await d.cmd('blockdev-del', { 'node-name': 'tmp' });
  await d.cmd('blockdev-del', { 'node-name': 'disk0' });
  await d.assertReleased();
  t.pass('no node, job, image descriptor or copy task left');
});

t.test('blockdev-del of a qcow2 whose last flush fails, over inline blkdebug and file nodes: everything goes', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const { d, dir } = await start(t);
  const img = path.join(dir, 'broken.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', img, String(SIZE));
  // Every write from the 5th on fails: data written below is cached metadata that close must flush.
  await d.cmd('blockdev-add', {
    driver: 'qcow2', 'node-name': 'broken',
    file: { driver: 'blkdebug', 'inject-error': [{ event: 'write_aio', errno: 28, state: 2 }], 'set-state': [{ event: 'write_aio', state: 1, new_state: 2 }], image: { driver: 'file', filename: img } },
  });
  for (let i = 0; i < 4; i++) await d.cmd('x-shear-io', { node: 'broken', command: `write -P 1 ${i * 2 * MiB} 64k` }).catch(() => {});
  await d.cmd('blockdev-del', { 'node-name': 'broken' });
  const r = await d.resources();
  t.same(r.nodes, ['disk0'], 'the qcow2 node and both inline nodes below it are gone');
  t.notOk(r.files.includes(img), 'and nothing holds the image file');
});
