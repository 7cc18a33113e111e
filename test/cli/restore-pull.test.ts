import t from 'tap';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { requireTools } from '@shear/testkit';
import { shear } from '../lib/cli.js';
import { qemuImg, qemuImgSame } from '../lib/images.js';
import { flipByte } from '../lib/backup-chain.js';
import { startDaemon as startServer } from '../../packages/nbd/src/tools.fixture.js';

const MiB = 2 ** 20;

/**
 * The whole round trip with manifests written by `shear pull` itself: a full and an incremental
 * pulled from qemu-nbd (QEMU's server, the dirty bitmap exported with -B), then `shear verify`
 * and `shear restore --verify` of the chain, checked against the disk with qemu-img compare.
 */
t.test('pull full + incremental, then verify and restore the chain they make', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io', 'qemu-nbd')) return;
  const dir = t.testdir();
  const sockDir = mkdtempSync(path.join(os.tmpdir(), 'shear-rp-'));
  t.teardown(() => rmSync(sockDir, { recursive: true, force: true }));
  const disk = path.join(dir, 'disk.qcow2');
  const io = (...cmds: string[]) => execFileSync('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), disk]);
  qemuImg('create', '-q', '-f', 'qcow2', disk, String(12 * MiB));
  io('write -P 0x41 0 3M', 'write -P 0x42 6M 1M');
  qemuImg('bitmap', '--add', disk, 'b0');
  const full = path.join(dir, 'full.raw');
  const inc = path.join(dir, 'inc1.qcow2');
  const then = path.join(dir, 'then.raw');

  await t.test('full pull', async (t) => {
    const sock = path.join(sockDir, 'a.sock');
    await startServer(t, 'qemu-nbd', ['-t', '-r', '-f', 'qcow2', '-x', 'vda', '-k', sock, disk], sock);
    const r = await shear(['pull', '--source', `nbd+unix:///vda?socket=${sock}`, '--target', full, '--json']);
    t.equal(r.code, 0, r.stderr);
  });
  qemuImg('convert', '-O', 'raw', disk, then);
  io('write -P 0x43 1M 64k', 'write -z 6M 512k', 'write -P 0x44 11M 1M');
  qemuImg('bitmap', '--disable', disk, 'b0');
  await t.test('incremental pull', async (t) => {
    const sock = path.join(sockDir, 'b.sock');
    await startServer(t, 'qemu-nbd', ['-t', '-r', '-f', 'qcow2', '-B', 'b0', '-x', 'vda', '-k', sock, disk], sock);
    const r = await shear(['pull', '--source', `nbd+unix:///vda?socket=${sock}`, '--target', inc, '--bitmap', 'b0', '--backing', full, '--json']);
    t.equal(r.code, 0, r.stderr);
  });

  const v = await shear(['verify', inc, '--json']);
  t.equal(v.code, 0, v.stderr);
  t.match(JSON.parse(v.stdout), { ok: true, links: [{ kind: 'incremental' }, { kind: 'full' }] });
  const restored = path.join(dir, 'restored.raw');
  const r = await shear(['restore', '--chain', inc, '--target', restored, '--verify', '--json']);
  t.equal(r.code, 0, r.stderr);
  t.match(JSON.parse(r.stdout), { verified: true, chain: [inc, full] });
  t.ok(qemuImgSame(disk, restored), 'qemu-img compare: the restored disk is the disk');
  const old = path.join(dir, 'old.qcow2');
  const r0 = await shear(['restore', '--chain', full, '--target', old, '--format', 'qcow2', '--verify']);
  t.equal(r0.code, 0, r0.stderr);
  t.ok(qemuImgSame(then, old), 'qemu-img compare: the full restores the disk as it was');

  flipByte(full, 2 * MiB + 5);
  const bad = await shear(['verify', inc]);
  t.equal(bad.code, 7);
  t.match(bad.stderr, /inc1\.qcow2: MiB 2; .*full\.raw: MiB 2/);
});
