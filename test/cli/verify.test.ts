import t from 'tap';
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { requireTools } from '@shear/testkit';
import { shear } from '../lib/cli.js';
import { buildChain, flipByte, hostOffsetOf } from '../lib/backup-chain.js';

const MiB = 2 ** 20;

t.test('shear verify: a sound chain, then corrupted bytes named by their MiB in every link that reads them', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = t.testdir();
  const chain = await buildChain(dir);
  const [base, inc1, inc2] = chain.links as [string, string, string];

  const ok = await shear(['verify', inc2, '--json']);
  t.equal(ok.code, 0, ok.stderr);
  const report = JSON.parse(ok.stdout);
  t.equal(report.ok, true);
  t.same(report.problems, []);
  t.same(report.links.map((l: { image: string }) => path.basename(l.image)), ['inc2.qcow2', 'inc1.qcow2', 'base.raw'], 'every link, last first');
  t.same(report.links.map((l: { kind: string }) => l.kind), ['incremental', 'incremental', 'full']);
  t.equal(report.links[2].hashedChunks, 21, 'the full is hashed whole');
  t.ok(report.links[0].hashedChunks < 6 && report.links[1].hashedChunks < 6, 'an incremental only where its own layer allocates');
  const text = await shear(['verify', inc1]);
  t.equal(text.code, 0, text.stderr);
  t.match(text.stdout, /verified .*inc1\.qcow2: 2 link\(s\) match their manifests/);

  // One byte of the full (MiB 5, which no increment rewrites) and one of inc2's own data (MiB 12).
  flipByte(base, 5 * MiB + 777);
  flipByte(inc2, hostOffsetOf(inc2, 12 * MiB + 100));
  const bad = await shear(['verify', inc2, '--json']);
  t.equal(bad.code, 7, 'exit 7: mismatch');
  const r = JSON.parse(bad.stdout);
  t.equal(r.ok, false);
  const mibs = (i: number) => r.links[i].mismatches.map((m: { mib: number }) => m.mib);
  t.same(mibs(0), [5, 12], 'inc2 reads both corrupted MiBs');
  t.same(mibs(1), [5], 'inc1 reads the full\'s corrupted MiB');
  t.same(mibs(2), [5], 'the full itself');
  t.match(r.links[0].mismatches[0], { index: 5, offset: 5 * MiB, bytes: MiB });
  t.match(bad.stderr, /Verification failed: .*inc2\.qcow2: MiB 5, MiB 12; .*inc1\.qcow2: MiB 5; .*base\.raw: MiB 5/);
  const plain = await shear(['verify', inc1]);
  t.equal(plain.code, 7);
  t.match(plain.stdout, /MISMATCH +.*inc1\.qcow2 \(incremental\): 1 chunk\(s\) differ:\n +MiB 5 \(offset 5242880, 1048576 bytes\)/);
  t.match(plain.stdout, /verify .*inc1\.qcow2: FAILED/);
});

t.test('shear verify: missing link, missing or unfinished manifest, broken parent digest, usage', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = t.testdir();
  const chain = await buildChain(dir);
  const [base, inc1, inc2] = chain.links as [string, string, string];

  t.test('a missing link: exit 3, the file named', async (t) => {
    renameSync(base, base + '.away');
    t.teardown(() => renameSync(base + '.away', base));
    const r = await shear(['verify', inc2]);
    t.equal(r.code, 3);
    t.match(r.stderr, /link ".*base\.raw" is missing \(the backing file "base\.raw" of ".*inc1\.qcow2"\)/);
  });
  t.test('a link without a manifest: exit 3', async (t) => {
    const m = inc1 + '.shear-manifest.json';
    renameSync(m, m + '.away');
    t.teardown(() => renameSync(m + '.away', m));
    const r = await shear(['verify', inc2]);
    t.equal(r.code, 3);
    t.match(r.stderr, /Cannot find the manifest of ".*inc1\.qcow2"/);
  });
  t.test('an unfinished pull beside a link: exit 6', async (t) => {
    const m = inc2 + '.shear-manifest.json';
    renameSync(m, m + '.away');
    writeFileSync(inc2 + '.shear-pull-state', '{}');
    t.teardown(() => {
      renameSync(m + '.away', m);
      renameSync(inc2 + '.shear-pull-state', path.join(dir, 'state.away'));
    });
    const r = await shear(['verify', inc2]);
    t.equal(r.code, 6);
    t.match(r.stderr, /inc2\.qcow2": it is unfinished \(the pull state file .* is there: finish it with shear pull --resume\)/);
  });
  t.test('a parent digest that does not match: exit 6, still checks every chunk', async (t) => {
    const m = inc2 + '.shear-manifest.json';
    const saved = readFileSync(m, 'utf8');
    t.teardown(() => writeFileSync(m, saved));
    const json = JSON.parse(saved);
    json.parent.sha256 = 'f'.repeat(64);
    writeFileSync(m, JSON.stringify(json));
    const r = await shear(['verify', inc2, '--json']);
    t.equal(r.code, 6);
    const report = JSON.parse(r.stdout);
    t.equal(report.ok, false);
    t.equal(report.problems.length, 1);
    t.match(report.problems[0], /Broken chain at ".*inc2\.qcow2": its parent ".*inc1\.qcow2" is not the backup it was taken on/);
    t.ok(report.links.every((l: { mismatches: unknown[] }) => l.mismatches.length === 0), 'the bytes themselves match');
  });
  t.test('a manifest that is not JSON: exit 6', async (t) => {
    const m = base + '.shear-manifest.json';
    const saved = readFileSync(m, 'utf8');
    t.teardown(() => writeFileSync(m, saved));
    writeFileSync(m, '{"format": "shear-backup-manifest", ');
    const r = await shear(['verify', inc1]);
    t.equal(r.code, 6);
    t.match(r.stderr, /Invalid backup manifest ".*base\.raw\.shear-manifest\.json": not JSON/);
  });
  t.test('usage', async (t) => {
    t.equal((await shear(['verify'])).code, 2);
    t.equal((await shear(['verify', inc1, inc2])).code, 2);
    const help = await shear(['help', 'verify']);
    t.match(help.stdout, /usage: shear verify BACKUP/);
  });
});
