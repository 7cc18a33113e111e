import t from 'tap';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, truncateSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { requireTools } from '@shear/testkit';
import { startDaemon } from '../lib/daemon.js';

// Issue 14 item 6, daemon side: a truncated qcow2 image gives a clear error on blockdev-add (the
// L2 table is gone) or on the reads that reach missing data, over QMP and over NBD, never zeroes.

const MiB = 2 ** 20;

t.test('the daemon refuses a truncated qcow2 image and fails reads of the missing clusters', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = t.testdir();
  const full = path.join(dir, 'full.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', full, '16M']);
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 16M', full]);
  const noL2 = path.join(dir, 'no-l2.qcow2');
  const noData = path.join(dir, 'no-data.qcow2');
  execFileSync('cp', [full, noL2]);
  execFileSync('cp', [full, noData]);
  truncateSync(noL2, 200_000);
  truncateSync(noData, MiB);

  const sockDir = mkdtempSync(path.join(os.tmpdir(), 'shear-nbd-'));
  t.teardown(() => rmSync(sockDir, { recursive: true, force: true }));
  const d = await startDaemon(dir);
  try {
    await t.rejects(
      d.cmd('blockdev-add', { driver: 'qcow2', 'node-name': 'a', 'read-only': true, file: { driver: 'file', filename: noL2, 'read-only': true } }),
      { message: /corrupt|L2 table .* at offset 262144 .* past the end of the file \(200000 bytes\)/ },
      'blockdev-add: the L2 table lies past the end of the file',
    );
    t.same(await d.cmd('query-named-block-nodes'), [], 'nothing was left open');

    // Writable only because x-shear-io attaches as a writer; nothing is written.
    await d.cmd('blockdev-add', { driver: 'qcow2', 'node-name': 'b', file: { driver: 'file', filename: noData } });
    await d.cmd('x-shear-io', { node: 'b', command: 'read -P 0x5a 0 64k' });
    await t.rejects(d.cmd('x-shear-io', { node: 'b', command: 'read 0 1M' }), { message: /guest cluster 11 .* past the end of the file/ }, 'a read of missing data fails');

    const sock = path.join(sockDir, 'nbd.sock');
    await d.cmd('nbd-server-start', { addr: { type: 'unix', path: sock } });
    await d.cmd('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'b', name: 'b' });
    const io = (cmd: string) => spawnSync('qemu-io', ['-r', '-f', 'raw', '-c', cmd, `nbd+unix:///b?socket=${sock}`], { encoding: 'utf8' });
    t.match(io('read -P 0x5a 0 64k').stdout, /read 65536\/65536 bytes/, 'NBD: present clusters read');
    const bad = io('read 0 1M');
    t.match(bad.stdout + bad.stderr, /Input\/output error/, 'NBD: a read of missing data fails with EIO');
    await d.cmd('block-export-del', { id: 'e' });
    await d.cmd('nbd-server-stop');
    await d.cmd('blockdev-del', { 'node-name': 'b' });
  } finally {
    await d.stop();
  }
});
