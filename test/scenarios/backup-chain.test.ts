import t from 'tap';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { requireTools } from '@shear/testkit';
import { jobEnd, startDaemon, type DaemonHandle } from '../lib/daemon.js';
import { makeRawImage, qemuImg, qemuImgCheck, qemuImgSame } from '../lib/images.js';

const MiB = 2 ** 20;
const SIZE = 32 * MiB;

async function addQcow2Target(d: DaemonHandle, dir: string, name: string, backing?: string) {
  const file = path.join(dir, `${name}.qcow2`);
  if (backing) qemuImg('create', '-q', '-f', 'qcow2', '-b', path.join(dir, `${backing}.qcow2`), '-F', 'qcow2', file, String(SIZE));
  else qemuImg('create', '-q', '-f', 'qcow2', file, String(SIZE));
  await d.cmd('blockdev-add', { driver: 'qcow2', 'node-name': name, backing: null, file: { driver: 'file', filename: file } });
  return file;
}

async function addRawTarget(d: DaemonHandle, dir: string, name: string) {
  const file = path.join(dir, `${name}.raw`);
  qemuImg('create', '-q', '-f', 'raw', file, String(SIZE));
  await d.cmd('blockdev-add', { driver: 'file', 'node-name': name, filename: file });
  return file;
}

async function release(d: DaemonHandle, ...nodes: string[]) {
  for (const n of nodes) await d.cmd('blockdev-del', { 'node-name': n });
}

t.test('a full backup, then a chain of incrementals: each equals a full reference taken at the same moment', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const disk = path.join(dir, 'disk.raw');
  makeRawImage(disk, SIZE, 21);
  const d = await startDaemon(dir, ['--blockdev', `driver=file,node-name=disk0,filename=${disk}`]);
  t.teardown(() => d.stop());

  await addQcow2Target(d, dir, 'full');
  // The bitmap and the full backup start at the same point in time.
  await d.cmd('transaction', {
    actions: [
      { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'b0', granularity: 65536 } },
      { type: 'blockdev-backup', data: { 'job-id': 'full', device: 'disk0', target: 'full', sync: 'full' } },
    ],
  });
  t.match((await jobEnd(d, 'full')).data, { type: 'backup', len: SIZE, offset: SIZE });
  t.notOk((await jobEnd(d, 'full')).data?.['error']);
  let previous = 'full';
  for (let i = 1; i <= 3; i++) {
    // Guest writes between backups, some unaligned, some zeroes.
    await d.cmd('x-shear-io', { node: 'disk0', command: `write -P ${0x10 + i} ${i * 3}M 100k` });
    await d.cmd('x-shear-io', { node: 'disk0', command: `write -P ${0x20 + i} ${i * 5 * 1024 + 7} 3000` });
    await d.cmd('x-shear-io', { node: 'disk0', command: `write -z ${20 + i}M 64k` });
    const inc = `inc${i}`;
    const ref = `ref${i}`;
    await addQcow2Target(d, dir, inc, previous);
    await addRawTarget(d, dir, ref);
    await d.cmd('transaction', {
      actions: [
        { type: 'blockdev-backup', data: { 'job-id': inc, device: 'disk0', target: inc, sync: 'incremental', bitmap: 'b0' } },
        { type: 'blockdev-backup', data: { 'job-id': ref, device: 'disk0', target: ref, sync: 'full' } },
      ],
    });
    const [incEnd, refEnd] = await Promise.all([jobEnd(d, inc), jobEnd(d, ref)]);
    t.notOk(incEnd.data?.['error'], `${inc} succeeded`);
    t.notOk(refEnd.data?.['error'], `${ref} succeeded`);
    t.ok((incEnd.data?.['len'] as number) < SIZE / 4, `${inc} copied only the dirty clusters (${incEnd.data?.['len']} bytes)`);
    await release(d, inc, ref);
    const incFile = path.join(dir, `${inc}.qcow2`);
    t.equal(qemuImgCheck(incFile)['check-errors'], 0);
    t.ok(qemuImgSame(incFile, path.join(dir, `${ref}.raw`)), `${inc} on its chain equals ${ref} (qemu-img compare)`);
    previous = inc;
  }
  const nodes = await d.cmd<{ 'dirty-bitmaps': { name: string; count: number; busy: boolean; recording: boolean }[] }[]>('query-named-block-nodes');
  t.match(nodes.find((n) => (n as unknown as { 'node-name': string })['node-name'] === 'disk0')!['dirty-bitmaps'], [{ name: 'b0', count: 0, busy: false, recording: true }]);
});

t.test('writes made while a backup runs do not reach it and are recorded for the next one', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const disk = path.join(dir, 'disk.raw');
  const original = makeRawImage(disk, SIZE, 22);
  const d = await startDaemon(dir, ['--blockdev', `driver=file,node-name=disk0,filename=${disk}`]);
  t.teardown(() => d.stop());
  const target = await addRawTarget(d, dir, 'tgt');
  // The guest is attached before the backup starts, as a VM's disk would be.
  await d.cmd('x-shear-io', { node: 'disk0', command: 'read 0 4k' });
  await d.cmd('transaction', {
    actions: [
      { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'b0' } },
      // Slow, so that the writes below land while it runs.
      { type: 'blockdev-backup', data: { 'job-id': 'slow', device: 'disk0', target: 'tgt', sync: 'full', speed: 8 * MiB } },
    ],
  });
  const during = await d.cmd<{ 'dirty-bitmaps': { name?: string; busy: boolean; recording: boolean }[] }[]>('query-named-block-nodes');
  for (const off of [1, 9, 17, 30]) await d.cmd('x-shear-io', { node: 'disk0', command: `write -P 0xee ${off}M 128k` });
  await d.cmd('block-job-set-speed', { device: 'slow', speed: 0 });
  const end = await jobEnd(d, 'slow');
  t.notOk(end.data?.['error']);
  await release(d, 'tgt');
  t.ok(readFileSync(target).equals(original), 'the backup holds the disk as it was at its start');
  const after = await d.cmd<{ 'node-name': string; 'dirty-bitmaps': { name: string; count: number }[] }[]>('query-named-block-nodes');
  t.same(after.find((n) => n['node-name'] === 'disk0')!['dirty-bitmaps'].map((b) => [b.name, b.count]), [['b0', 4 * 2 * 65536]], 'the bitmap holds exactly the clusters written during the backup');
  void during;
});

t.test('bitmap sync modes: a failed always-mode backup retried copies only what was missing', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const disk = path.join(dir, 'disk.raw');
  makeRawImage(disk, SIZE, 23);
  const d = await startDaemon(dir, ['--blockdev', `driver=file,node-name=disk0,filename=${disk}`]);
  t.teardown(() => d.stop());
  await d.cmd('block-dirty-bitmap-add', { node: 'disk0', name: 'b0', granularity: 65536 });
  // 3/4 of the disk changes (seed 004, scaled down).
  await d.cmd('x-shear-io', { node: 'disk0', command: 'write -P 0x77 0 24M' });
  const tgtFile = path.join(dir, 'inc.raw');
  qemuImg('create', '-q', '-f', 'raw', tgtFile, String(SIZE));
  // The target fails on the 9th write request: part of the increment is copied, then the job fails.
  await d.cmd('blockdev-add', {
    driver: 'blkdebug', 'node-name': 'flaky',
    'inject-error': [{ event: 'write_aio', errno: 5, state: 3 }],
    'set-state': Array.from({ length: 2 }, (_, i) => ({ event: 'write_aio', state: i + 1, new_state: i + 2 })),
    image: { driver: 'file', filename: tgtFile },
  });
  await d.cmd('blockdev-backup', { 'job-id': 'try1', device: 'disk0', target: 'flaky', sync: 'bitmap', bitmap: 'b0', 'bitmap-mode': 'always', 'x-perf': { 'max-chunk': 4 * MiB, 'max-workers': 1 } });
  const end1 = await jobEnd(d, 'try1');
  t.match(end1.data, { error: /Input\/output error|EIO|injected|I\/O/ }, 'the first attempt fails');
  const nodes = await d.cmd<{ 'node-name': string; 'dirty-bitmaps': { name: string; count: number }[] }[]>('query-named-block-nodes');
  const left = nodes.find((n) => n['node-name'] === 'disk0')!['dirty-bitmaps'][0]!.count;
  t.ok(left < 24 * MiB && left > 0, `always mode kept only the clusters not copied (${left / MiB} MiB of 24)`);
  await release(d, 'flaky');
  // The retry to a healthy target copies exactly the remainder.
  await d.cmd('blockdev-add', { driver: 'file', 'node-name': 'tgt2', filename: tgtFile });
  await d.cmd('blockdev-backup', { 'job-id': 'try2', device: 'disk0', target: 'tgt2', sync: 'bitmap', bitmap: 'b0', 'bitmap-mode': 'always' });
  const end2 = await jobEnd(d, 'try2');
  t.notOk(end2.data?.['error']);
  t.equal(end2.data?.['len'], left, 'the retry copied only what was missing');
  await release(d, 'tgt2');
  // Together the two attempts hold the whole increment: the first 24 MiB equal the disk.
  t.ok(readFileSync(tgtFile).subarray(0, 24 * MiB).equals(readFileSync(disk).subarray(0, 24 * MiB)), 'the two attempts together copied the increment');
});

t.test('verbs per job state, auto-finalize=false, and refusals with QEMU messages', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const disk = path.join(dir, 'disk.raw');
  makeRawImage(disk, SIZE, 24);
  const d = await startDaemon(dir, ['--blockdev', `driver=file,node-name=disk0,filename=${disk}`]);
  t.teardown(() => d.stop());
  await addRawTarget(d, dir, 'tgt');
  await d.cmd('blockdev-backup', { 'job-id': 'j', device: 'disk0', target: 'tgt', sync: 'full', 'auto-finalize': false, 'auto-dismiss': false, speed: 4 * MiB });
  await t.rejects(d.cmd('job-finalize', { id: 'j' }), { qmpClass: 'GenericError', message: /Job 'j' in state 'running' cannot accept command verb 'finalize'/ });
  await t.rejects(d.cmd('job-resume', { id: 'j' }), { message: /Can't resume a job that was not paused/ });
  await d.cmd('job-pause', { id: 'j' });
  t.match(await d.cmd('query-jobs'), [{ id: 'j', type: 'backup', status: 'paused' }]);
  await d.cmd('job-resume', { id: 'j' });
  await d.cmd('block-job-set-speed', { device: 'j', speed: 0 });
  await d.qmp.waitEvent('BLOCK_JOB_PENDING', (e) => e['id'] === 'j', { timeoutMs: 60_000 });
  t.match(await d.cmd('query-jobs'), [{ id: 'j', status: 'pending' }]);
  await d.cmd('job-finalize', { id: 'j' });
  t.match(await d.cmd('query-jobs'), [{ id: 'j', status: 'concluded' }]);
  await d.cmd('job-dismiss', { id: 'j' });
  t.same(await d.cmd('query-jobs'), []);
  await t.rejects(d.cmd('job-cancel', { id: 'j' }), { message: 'Job not found' });
  await t.rejects(d.cmd('block-job-cancel', { device: 'nope' }), { qmpClass: 'DeviceNotActive', message: "Block job 'nope' not found" });
  await t.rejects(d.cmd('blockdev-backup', { device: 'disk0', target: 'tgt', sync: 'bitmap' }), { message: "must provide a valid bitmap name for 'bitmap' sync mode" });
  await t.rejects(d.cmd('blockdev-backup', { device: 'disk0', target: 'tgt', sync: 'full', bitmap: 'nope', 'bitmap-mode': 'always' }), { message: /Dirty bitmap "nope" not found|Bitmap 'nope' could not be found/ });
  await t.rejects(d.cmd('blockdev-backup', { device: 'disk0', target: 'tgt', sync: 'fast' }), { message: "Parameter 'sync' does not accept value 'fast'" });
  await t.rejects(d.cmd('blockdev-backup', { device: 'nodisk', target: 'tgt', sync: 'full' }), { message: "Cannot find device='nodisk' nor node-name='nodisk'" });
  await t.rejects(d.cmd('transaction', { actions: [{ type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'x' } }, { type: 'abort', data: {} }] }), { message: 'Transaction aborted using Abort action' });
  const nodes = await d.cmd<{ 'node-name': string; 'dirty-bitmaps': unknown[] }[]>('query-named-block-nodes');
  t.same(nodes.find((n) => n['node-name'] === 'disk0')!['dirty-bitmaps'], [], 'the aborted transaction added no bitmap');
});

t.test('a full target (ENOSPC) under on-target-error=enospc pauses the job; resumed, it completes exactly', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const disk = path.join(dir, 'disk.raw');
  const content = makeRawImage(disk, SIZE, 25);
  const d = await startDaemon(dir, ['--blockdev', `driver=file,node-name=disk0,filename=${disk}`]);
  t.teardown(() => d.stop());
  const tgtFile = path.join(dir, 'tgt.raw');
  qemuImg('create', '-q', '-f', 'raw', tgtFile, String(SIZE));
  await d.cmd('blockdev-add', {
    driver: 'blkdebug', 'node-name': 'full-disk',
    'inject-error': [{ event: 'write_aio', errno: 28, once: true }],
    image: { driver: 'file', filename: tgtFile },
  });
  await d.cmd('blockdev-backup', { 'job-id': 'nospc', device: 'disk0', target: 'full-disk', sync: 'full', 'on-target-error': 'enospc' });
  const err = await d.qmp.waitEvent('BLOCK_JOB_ERROR', (e) => e['device'] === 'nospc', { timeoutMs: 30_000 });
  t.match(err.data, { operation: 'write', action: 'stop' });
  await d.qmp.waitEvent('JOB_STATUS_CHANGE', (e) => e['id'] === 'nospc' && e['status'] === 'paused', { timeoutMs: 30_000 }).catch(() => {});
  t.match(await d.cmd('query-jobs'), [{ id: 'nospc', status: 'paused' }]);
  await d.cmd('job-resume', { id: 'nospc' });
  const end = await jobEnd(d, 'nospc');
  t.notOk(end.data?.['error'], 'it completed after the resume');
  await d.cmd('blockdev-del', { 'node-name': 'full-disk' });
  t.ok(readFileSync(tgtFile).equals(content), 'and the target holds the whole disk');
});
