import t, { type Test } from 'tap';
import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import path from 'node:path';
import { requireTools } from '@shear/testkit';
import { shear } from '../lib/cli.js';
import { qemuImg } from '../lib/images.js';
import { startCuttingProxy, startNbdkit } from './pull-harness.js';

const MiB = 2 ** 20;
const SIZE = 24 * MiB;

interface State {
  done: [number, number][];
}

/** nbdkit's file plugin (multi-conn, TRIM) over a random disk; the export name is "". */
async function setup(t: Test): Promise<{ dir: string; disk: string; url: string; sockDir: string; status: () => string }> {
  const dir = t.testdir();
  const sockDir = mkdtempSync(path.join(os.tmpdir(), 'shear-pullr-'));
  t.teardown(() => rmSync(sockDir, { recursive: true, force: true }));
  const disk = path.join(dir, 'disk.raw');
  writeFileSync(disk, randomBytes(SIZE));
  const sock = path.join(sockDir, 'nbdkit.sock');
  const k = await startNbdkit(sock, ['file', disk]);
  t.teardown(() => k.stop());
  return { dir, disk, url: `nbd+unix:///?socket=${sock}`, sockDir, status: k.status };
}

const doneChunks = (s: State): number => s.done.reduce((a, [x, y]) => a + y - x, 0);

t.test('a server that drops the connection mid-copy leaves a resumable pull; --resume copies the rest', async (t) => {
  t.setTimeout(15 * 60_000);
  if (!requireTools(t, 'nbdkit', 'qemu-img')) return;
  const { dir, disk, url, sockDir } = await setup(t);
  const proxySock = path.join(sockDir, 'proxy.sock');
  const proxy = await startCuttingProxy(proxySock, path.join(sockDir, 'nbdkit.sock'), 6 * MiB);
  t.teardown(() => proxy.stop());
  const target = path.join(dir, 'b.qcow2');
  const r1 = await shear(['pull', '--source', `nbd+unix:///?socket=${proxySock}`, '--target', target, '--target-format', 'qcow2', '--max-inflight', '2M']);
  t.equal(r1.code, 1, 'exit 1 (I/O)');
  t.match(r1.stderr, /connection was closed.*--resume copies what is missing/s);
  t.notOk(existsSync(target), 'no finished-looking target');
  t.notOk(existsSync(target + '.shear-manifest.json'));
  const state = JSON.parse(readFileSync(target + '.shear-pull-state', 'utf8')) as State;
  t.ok(doneChunks(state) >= 1 && doneChunks(state) < SIZE / MiB, `state records ${doneChunks(state)} done chunks`);

  // Resuming without --resume is refused; with it, against the server itself, only the rest is read.
  const again = await shear(['pull', '--source', url, '--target', target, '--target-format', 'qcow2']);
  t.equal(again.code, 4);
  t.match(again.stderr, /an unfinished pull into it exists/);
  const wrong = await shear(['pull', '--source', url, '--target', target, '--resume']);
  t.equal(wrong.code, 2);
  t.match(wrong.stderr, /records another pull \(targetFormat "qcow2" there, "raw" now\)/);
  const r2 = await shear(['pull', '--source', url, '--target', target, '--target-format', 'qcow2', '--resume', '--json']);
  t.equal(r2.code, 0, r2.stderr);
  const s = JSON.parse(r2.stdout) as { resumed: boolean; pulledBytes: number; copiedBytes: number; connections: number };
  t.equal(s.resumed, true);
  t.equal(s.pulledBytes, SIZE - doneChunks(state) * MiB, 'only the missing chunks were read');
  t.equal(s.copiedBytes, SIZE);
  t.ok(s.connections > 1, 'nbdkit allows multi-conn: several connections');
  t.match(qemuImg('compare', '-f', 'raw', disk, target), /identical/);
  t.notOk(existsSync(target + '.shear-pull-state'));
  t.notOk(existsSync(path.join(dir, '.b.qcow2.shear-pull-partial')));
});

t.test('Ctrl-C leaves a resumable pull; --resume finishes it', async (t) => {
  t.setTimeout(15 * 60_000);
  if (!requireTools(t, 'nbdkit', 'qemu-img')) return;
  const { dir, disk, url, status } = await setup(t);
  const target = path.join(dir, 'b.raw');
  // TRIM on nbdkit's file plugin punches holes in the served file: keep its bytes to compare.
  const original = path.join(dir, 'original.raw');
  copyFileSync(disk, original);
  // One chunk in flight: the pause after the first chunk holds the rest back.
  const r1 = await shear(['pull', '--source', url, '--target', target, '--max-inflight', '1M'], {
    env: { SHEAR_PAUSE_AT: 'copy' },
    onSpawn: (kill, stderr) => {
      const poll = setInterval(() => {
        if (stderr().includes('paused at copy')) {
          clearInterval(poll);
          kill('SIGINT');
        }
      }, 20);
    },
  });
  t.equal(r1.code, 130, r1.stderr);
  t.match(r1.stderr, /interrupted; .*b\.raw was not written; run the same command with --resume/);
  t.notOk(existsSync(target));
  const state = JSON.parse(readFileSync(target + '.shear-pull-state', 'utf8')) as State;
  t.ok(doneChunks(state) >= 1 && doneChunks(state) < SIZE / MiB, `state records ${doneChunks(state)} done chunks`);
  t.equal(status(), 'running', 'nbdkit is still serving');
  const r2 = await shear(['pull', '--source', url, '--target', target, '--resume', '--trim', '--json']);
  t.equal(r2.code, 0, r2.stderr);
  const s = JSON.parse(r2.stdout) as { pulledBytes: number; trimmedBytes: number };
  t.equal(s.pulledBytes, SIZE - doneChunks(state) * MiB);
  t.equal(s.trimmedBytes, s.pulledBytes, 'every range read in this run was trimmed on the export');
  t.match(qemuImg('compare', '-f', 'raw', '-F', 'raw', original, target), /identical/);
  // The file plugin punches a hole for a TRIM: the chunks read in this run now read as zeroes.
  const served = readFileSync(disk);
  const done = new Set(state.done.flatMap(([a, b]) => Array.from({ length: b - a }, (_, k) => a + k)));
  const trimmed = Array.from({ length: SIZE / MiB }, (_, i) => i).filter((i) => !done.has(i));
  t.ok(trimmed.length > 0);
  t.ok(trimmed.every((i) => served.subarray(i * MiB, (i + 1) * MiB).every((b) => b === 0)), 'the export released what was trimmed');
});

t.test('a full target disk: exit 5, a clear message, nothing that looks finished', async (t) => {
  t.setTimeout(15 * 60_000);
  if (!requireTools(t, 'nbdkit')) return;
  if (process.getuid?.() !== 0) {
    if (process.env['CI'] === 'true') t.fail('this test mounts a small tmpfs and needs root');
    else t.skip('not root: cannot mount a small tmpfs');
    return;
  }
  const { url } = await setup(t);
  // Outside the test directory, so that it is unmounted before anything removes it.
  const mnt = mkdtempSync(path.join(os.tmpdir(), 'shear-pull-enospc-'));
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', mnt]);
  t.teardown(() => {
    spawnSync('umount', [mnt]);
    rmSync(mnt, { recursive: true, force: true });
  });
  const target = path.join(mnt, 'b.raw');
  const r = await shear(['pull', '--source', url, '--target', target]);
  t.equal(r.code, 5, r.stderr);
  t.match(r.stderr, /Cannot write target ".*b\.raw": no space left on its file system.*--resume copies what is missing/);
  t.notOk(existsSync(target));
  t.ok(existsSync(target + '.shear-pull-state'), 'the state file says what was done');
});

t.test('usage errors', async (t) => {
  const r = await shear(['pull', '--source', 'http://x/y', '--target', '/tmp/x']);
  t.equal(r.code, 2);
  t.match(r.stderr, /scheme "http:" is not supported; expected nbd\+unix:\/\/\/EXPORT\?socket=PATH or nbd:\/\/HOST\[:PORT\]\/EXPORT/);
  const b = await shear(['pull', '--source', 'nbd://localhost/x', '--target', '/tmp/x', '--bitmap', 'b0']);
  t.equal(b.code, 2);
  t.match(b.stderr, /--bitmap and --backing go together/);
  const h = await shear(['help', 'pull']);
  t.match(h.stdout, /usage: shear pull --source URL --target PATH/);
});
