import t from 'tap';
import { existsSync, readFileSync, readdirSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { requireTools } from '@shear/testkit';
import { shear } from '../lib/cli.js';
import { qemuImg, qemuImgCheck, qemuImgSame } from '../lib/images.js';
import { CHAIN_DISK_BYTES, buildChain, flipByte } from '../lib/backup-chain.js';

const MiB = 2 ** 20;

function leftovers(dir: string): string[] {
  return readdirSync(dir).filter((f) => f.includes('shear-partial'));
}

t.test('shear restore: every point of a qemu-img chain, raw and qcow2, verified against the manifests and QEMU', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = t.testdir();
  const chain = await buildChain(dir);
  for (const [i, link] of chain.links.entries()) {
    // Every point as raw; the last also as qcow2 (the same copy, another target driver).
    for (const format of i === chain.links.length - 1 ? (['raw', 'qcow2'] as const) : (['raw'] as const)) {
      const target = path.join(dir, `restored-${i}.${format}`);
      const r = await shear(['restore', '--chain', link, '--target', target, '--format', format, '--verify', '--json', '--workers', '2']);
      t.equal(r.code, 0, `${path.basename(link)} -> ${format}: ${r.stderr}`);
      const s = JSON.parse(r.stdout);
      t.match(s, { target, format, bytes: CHAIN_DISK_BYTES, verified: true, workers: 2, retries: 0 });
      t.equal(s.chain.length, i + 1, 'the chain is walked down to the full');
      t.equal(s.copiedBytes + s.zeroBytes, CHAIN_DISK_BYTES, 'every byte copied or left as zero');
      t.ok(qemuImgSame(link, target), `qemu-img compare: restored ${path.basename(link)} as ${format} is the chain's point`);
      const info = JSON.parse(qemuImg('info', '--output=json', target));
      t.equal(info.format, format);
      t.notOk(info['backing-filename'], 'the restored image stands alone');
      if (format === 'qcow2') t.equal(qemuImgCheck(target)['check-errors'], 0, 'qemu-img check');
      // Zeroes stay holes: the disk has ~half its clusters as holes or zeroes.
      if (format === 'raw') t.ok(statSync(target).blocks * 512 < CHAIN_DISK_BYTES * 0.8, 'zeroes and holes stay holes in the raw target');
    }
  }
  t.same(leftovers(dir), [], 'no partial files');
});

t.test('shear restore: text summary, help, and a target that exists', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = t.testdir();
  const chain = await buildChain(dir);
  const target = path.join(dir, 'out.raw');
  writeFileSync(target, 'precious');
  const refused = await shear(['restore', '--chain', chain.links[2]!, '--target', target]);
  t.equal(refused.code, 4, 'exit 4: the target exists');
  t.match(refused.stderr, /already exists \(use --force/);
  t.equal(readFileSync(target, 'utf8'), 'precious', 'the existing target is untouched');
  const forced = await shear(['restore', '--chain', chain.links[2]!, '--target', target, '--force']);
  t.equal(forced.code, 0, forced.stderr);
  t.match(forced.stdout, /^restored .*inc2\.qcow2 \(3 links\) -> .*out\.raw: 20\.1 MiB/);
  t.ok(qemuImgSame(chain.links[2]!, target));
  const help = await shear(['help', 'restore']);
  t.equal(help.code, 0);
  t.match(help.stdout, /usage: shear restore --chain LAST --target PATH\|URL/);
  t.same(leftovers(dir), []);
});

t.test('shear restore: bad input gets a clear error and leaves nothing behind', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = t.testdir();
  const chain = await buildChain(dir);
  const [base, inc1, inc2] = chain.links as [string, string, string];
  const target = path.join(dir, 'out.raw');
  const run = (...extra: string[]) => shear(['restore', '--chain', inc2, '--target', target, ...extra]);

  t.test('wrong format', async (t) => {
    const r = await run('--format', 'vmdk');
    t.equal(r.code, 2);
    t.match(r.stderr, /Invalid --format "vmdk": expected raw or qcow2/);
  });
  t.test('onto a link of the chain itself, even with --force', async (t) => {
    const r = await shear(['restore', '--chain', inc2, '--target', base, '--force']);
    t.equal(r.code, 2);
    t.match(r.stderr, /is a link of the chain being restored/);
  });
  t.test('--verify without manifests', async (t) => {
    const r = await run('--verify', '--no-manifests');
    t.equal(r.code, 2);
  });
  t.test('the last backup itself is missing', async (t) => {
    const r = await shear(['restore', '--chain', path.join(dir, 'nope.qcow2'), '--target', target]);
    t.equal(r.code, 3);
    t.match(r.stderr, /nope\.qcow2": no such file/);
  });
  t.test('a missing link', async (t) => {
    renameSync(inc1, inc1 + '.away');
    t.teardown(() => renameSync(inc1 + '.away', inc1));
    const r = await run();
    t.equal(r.code, 3, 'exit 3: not found');
    t.match(r.stderr, /link ".*inc1\.qcow2" is missing \(the backing file "inc1\.qcow2" of ".*inc2\.qcow2"\)/);
    // Without manifests the same walk finds the hole.
    t.equal((await run('--no-manifests')).code, 3);
  });
  t.test('a link whose finalise was interrupted (manifest still .tmp)', async (t) => {
    const m = inc1 + '.shear-manifest.json';
    renameSync(m, m + '.tmp');
    t.teardown(() => renameSync(m + '.tmp', m));
    const r = await run();
    t.equal(r.code, 6);
    t.match(r.stderr, /inc1\.qcow2": it is unfinished .*finalise was interrupted/);
  });
  t.test('a link without any manifest', async (t) => {
    const m = base + '.shear-manifest.json';
    renameSync(m, m + '.away');
    t.teardown(() => renameSync(m + '.away', m));
    const r = await run();
    t.equal(r.code, 3);
    t.match(r.stderr, /Cannot find the manifest of ".*base\.raw"/);
    const r2 = await run('--no-manifests');
    t.equal(r2.code, 0, 'a chain without manifests restores with --no-manifests');
    rmSync(target);
  });
  t.test('a parent that is not the backup the increment was taken on', async (t) => {
    const m = inc1 + '.shear-manifest.json';
    const saved = readFileSync(m, 'utf8');
    t.teardown(() => writeFileSync(m, saved));
    const json = JSON.parse(saved);
    json.parent.sha256 = '0'.repeat(64);
    writeFileSync(m, JSON.stringify(json));
    const r = await run();
    t.equal(r.code, 6, 'exit 6: broken chain');
    t.match(r.stderr, /Broken chain at ".*inc1\.qcow2": its parent ".*base\.raw" is not the backup it was taken on/);
  });
  t.test('a corrupted byte: --verify names its MiB and keeps no target', async (t) => {
    flipByte(base, 5 * MiB + 1234);
    t.teardown(() => flipByte(base, 5 * MiB + 1234));
    const r = await run('--verify');
    t.equal(r.code, 7, 'exit 7: mismatch');
    t.match(r.stderr, /differs from the manifest in 1 chunk: MiB 5; nothing was left behind/);
  });
  t.test('nothing is left behind', async (t) => {
    t.notOk(existsSync(target), 'no target was written by any failing run');
    t.same(leftovers(dir), []);
  });
});

t.test('shear restore: SIGINT during the copy leaves no target and no partial file', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = t.testdir();
  const chain = await buildChain(dir);
  const target = path.join(dir, 'out.qcow2');
  let poll: NodeJS.Timeout | undefined;
  const r = await shear(['restore', '--chain', chain.links[2]!, '--target', target, '--format', 'qcow2'], {
    env: { SHEAR_PAUSE_AT: 'copy' },
    onSpawn: (kill, stderr) => {
      poll = setInterval(() => {
        if (stderr().includes('paused at copy')) {
          clearInterval(poll);
          kill('SIGINT');
        }
      }, 20);
    },
  });
  clearInterval(poll);
  t.equal(r.code, 130, r.stderr);
  t.match(r.stderr, /interrupted; nothing was written to .*out\.qcow2/);
  t.notOk(existsSync(target));
  t.same(leftovers(dir), []);
});
