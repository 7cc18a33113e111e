import t from 'tap';
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { requireTools } from '@shear/testkit';
import { shear } from '../lib/cli.js';
import { makeRawImage, qemuImg, qemuImgCheck, qemuImgSame } from '../lib/images.js';

const MiB = 2 ** 20;

function noPartialFiles(dir: string): boolean {
  return !readdirSync(dir).some((f) => f.includes('shear-partial'));
}

t.test('shear backup: raw to raw, verified, JSON summary', async (t) => {
  const dir = t.testdir();
  const src = path.join(dir, 'disk.raw');
  const dst = path.join(dir, 'backup.raw');
  const content = makeRawImage(src, 24 * MiB + 12345, 3);
  const r = await shear(['backup', '--source', src, '--target', dst, '--verify', '--json', '--workers', '2']);
  t.equal(r.code, 0, r.stderr);
  const summary = JSON.parse(r.stdout);
  t.match(summary, { bytes: 24 * MiB + 12345, workers: 2, verified: true, sync: 'full' });
  t.equal(summary.copiedBytes + summary.skippedBytes, summary.bytes, 'every byte is copied or skipped as zero');
  t.ok(summary.skippedBytes > 0, 'holes were skipped');
  t.type(summary.seconds, 'number');
  t.type(summary.mibPerSec, 'number');
  t.ok(readFileSync(dst).equals(content), 'target equals source byte for byte');
  t.ok(noPartialFiles(dir));
});

t.test('shear backup: single-task mode gives the same result', async (t) => {
  const dir = t.testdir();
  const src = path.join(dir, 'disk.raw');
  const content = makeRawImage(src, 8 * MiB, 5);
  const r = await shear(['backup', '--source', src, '--target', path.join(dir, 'b.raw'), '--single-task', '--max-chunk', '256k', '--json']);
  t.equal(r.code, 0, r.stderr);
  t.match(JSON.parse(r.stdout), { workers: 1, singleTask: true });
  t.ok(readFileSync(path.join(dir, 'b.raw')).equals(content));
});

t.test('shear backup: qcow2 targets pass qemu-img check and compare', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const src = path.join(dir, 'disk.raw');
  makeRawImage(src, 20 * MiB, 9);
  const dst = path.join(dir, 'backup.qcow2');
  const r = await shear(['backup', '--source', src, '--target', dst, '--target-format', 'qcow2', '--verify']);
  t.equal(r.code, 0, r.stderr);
  const check = qemuImgCheck(dst);
  t.equal(check['check-errors'], 0);
  t.notOk(check.leaks, 'no leaked clusters');
  t.ok(qemuImgSame(src, dst), 'qemu-img compare: equal');
  t.equal(JSON.parse(qemuImg('info', '--output=json', dst))['virtual-size'], 20 * MiB);
});

t.test('shear backup: qcow2 source with a backing file, --sync top copies only the top layer', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = t.testdir();
  const base = path.join(dir, 'base.raw');
  makeRawImage(base, 8 * MiB, 11);
  const top = path.join(dir, 'top.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', top);
  const io = (cmd: string) => qemuIo(top, cmd);
  io('write -P 0x5a 1M 192k');
  io('write -P 0xa5 7M 64k');
  const dst = path.join(dir, 'inc.qcow2');
  const r = await shear(['backup', '--source', top, '--target', dst, '--target-format', 'qcow2', '--sync', 'top', '--json']);
  t.equal(r.code, 0, r.stderr);
  const summary = JSON.parse(r.stdout);
  t.equal(summary.copiedBytes, 256 * 1024, 'only the 256 KiB the top layer allocates were copied');
  const info = JSON.parse(qemuImg('info', '--output=json', dst));
  t.equal(info['backing-filename'], base, 'the target has the source backing file');
  t.equal(qemuImgCheck(dst)['check-errors'], 0);
  t.ok(qemuImgSame(top, dst), 'the target on its backing chain equals the source chain');
});

function qemuIo(file: string, cmd: string): string {
  return execFileSync('qemu-io', ['-f', 'qcow2', '-c', cmd, file], { encoding: 'utf8' });
}

t.test('shear backup: refuses bad input with clear messages and exit codes, leaving nothing behind', async (t) => {
  const dir = t.testdir();
  const src = path.join(dir, 'disk.raw');
  makeRawImage(src, MiB, 1);
  const existing = path.join(dir, 'exists.raw');
  makeRawImage(existing, MiB, 2);
  const before = readFileSync(existing);

  let r = await shear(['backup', '--source', path.join(dir, 'missing.raw'), '--target', path.join(dir, 'x.raw')]);
  t.equal(r.code, 3, 'missing source: exit 3');
  t.match(r.stderr, /Cannot read source .*missing\.raw.*no such file/);

  r = await shear(['backup', '--source', src, '--target', existing]);
  t.equal(r.code, 4, 'existing target: exit 4');
  t.match(r.stderr, /already exists \(use --force/);
  t.ok(readFileSync(existing).equals(before), 'the existing file is untouched');

  r = await shear(['backup', '--source', src, '--target', path.join(dir, 'y.raw'), '--workers', 'zero']);
  t.equal(r.code, 2, 'bad --workers: exit 2');
  t.match(r.stderr, /Invalid --workers "zero"/);

  r = await shear(['backup', '--source', src, '--target', path.join(dir, 'y.raw'), '--bogus']);
  t.equal(r.code, 2);
  t.match(r.stderr, /Unknown option '--bogus'/);

  r = await shear(['backup', '--source', src, '--target', path.join(dir, 'y.raw'), '--compress']);
  t.equal(r.code, 2);
  t.match(r.stderr, /--compress needs --target-format qcow2/);

  r = await shear(['backup', '--source', src, '--target', path.join(dir, 'no-such-dir', 'y.raw')]);
  t.not(r.code, 0, 'unwritable target fails');
  t.match(r.stderr, /Cannot create target/);

  r = await shear(['backup', '--source', dir, '--target', path.join(dir, 'z.raw')]);
  t.equal(r.code, 2);
  t.match(r.stderr, /not a regular file/);

  r = await shear(['frobnicate']);
  t.equal(r.code, 2);
  t.match(r.stderr, /unknown command "frobnicate"/);
  t.notOk(existsSync(path.join(dir, 'y.raw')));
  t.ok(noPartialFiles(dir));
});

t.test('shear backup: an interrupted backup leaves no file that looks finished', async (t) => {
  const dir = t.testdir();
  const src = path.join(dir, 'disk.raw');
  makeRawImage(src, 64 * MiB, 4);
  const dst = path.join(dir, 'backup.raw');
  const r = await shear(['backup', '--source', src, '--target', dst, '--speed', '8M', '--log-level', 'info'], {
    onSpawn: (kill, stderr) => {
      const poll = setInterval(() => {
        if (stderr().includes('backup started')) {
          clearInterval(poll);
          setTimeout(() => kill('SIGINT'), 200);
        }
      }, 20);
    },
  });
  t.equal(r.code, 130, `interrupted: exit 130 (${r.stderr.slice(-300)})`);
  t.notOk(existsSync(dst), 'no target file');
  t.ok(noPartialFiles(dir), 'no partial file');
});

t.test('shear backup --sync bitmap: an offline incremental from a persistent bitmap, chained on the previous backup', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = t.testdir();
  const disk = path.join(dir, 'disk.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', disk, String(16 * MiB));
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 16M', disk]);
  // A full backup, then a persistent bitmap starts tracking (as a VM's bitmap would).
  let r = await shear(['backup', '--source', disk, '--target', path.join(dir, 'full.qcow2'), '--target-format', 'qcow2']);
  t.equal(r.code, 0, r.stderr);
  qemuImg('bitmap', '--add', disk, 'b0');
  // The VM writes (qemu-io records the writes in the enabled bitmap), then shuts down.
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x22 1M 128k', '-c', 'write -P 0x33 9M 64k', disk]);
  const inc = path.join(dir, 'inc.qcow2');
  r = await shear(['backup', '--source', disk, '--target', inc, '--target-format', 'qcow2', '--sync', 'bitmap', '--bitmap', 'b0', '--backing', path.join(dir, 'full.qcow2'), '--json']);
  t.equal(r.code, 0, r.stderr);
  t.match(JSON.parse(r.stdout), { sync: 'bitmap', copiedBytes: 3 * 65536 });
  t.ok(qemuImgSame(disk, inc), 'the incremental on its chain equals the disk');
  t.equal(qemuImgCheck(inc)['check-errors'], 0);
  const info = JSON.parse(qemuImg('info', '--output=json', disk));
  t.match(info['format-specific'].data.bitmaps, [{ name: 'b0', flags: ['auto'] }], 'the bitmap is stored back consistent');
  // It was cleared by the successful backup: a second incremental copies nothing.
  r = await shear(['backup', '--source', disk, '--target', path.join(dir, 'inc2.qcow2'), '--target-format', 'qcow2', '--sync', 'bitmap', '--bitmap', 'b0', '--json']);
  t.equal(r.code, 0, r.stderr);
  t.equal(JSON.parse(r.stdout).copiedBytes, 0);
  r = await shear(['backup', '--source', disk, '--target', path.join(dir, 'x.qcow2'), '--target-format', 'qcow2', '--sync', 'bitmap', '--bitmap', 'nope']);
  t.equal(r.code, 3);
  t.match(r.stderr, /carries no persistent bitmap "nope" \(have: b0\)/);
});
