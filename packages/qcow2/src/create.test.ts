import t from 'tap';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { requireTools } from '@shear/testkit';
import { Qcow2Image, planLayout } from './index.js';
import { TestFileIO, openTestImage } from './test-file-io.fixture.js';
import { qemuCheck, qemuInfo } from './test-qemu.fixture.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

async function createAt(path: string, opts: Parameters<typeof Qcow2Image.create>[1]): Promise<Qcow2Image> {
  return Qcow2Image.create(await TestFileIO.open(path, { create: true }), opts);
}

t.test('new images pass qemu-img check and show the right geometry', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const cases = [
    { size: 0, clusterBytes: 65536, refcountBits: 16 },
    { size: 1000, clusterBytes: 65536, refcountBits: 16 },
    { size: 10 * MiB, clusterBytes: 512, refcountBits: 1 },
    { size: 10 * MiB, clusterBytes: 4096, refcountBits: 8 },
    { size: 3 * GiB, clusterBytes: 65536, refcountBits: 64 },
    { size: 5 * GiB + 512, clusterBytes: 2 * MiB, refcountBits: 2 },
    // Metadata spans several refcount blocks: 512-byte clusters, 64-bit refcounts.
    { size: 1 * GiB, clusterBytes: 512, refcountBits: 64 },
  ];
  for (const [i, c] of cases.entries()) {
    const path = join(dir, `img${i}.qcow2`);
    const img = await createAt(path, c);
    t.equal(img.length, Math.ceil(c.size / 512) * 512, `length of case ${i}`);
    await img.close();
    const check = qemuCheck(path);
    t.equal(check['check-errors'], 0, `case ${i}: no check errors`);
    t.notOk(check.leaks, `case ${i}: no leaks`);
    t.notOk(check.corruptions, `case ${i}: no corruptions`);
    const info = qemuInfo(path);
    t.equal(info['virtual-size'], Math.ceil(c.size / 512) * 512, `case ${i}: virtual size`);
    t.equal(info['cluster-size'], c.clusterBytes, `case ${i}: cluster size`);
    const specific = (info['format-specific'] as { data: Record<string, unknown> }).data;
    t.equal(specific['refcount-bits'], c.refcountBits, `case ${i}: refcount bits`);
    t.equal(specific['compat'], '1.1', `case ${i}: version 3`);
  }
  t.ok(planLayout({ size: GiB, clusterBytes: 512, refcountBits: 64 }).refcountBlocks > 1, 'the multi-block layout was exercised');
});

t.test('backing file and format are recorded', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  writeFileSync(join(dir, 'base.raw'), new Uint8Array(MiB));
  const img = await createAt(join(dir, 'top.qcow2'), {
    size: 2 * MiB,
    backingFile: 'base.raw',
    backingFormat: 'raw',
    backing: null,
  });
  t.same(img.info.backingFile, 'base.raw');
  t.same(img.info.backingFormat, 'raw');
  await img.close();
  const info = qemuInfo(join(dir, 'top.qcow2'));
  t.equal(info['backing-filename'], 'base.raw');
  t.equal(info['backing-filename-format'], 'raw');
  t.equal(qemuCheck(join(dir, 'top.qcow2'))['check-errors'], 0);
  const reopened = await openTestImage(join(dir, 'top.qcow2'), { readOnly: true });
  t.equal(reopened.info.backingFile, 'base.raw');
  await reopened.close();
});

t.test('bad create options are refused before anything is written', async (t) => {
  const dir = t.testdir();
  const bad = [
    [{ size: MiB, clusterBytes: 1000 }, 'ERR_INVALID_ARGUMENT'],
    [{ size: MiB, clusterBytes: 4 * MiB }, 'ERR_INVALID_ARGUMENT'],
    [{ size: MiB, refcountBits: 3 }, 'ERR_INVALID_ARGUMENT'],
    [{ size: -1 }, 'ERR_INVALID_ARGUMENT'],
    [{ size: MiB, backingFormat: 'raw' }, 'ERR_INVALID_ARGUMENT'],
    [{ size: MiB, backingFile: 'x.raw' }, 'ERR_INVALID_ARGUMENT'],
    [{ size: MiB, backingFile: 'x'.repeat(1024), backing: null }, 'ERR_INVALID_ARGUMENT'],
    [{ size: 2 ** 50, clusterBytes: 512 }, 'ERR_INVALID_ARGUMENT'],
  ] as const;
  for (const [i, [opts, code]] of bad.entries()) {
    await t.rejects(createAt(join(dir, `bad${i}.qcow2`), opts), { code }, `case ${i}`);
  }
});
