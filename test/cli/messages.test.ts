import t from 'tap';
import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, truncateSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { requireTools } from '@shear/testkit';
import { SHEAR_BIN, shear } from '../lib/cli.js';
import { makeRawImage, qemuImgCheck } from '../lib/images.js';

// Issue 14 items 6 and 7 and --retries: messages a person can act on, and exit statuses.

const MiB = 2 ** 20;

t.test('--version, and option errors print usage', async (t) => {
  const pkg = JSON.parse(readFileSync(new URL('../../packages/cli/package.json', import.meta.url), 'utf8')) as { version: string };
  const v = await shear(['--version']);
  t.equal(v.code, 0);
  t.equal(v.stdout, `shear ${pkg.version}\n`);
  t.match((await shear(['help'])).stdout, /--version/);

  const dir = t.testdir();
  const src = path.join(dir, 'disk.raw');
  makeRawImage(src, MiB, 1);
  for (const [opt, value, msg] of [
    ['--max-chunk', 'abc', /Cannot parse --max-chunk "abc"/],
    ['--speed', '1x', /Cannot parse --speed "1x"/],
    ['--retries', 'two', /Invalid --retries "two"/],
    ['--retries=-1', '', /Invalid --retries "-1"/],
  ] as const) {
    const r = await shear(['backup', '--source', src, '--target', path.join(dir, 'out.raw'), opt, ...(value ? [value] : [])]);
    t.equal(r.code, 2, `${opt} ${value}: exit 2`);
    t.match(r.stderr, msg);
    t.match(r.stderr, /usage: shear backup/, `${opt} ${value}: usage follows`);
  }
  const h = await shear(['help', 'backup']);
  t.match(h.stdout, /--retries N .*\n.*\(default 3; 0 = fail at the first error\)/);
  const ok = await shear(['backup', '--source', src, '--target', path.join(dir, 'out.raw'), '--retries', '0', '--json']);
  t.equal(ok.code, 0, ok.stderr);
  t.match(JSON.parse(ok.stdout), { retries: 0 }, 'the summary counts retries');
});

t.test('a truncated qcow2 source: exit 6, the image and the offset named, no target', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = t.testdir();
  const full = path.join(dir, 'full.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', full, '16M']);
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 16M', full]);
  for (const [size, why] of [
    [200_000, /an L2 table \(L1 entry 0\) at offset 262144 .*past the end of the file \(200000 bytes\)/],
    [MiB, /the data of guest cluster 11 .* at offset 1048576 .*past the end of the file \(1048576 bytes\)/],
  ] as const) {
    const src = path.join(dir, `cut-${size}.qcow2`);
    copyFileSync(full, src);
    truncateSync(src, size);
    t.ok((qemuImgCheck(src).corruptions ?? 0) > 0, `${size}: qemu-img check calls it corrupt`);
    const dst = path.join(dir, 'out.raw');
    const r = await shear(['backup', '--source', src, '--target', dst]);
    t.equal(r.code, 6, `${size}: exit 6 (${r.stderr})`);
    t.match(r.stderr, new RegExp(`^shear: Cannot back up "${src.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}": the image is corrupt: `));
    t.match(r.stderr, why);
    t.notOk(existsSync(dst), 'no target');
    t.same(readdirSync(dir).filter((f) => f.includes('partial')), [], 'no partial file');
  }
});

t.test('a full target: exit 5, naming the target, what was written and what the copy needs', async (t) => {
  if (!requireTools(t, 'mount', 'umount')) return;
  if (process.getuid?.() !== 0) {
    if (process.env['CI'] === 'true') t.fail('this test mounts a small tmpfs and needs root');
    else t.skip('not root: cannot mount a small tmpfs');
    return;
  }
  const dir = t.testdir();
  const src = path.join(dir, 'disk.raw');
  const data = path.join(dir, 'data.bin');
  execFileSync('dd', ['if=/dev/urandom', `of=${data}`, 'bs=1M', 'count=16', 'status=none']);
  copyFileSync(data, src);
  // Outside the test directory, so that it is unmounted before anything removes it.
  const mnt = mkdtempSync(path.join(os.tmpdir(), 'shear-enospc-'));
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', mnt]);
  t.teardown(() => {
    spawnSync('umount', [mnt]);
    rmSync(mnt, { recursive: true, force: true });
  });
  const dst = path.join(mnt, 'out.raw');
  const r = await shear(['backup', '--source', src, '--target', dst, '--workers', '2']);
  t.equal(r.code, 5, `exit 5 (${r.stderr})`);
  const line = r.stderr.trim().split('\n').at(-1)!;
  t.match(line, `shear: Cannot write target "${dst}": no space left on its file system after `);
  t.match(line, /after \d+(\.\d)? [KM]iB of data were written; the copy needs about 16\.0 MiB and 8\.0 MiB were free when the backup started/);
  t.notMatch(r.stderr, /Cannot copy \(/, 'no raw block-copy message');
  t.same(readdirSync(mnt), [], 'nothing left on the full file system');
});

t.test('log records: human-readable on a terminal, JSON otherwise', async (t) => {
  if (!requireTools(t, 'script')) return;
  const dir = t.testdir();
  const src = path.join(dir, 'disk.raw');
  makeRawImage(src, MiB, 2);
  const json = await shear(['backup', '--source', src, '--target', path.join(dir, 'a.raw'), '--log-level', 'info']);
  t.equal(json.code, 0, json.stderr);
  const records = json.stderr.trim().split('\n').map((l) => JSON.parse(l) as { msg: string; level: number });
  t.match(records, [{ msg: 'backup started', level: 30 }, { msg: 'backup finished', level: 30 }], 'stderr not a TTY: one JSON record a line');

  // `script` runs the command on a pseudo-terminal, as a person's shell would.
  const cmd = [process.execPath, SHEAR_BIN, 'backup', '--source', src, '--target', path.join(dir, 'b.raw'), '--log-level', 'info'].map((a) => `'${a}'`).join(' ');
  const tty = spawnSync('script', ['-qec', cmd, '/dev/null'], { encoding: 'utf8' });
  t.equal(tty.status, 0, tty.stdout);
  t.match(tty.stdout, /\d\d:\d\d:\d\d\.\d{3} INFO  backup: backup started evt=backup\.start /);
  t.notMatch(tty.stdout, /\{"level"/, 'no raw JSON on the terminal');
});

t.test('--retries: failed ranges are retried, logged and counted; --retries 0 fails at once', async (t) => {
  const dir = t.testdir();
  const src = path.join(dir, 'disk.raw');
  execFileSync('dd', ['if=/dev/urandom', `of=${src}`, 'bs=1M', 'count=8', 'status=none']);
  // SHEAR_KILL_WORKERS (test-only): the worker threads of the first 2 tasks exit mid-copy.
  const env = { SHEAR_KILL_WORKERS: '2:65536' };
  const dst = path.join(dir, 'out.raw');
  const r = await shear(['backup', '--source', src, '--target', dst, '--json', '--max-chunk', '1M', '--workers', '2'], { env });
  t.equal(r.code, 0, r.stderr);
  t.match(JSON.parse(r.stdout), { retries: 2 }, 'two retries counted');
  const warns = r.stderr.trim().split('\n').map((l) => JSON.parse(l) as { level: number; evt: string; attempt: number; of: number });
  t.match(warns, [{ level: 40, evt: 'copy.retry', attempt: 1, of: 3 }, { level: 40, evt: 'copy.retry', attempt: 1, of: 3 }], 'each retry logged (warn)');
  t.ok(readFileSync(dst).equals(readFileSync(src)), 'the target is exact');

  const dst0 = path.join(dir, 'out0.raw');
  const r0 = await shear(['backup', '--source', src, '--target', dst0, '--max-chunk', '1M', '--workers', '2', '--retries', '0'], { env });
  t.equal(r0.code, 1, 'no retries: the first I/O error fails the backup');
  t.match(r0.stderr, /worker thread stopped/);
  t.notOk(existsSync(dst0));
  t.same(readdirSync(dir).filter((f) => f.includes('partial')), []);
});
