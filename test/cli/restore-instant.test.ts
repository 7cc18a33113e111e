import t from 'tap';
import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { requireTools } from '@shear/testkit';
import { shear } from '../lib/cli.js';
import { startDaemon } from '../lib/daemon.js';
import { qemuImg, qemuImgSame } from '../lib/images.js';
import { buildChain } from '../lib/backup-chain.js';

const MiB = 2 ** 20;

/** Every file of the chain (images and manifests) by its SHA-256: what must not change. */
function fingerprint(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const f of readdirSync(dir).sort()) {
    if (f.startsWith('base.') || f.startsWith('inc')) out[f] = createHash('sha256').update(readFileSync(path.join(dir, f))).digest('hex');
  }
  return out;
}

/**
 * The instant restore of the README: `shear daemon` exports a chain through a writable qcow2
 * overlay over NBD. Real clients read the chain's bytes through the export (qemu-img compare,
 * nbdcopy), writes land in the overlay, and the backup files stay bit for bit as they were (and
 * still verify).
 */
t.test('instant restore: a chain exported through a writable overlay', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io', 'nbdcopy')) return;
  const dir = t.testdir();
  const chain = await buildChain(dir);
  const last = chain.links[2]!;
  const before = fingerprint(dir);
  const overlay = path.join(dir, 'scratch.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'inc2.qcow2', '-F', 'qcow2', overlay);
  const sockDir = mkdtempSync(path.join(os.tmpdir(), 'shear-instant-'));
  t.teardown(() => rmSync(sockDir, { recursive: true, force: true }));
  const nbdSock = path.join(sockDir, 'nbd.sock');
  const d = await startDaemon(dir, [
    '--blockdev', JSON.stringify({ driver: 'qcow2', 'node-name': 'vm1', file: { driver: 'file', filename: overlay } }),
    '--nbd-server', `addr.type=unix,addr.path=${nbdSock}`,
    '--export', 'type=nbd,id=vm1,node-name=vm1,name=vm1,writable=on',
  ]);
  let stopped = false;
  t.teardown(async () => {
    if (!stopped) await d.stop();
  });
  const url = `nbd+unix:///vm1?socket=${nbdSock}`;
  t.match(await d.cmd('query-block-exports'), [{ id: 'vm1', 'node-name': 'vm1' }], 'the export is up');
  t.ok(qemuImgSame(last, url), 'qemu-img compare: the export reads as the chain');
  const copied = path.join(dir, 'copied.raw');
  execFileSync('nbdcopy', [url, copied]);
  t.ok(qemuImgSame(last, copied), 'nbdcopy: the bytes pulled from the export are the chain\'s');
  rmSync(copied);

  // A guest writes: over a full's MiB, an increment's and a hole.
  execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x99 5M 64k', '-c', 'write -P 0x98 12M 4k', '-c', 'write -P 0x97 17M 1M', url]);
  execFileSync('qemu-io', ['-f', 'raw', '-c', 'read -P 0x99 5M 64k', '-c', 'read -P 0x98 12M 4k', '-c', 'read -P 0x97 17M 1M', url]);
  t.notOk(qemuImgSame(last, url), 'the export now differs from the backup');
  stopped = true;
  t.equal(await d.stop(), 0, 'the daemon exits 0');

  t.same(fingerprint(dir), before, 'every backup file and manifest is unchanged');
  const map = JSON.parse(qemuImg('map', '--output=json', overlay)) as { start: number; length: number; depth: number; data: boolean }[];
  const own = map.filter((m) => m.depth === 0 && m.data).map((m) => [m.start, m.length]);
  t.same(own, [[5 * MiB, 64 * 1024], [12 * MiB, 64 * 1024], [17 * MiB, MiB]], 'the writes (whole clusters) are in the overlay, nothing else');
  execFileSync('qemu-io', ['-f', 'qcow2', '-r', '-c', 'read -P 0x99 5M 64k', overlay]);
  const v = await shear(['verify', last]);
  t.equal(v.code, 0, `the chain still verifies: ${v.stderr}`);
});
