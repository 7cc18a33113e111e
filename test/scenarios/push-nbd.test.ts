import t from 'tap';
import { execFile, spawn } from 'node:child_process';
import { promisify } from 'node:util';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { requireTools } from '@shear/testkit';
import { jobEnd, startDaemon } from '../lib/daemon.js';
import { makeRawImage } from '../lib/images.js';

const run = promisify(execFile);
const MiB = 2 ** 20;

t.test('a push backup to a remote NBD target (nbdkit) through the nbd client driver', async (t) => {
  if (!requireTools(t, 'nbdkit', 'nbdcopy')) return;
  const dir = t.testdir();
  const sockDir = mkdtempSync(path.join(os.tmpdir(), 'shear-push-'));
  const sock = path.join(sockDir, 'nbdkit.sock');
  const disk = path.join(dir, 'disk.raw');
  const content = makeRawImage(disk, 16 * MiB, 41);
  // A remote target: memory, with a little latency per request as a network would add.
  const kit = spawn('nbdkit', ['-f', '-U', sock, '--filter=delay', 'memory', '16M', 'wdelay=1ms', 'rdelay=1ms'], { stdio: 'ignore' });
  t.teardown(() => {
    kit.kill('SIGKILL');
    rmSync(sockDir, { recursive: true, force: true });
  });
  for (let i = 0; i < 100 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 50));
  const d = await startDaemon(dir, ['--blockdev', `driver=file,node-name=disk0,filename=${disk}`]);
  t.teardown(() => d.stop());
  await d.cmd('blockdev-add', { driver: 'nbd', 'node-name': 'remote', server: { type: 'unix', path: sock }, export: '' });
  await d.cmd('blockdev-backup', { 'job-id': 'push', device: 'disk0', target: 'remote', sync: 'full' });
  const end = await jobEnd(d, 'push');
  t.notOk(end.data?.['error'], 'the backup to the NBD target succeeded');
  await d.cmd('blockdev-del', { 'node-name': 'remote' });
  const pulled = path.join(dir, 'pulled.raw');
  await run('nbdcopy', [`nbd+unix:///?socket=${sock}`, pulled]);
  t.ok(readFileSync(pulled).equals(content), 'the remote target holds the disk');
  await t.rejects(d.cmd('blockdev-add', { driver: 'nbd', 'node-name': 'bad', server: { type: 'unix', path: path.join(sockDir, 'nope.sock') }, export: '' }), { message: /Cannot connect|ENOENT|connect/ });
});
