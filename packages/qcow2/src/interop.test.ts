import t, { type Test } from 'tap';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { requireTools } from '@shear/testkit';
import { Qcow2Image } from './index.js';
import { TestFileIO, backingOpener, openTestImage } from './test-file-io.fixture.js';
import { mapByCluster, patternBytes, qemuCheck, qemuCompare, qemuImg, qemuInfo, qemuIo, qemuMap } from './test-qemu.fixture.js';

const KiB = 1024;
const MiB = 1024 * KiB;

function toRaw(dir: string, image: string): Uint8Array {
  const out = join(dir, `${image}.expected.raw`);
  qemuImg('convert', '-O', 'raw', join(dir, image), out);
  return new Uint8Array(readFileSync(out));
}

async function readAll(img: Qcow2Image): Promise<Uint8Array> {
  const buf = new Uint8Array(img.length);
  await img.read(0, buf);
  return buf;
}

/** Applies the same writes to the image and to a byte model. */
async function applyWrites(img: Qcow2Image, model: Uint8Array, seed: number): Promise<void> {
  const C = img.clusterBytes;
  const len = img.length;
  const unit = Math.min(C, len / 16);
  const writes: [number, number][] = [
    [0, 512],
    [C - 100, 300],
    [3 * unit + 17, 2 * unit],
    [Math.floor(len / 2), Math.min(C * 3, 1 * MiB)],
    [len - 700, 700],
  ];
  for (const [i, [off, bytes]] of writes.entries()) {
    const data = patternBytes(bytes, seed + i);
    await img.write(off, data);
    model.set(data, off);
  }
  await img.writeZeroes(unit * 5 + 1, unit * 2);
  model.fill(0, unit * 5 + 1, unit * 7 + 1);
}

function assertClean(t: Test, path: string): void {
  const c = qemuCheck(path);
  t.equal(c['check-errors'], 0, 'qemu-img check: no errors');
  t.notOk(c.leaks, 'qemu-img check: no leaks');
  t.notOk(c.corruptions, 'qemu-img check: no corruptions');
}

function assertSame(t: Test, dir: string, image: string, model: Uint8Array): void {
  const raw = join(dir, `${image}.model.raw`);
  writeFileSync(raw, model);
  const r = qemuCompare(join(dir, image), 'qcow2', raw, 'raw');
  t.ok(r.same, `qemu-img compare equal (${r.output.trim()})`);
}

t.test('qemu-made images read correctly and stay clean after Shear writes', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
  for (const clusterBytes of [4096, 65536, 2 * MiB]) {
    await t.test(`cluster size ${clusterBytes}`, async (t) => {
      const dir = t.testdir();
      const name = 'a.qcow2';
      const path = join(dir, name);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${clusterBytes}`, path, '8M');
      qemuIo(path, [
        'write -P 0xab 0 1M',
        'write -P 0xcd 3146240 100k',
        `write -z ${2 * MiB} ${clusterBytes}`,
        `discard ${Math.max(512 * KiB, clusterBytes)} ${clusterBytes}`,
        `write -c -P 0x11 ${4 * MiB} ${clusterBytes}`,
        `write -P 0x22 ${6 * MiB + 4096} 4096`,
      ]);
      const model = toRaw(dir, name);
      const img = await openTestImage(path);
      t.same(Buffer.from(await readAll(img)).equals(Buffer.from(model)), true, 'Shear reads what qemu wrote');
      await applyWrites(img, model, clusterBytes);
      t.ok(Buffer.from(await readAll(img)).equals(Buffer.from(model)), 'reads back its own writes');
      await img.close();
      assertClean(t, path);
      assertSame(t, dir, name, model);
    });
  }
});

t.test('raw backing file: copy-on-write, short backing, discard keeps backing data hidden', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = t.testdir();
  const base = patternBytes(3 * MiB + 4096, 7);
  writeFileSync(join(dir, 'base.raw'), base);
  const name = 'top.qcow2';
  const path = join(dir, name);
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', '-b', 'base.raw', '-F', 'raw', path, '5M');
  qemuIo(path, ['write -P 0x5a 65536 65536', 'write -P 0x5b 100000 1000']);
  const model = toRaw(dir, name);
  const img = await openTestImage(path);
  t.ok(Buffer.from(await readAll(img)).equals(Buffer.from(model)), 'reads through to the backing file, zeroes past its end');
  await applyWrites(img, model, 99);
  // Discard a whole cluster that came from the backing file: it must read zeroes, not old data.
  await img.discard(20 * 65536, 65536);
  model.fill(0, 20 * 65536, 21 * 65536);
  // A write straddling the end of the backing file copies what exists and zeroes the rest.
  const straddle = patternBytes(300, 3);
  await img.write(3 * MiB + 4096 - 100, straddle);
  model.set(straddle, 3 * MiB + 4096 - 100);
  t.ok(Buffer.from(await readAll(img)).equals(Buffer.from(model)), 'reads back');
  await img.close();
  assertClean(t, path);
  assertSame(t, dir, name, model);
});

t.test('qcow2 backing chain made partly by qemu and partly by Shear', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = t.testdir();
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', join(dir, 'base.qcow2'), '4M');
  qemuIo(join(dir, 'base.qcow2'), ['write -P 0x01 0 2M', 'write -P 0x02 3M 512k']);
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', '-b', 'base.qcow2', '-F', 'qcow2', join(dir, 'mid.qcow2'), '4M');
  qemuIo(join(dir, 'mid.qcow2'), ['write -P 0x03 1M 64k', 'write -z 3M 64k']);
  const top = await Qcow2Image.create(await TestFileIO.open(join(dir, 'top.qcow2'), { create: true }), {
    size: 4 * MiB,
    clusterBytes: 16384,
    backingFile: 'mid.qcow2',
    backingFormat: 'qcow2',
    openBacking: backingOpener(dir),
  });
  const model = toRaw(dir, 'mid.qcow2');
  t.ok(Buffer.from(await readAll(top)).equals(Buffer.from(model)), 'a new overlay reads as its backing chain');
  await applyWrites(top, model, 5);
  await top.close();
  assertClean(t, join(dir, 'top.qcow2'));
  assertSame(t, dir, 'top.qcow2', model);
  const chain = JSON.parse(qemuImg('info', '--output=json', '--backing-chain', join(dir, 'top.qcow2'))) as { filename: string; format: string }[];
  t.same(
    chain.map((c) => c.format),
    ['qcow2', 'qcow2', 'qcow2'],
  );
});

t.test('a compressed image from qemu-img convert -c reads equal to its source', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const src = new Uint8Array(4 * MiB);
  for (let i = 0; i < src.length; i++) src[i] = (i >> 12) & 0xff; // compressible
  src.set(patternBytes(300 * KiB, 11), MiB + 1234); // incompressible
  writeFileSync(join(dir, 'src.raw'), src);
  qemuImg('convert', '-c', '-O', 'qcow2', join(dir, 'src.raw'), join(dir, 'c.qcow2'));
  const img = await openTestImage(join(dir, 'c.qcow2'));
  t.ok(Buffer.from(await readAll(img)).equals(Buffer.from(src)), 'whole-image read');
  const piece = new Uint8Array(5000);
  await img.read(2 * MiB - 2500, piece);
  t.ok(Buffer.from(piece).equals(Buffer.from(src.subarray(2 * MiB - 2500, 2 * MiB + 2500))), 'read across compressed clusters');
  const model = src.slice();
  await applyWrites(img, model, 21);
  await img.discard(3 * MiB, 65536);
  model.fill(0, 3 * MiB, 3 * MiB + 65536);
  await img.close();
  assertClean(t, join(dir, 'c.qcow2'));
  assertSame(t, dir, 'c.qcow2', model);
});

t.test('Shear writes compressed clusters that qemu reads', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const size = 2 * MiB + 3 * 512; // the last cluster is short
  const img = await Qcow2Image.create(await TestFileIO.open(join(dir, 'w.qcow2'), { create: true }), { size, clusterBytes: 65536 });
  const model = new Uint8Array(img.length);
  for (let c = 0; c * 65536 < img.length; c++) {
    const bytes = Math.min(65536, img.length - c * 65536);
    const data = c % 3 === 2 ? patternBytes(bytes, c) : new Uint8Array(bytes).fill(c);
    await img.writeCompressed(c * 65536, data);
    model.set(data, c * 65536);
  }
  // Overwrite parts of compressed clusters (copy-on-write from the compressed data).
  const over = patternBytes(1000, 77);
  await img.write(65536 + 100, over);
  model.set(over, 65536 + 100);
  await img.writeCompressed(4 * 65536, new Uint8Array(65536).fill(0xee));
  model.fill(0xee, 4 * 65536, 5 * 65536);
  t.ok(Buffer.from(await readAll(img)).equals(Buffer.from(model)), 'reads back');
  await t.rejects(img.writeCompressed(100, new Uint8Array(65536)), { code: 'ERR_INVALID_ARGUMENT' });
  await img.close();
  assertClean(t, join(dir, 'w.qcow2'));
  assertSame(t, dir, 'w.qcow2', model);
  const check = qemuCheck(join(dir, 'w.qcow2')) as { 'compressed-clusters'?: number };
  t.ok((check['compressed-clusters'] ?? 0) > 10, `qemu sees compressed clusters (${check['compressed-clusters']})`);
});

t.test('blockStatus agrees with qemu-img map on allocation', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = t.testdir();
  const C = 65536;
  writeFileSync(join(dir, 'base.raw'), patternBytes(MiB, 1));
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', join(dir, 'q.qcow2'), '4M');
  qemuIo(join(dir, 'q.qcow2'), ['write -P 1 0 128k', 'write -z 256k 128k', 'write -P 2 1M 64k', 'write -c -P 3 2M 64k']);
  const shear = await Qcow2Image.create(await TestFileIO.open(join(dir, 's.qcow2'), { create: true }), { size: 4 * MiB });
  await shear.write(0, new Uint8Array(3 * C).fill(1));
  await shear.write(5 * C, new Uint8Array(3 * C).fill(4));
  await shear.writeZeroes(5 * C, 2 * C); // allocated: keeps the clusters, sets the zero flag
  await shear.writeZeroes(9 * C, 2 * C); // unallocated without backing: stays unallocated
  await shear.write(20 * C + 5, new Uint8Array(10).fill(2));
  await shear.discard(C, C);
  await shear.close();
  for (const name of ['q.qcow2', 's.qcow2']) {
    const img = await openTestImage(join(dir, name), { readOnly: true });
    const ours: string[] = [];
    for (let off = 0; off < img.length; ) {
      for (const x of await img.blockStatus(off, img.length - off)) {
        for (let o = x.offset; o < x.offset + x.bytes; o += C) ours.push(x.allocated ? (x.data ? 'data' : 'zero') : 'below');
        off = x.offset + x.bytes;
      }
    }
    const theirs = mapByCluster(qemuMap(join(dir, name)), C, img.length);
    t.same(ours, theirs, `${name}: per-cluster allocation`);
    t.ok(['data', 'zero', 'below'].every((k) => ours.includes(k)), `${name}: the pattern has data, zero and unallocated clusters`);
    await img.close();
  }
});
