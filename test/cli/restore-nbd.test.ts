import t from 'tap';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { requireTools } from '@shear/testkit';
import { shear } from '../lib/cli.js';
import { qemuImg, qemuImgSame } from '../lib/images.js';
import { CHAIN_DISK_BYTES, buildChain } from '../lib/backup-chain.js';
import { startDaemon as startServer } from '../../packages/nbd/src/tools.fixture.js';

/**
 * `shear restore --target URL`: a restore into a running disk's NBD export, with qemu-nbd
 * (QEMU's own server) as the peer and qemu-img reading the result back over NBD as the oracle.
 */
t.test('shear restore into an NBD export overwrites every byte (zeroes included) and verifies', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io', 'qemu-nbd')) return;
  const dir = t.testdir();
  const chain = await buildChain(dir);
  // UNIX socket paths are short: not under the test directory.
  const sockDir = mkdtempSync(path.join(os.tmpdir(), 'shear-restore-'));
  t.teardown(() => rmSync(sockDir, { recursive: true, force: true }));

  const disk = path.join(dir, 'live.raw');
  qemuImg('create', '-q', '-f', 'raw', disk, String(CHAIN_DISK_BYTES));
  // Old contents everywhere: the restore must also write the chain's zeroes and holes.
  execFileSync('qemu-io', ['-f', 'raw', '-c', `write -P 0xee 0 ${CHAIN_DISK_BYTES}`, disk]);
  const sock = path.join(sockDir, 'rw.sock');
  await startServer(t, 'qemu-nbd', ['-t', '-f', 'raw', '-x', 'vda', '-k', sock, disk], sock);
  const url = `nbd+unix:///vda?socket=${sock}`;

  const r = await shear(['restore', '--chain', chain.links[2]!, '--target', url, '--verify', '--json', '--workers', '2']);
  t.equal(r.code, 0, r.stderr);
  const s = JSON.parse(r.stdout);
  t.match(s, { target: url, format: 'nbd', bytes: CHAIN_DISK_BYTES, verified: true });
  t.ok(qemuImgSame(chain.links[2]!, url), 'qemu-img compare: the export now reads as the chain');

  // An older point over the same export: the bytes the newer one wrote are replaced too.
  const older = await shear(['restore', '--chain', chain.links[0]!, '--target', url]);
  t.equal(older.code, 0, older.stderr);
  t.match(older.stdout, /^restored .*base\.raw \(1 link\) -> nbd\+unix:/);
  t.ok(qemuImgSame(chain.links[0]!, url), 'qemu-img compare: the export reads as the full');

  t.test('--format and --force are for files', async (t) => {
    t.equal((await shear(['restore', '--chain', chain.links[2]!, '--target', url, '--format', 'qcow2'])).code, 2);
    t.equal((await shear(['restore', '--chain', chain.links[2]!, '--target', url, '--force'])).code, 2);
    const bad = await shear(['restore', '--chain', chain.links[2]!, '--target', 'nbd+unix:///vda']);
    t.equal(bad.code, 2);
    t.match(bad.stderr, /Invalid --target "nbd\+unix:\/\/\/vda": expected nbd\+unix:\/\/\/EXPORT\?socket=PATH or nbd:\/\/HOST\[:PORT\]\/EXPORT/);
  });

  t.test('an export of another size is refused before anything is written', async (t) => {
    const other = path.join(dir, 'other.raw');
    qemuImg('create', '-q', '-f', 'raw', other, '32M');
    const osock = path.join(sockDir, 'other.sock');
    await startServer(t, 'qemu-nbd', ['-t', '-f', 'raw', '-x', 'vdb', '-k', osock, other], osock);
    const r = await shear(['restore', '--chain', chain.links[2]!, '--target', `nbd+unix:///vdb?socket=${osock}`]);
    t.equal(r.code, 2);
    t.match(r.stderr, /the export is 33554432 bytes, the disk 21037056/);
    t.ok(readFileSync(other).every((b) => b === 0), 'the other disk is untouched');
  });

  t.test('a read-only export is refused with a clear error', async (t) => {
    const ro = path.join(sockDir, 'ro.sock');
    await startServer(t, 'qemu-nbd', ['-t', '-r', '-f', 'raw', '-x', 'vdc', '-k', ro, disk], ro);
    const r = await shear(['restore', '--chain', chain.links[2]!, '--target', `nbd+unix:///vdc?socket=${ro}`]);
    t.not(r.code, 0);
    t.match(r.stderr, /read-only/);
    t.comment(r.stderr.trim());
  });
});
