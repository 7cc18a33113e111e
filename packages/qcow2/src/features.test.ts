import t, { type Test } from 'tap';
import { readFileSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { requireTools } from '@shear/testkit';
import { Qcow2Image } from './index.js';
import { TestFileIO, openTestImage } from './test-file-io.fixture.js';
import { qemuCheck, qemuImg, qemuInfo, qemuIo } from './test-qemu.fixture.js';

const MiB = 1024 * 1024;

async function patch(path: string, offset: number, fn: (b: number) => number): Promise<void> {
  const fh = await open(path, 'r+');
  const b = new Uint8Array(1);
  await fh.read(b, 0, 1, offset);
  b[0] = fn(b[0]!);
  await fh.write(b, 0, 1, offset);
  await fh.close();
}

async function newImage(path: string, size = 4 * MiB): Promise<void> {
  const img = await Qcow2Image.create(await TestFileIO.open(path, { create: true }), { size });
  await img.write(0, new Uint8Array(70000).fill(7));
  await img.close();
}

function clean(t: Test, path: string): void {
  const c = qemuCheck(path);
  t.equal(c['check-errors'], 0, 'no check errors');
  t.notOk(c.leaks, 'no leaks');
}

t.test('unknown incompatible features are refused, even read-only', async (t) => {
  const dir = t.testdir();
  const path = join(dir, 'u.qcow2');
  await newImage(path);
  await patch(path, 78, (b) => b | 0x04); // incompatible bit 10
  await t.rejects(openTestImage(path, { readOnly: true }), { code: 'ERR_QCOW2_UNKNOWN_FEATURE', message: /bit 10/ });
  // The file is closed when open fails (the image owned it).
  const file = await TestFileIO.open(path, { readOnly: true });
  await t.rejects(Qcow2Image.open(file, { readOnly: true }));
  await t.rejects(file.read(0, new Uint8Array(1)), /closed/);
});

t.test('the dirty and corrupt bits allow reading but refuse writing', async (t) => {
  const dir = t.testdir();
  for (const [bit, name] of [[0x01, 'dirty'], [0x02, 'corrupt']] as const) {
    const path = join(dir, `${name}.qcow2`);
    await newImage(path);
    await patch(path, 79, (b) => b | bit);
    const ro = await openTestImage(path, { readOnly: true });
    const buf = new Uint8Array(10);
    await ro.read(0, buf);
    t.same([...buf], new Array(10).fill(7), `${name}: readable`);
    await ro.close();
    await t.rejects(openTestImage(path), { code: 'ERR_QCOW2_NEEDS_REPAIR', message: new RegExp(name) }, `${name}: not writable`);
  }
});

t.test('encryption, extended L2 and external data files are refused as not implemented', async (t) => {
  const dir = t.testdir();
  const enc = join(dir, 'enc.qcow2');
  await newImage(enc);
  await patch(enc, 35, () => 2); // crypt_method = LUKS
  await t.rejects(openTestImage(enc, { readOnly: true }), { code: 'ERR_NOT_IMPLEMENTED', message: /encryption/ });
  if (!requireTools(t, 'qemu-img')) return;
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', join(dir, 'ext.qcow2'), '1M');
  await t.rejects(openTestImage(join(dir, 'ext.qcow2'), { readOnly: true }), { code: 'ERR_NOT_IMPLEMENTED', message: /extended L2/ });
  qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${join(dir, 'data.raw')}`, join(dir, 'df.qcow2'), '1M');
  await t.rejects(openTestImage(join(dir, 'df.qcow2'), { readOnly: true }), { code: 'ERR_NOT_IMPLEMENTED', message: /external data/ });
});

t.test('malformed headers are refused', async (t) => {
  const dir = t.testdir();
  writeFileSync(join(dir, 'zero.bin'), new Uint8Array(65536));
  await t.rejects(openTestImage(join(dir, 'zero.bin'), { readOnly: true }), { code: 'ERR_QCOW2_CORRUPT', message: /magic/ });
  const v4 = join(dir, 'v4.qcow2');
  await newImage(v4);
  await patch(v4, 7, () => 4);
  await t.rejects(openTestImage(v4, { readOnly: true }), { code: 'ERR_NOT_IMPLEMENTED', message: /version 4/ });
  const big = join(dir, 'big.qcow2');
  await newImage(big);
  await patch(big, 23, () => 22);
  await t.rejects(openTestImage(big, { readOnly: true }), { code: 'ERR_NOT_IMPLEMENTED', message: /2 MiB/ });
});

t.test('unknown autoclear bits are cleared before writing; unknown extensions are kept', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const path = join(dir, 'a.qcow2');
  await newImage(path);
  // Insert an unknown header extension (type 0x12345678, 8 bytes) right after the header.
  const bytes = new Uint8Array(readFileSync(path));
  const headerLength = new DataView(bytes.buffer).getUint32(100);
  const ext = new Uint8Array([0x12, 0x34, 0x56, 0x78, 0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
  const rest = bytes.slice(headerLength, 4096 - ext.length);
  bytes.set(ext, headerLength);
  bytes.set(rest, headerLength + ext.length);
  bytes[95] = bytes[95]! | 0x20; // autoclear bit 5
  writeFileSync(path, bytes);

  const ro = await openTestImage(path, { readOnly: true });
  t.ok(ro.info.extensionTypes.includes(0x12345678), 'the unknown extension is seen');
  await ro.close();
  t.equal(readFileSync(path)[95]! & 0x20, 0x20, 'a read-only open leaves autoclear bits alone');

  const img = await openTestImage(path);
  await img.write(MiB, new Uint8Array(MiB).fill(9));
  await img.close();
  const after = readFileSync(path);
  t.equal(after[95]! & 0x20, 0, 'the unknown autoclear bit was cleared');
  t.same([...after.subarray(headerLength, headerLength + ext.length)], [...ext], 'the unknown extension is unchanged');
  clean(t, path);
});

t.test('persistent bitmaps: enabled ones refuse writes unless marked inconsistent, disabled ones stay valid', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const enabled = join(dir, 'en.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', enabled, '4M');
  qemuImg('bitmap', '--add', enabled, 'b0');
  await t.rejects(openTestImage(enabled), { code: 'ERR_NOT_IMPLEMENTED', message: /'b0'/ });
  await (await openTestImage(enabled, { readOnly: true })).close();
  const img = await openTestImage(enabled, { enabledBitmaps: 'mark-inconsistent' });
  await img.write(0, new Uint8Array(65536).fill(1));
  await img.close();
  const bitmaps = (qemuInfo(enabled)['format-specific'] as { data: { bitmaps: { name: string; flags: string[] }[] } }).data.bitmaps;
  t.same(bitmaps.map((b) => [b.name, b.flags.includes('in-use')]), [['b0', true]], 'the bitmap is reported inconsistent');
  clean(t, enabled);

  const disabled = join(dir, 'dis.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', disabled, '4M');
  qemuImg('bitmap', '--add', '--disable', disabled, 'frozen');
  const img2 = await openTestImage(disabled);
  await img2.write(65536, new Uint8Array(65536).fill(2));
  await img2.close();
  const info = qemuInfo(disabled)['format-specific'] as { data: { bitmaps: { name: string; flags: string[] }[] } };
  t.same(info.data.bitmaps, [{ name: 'frozen', flags: [], granularity: 65536 }], 'the disabled bitmap is intact');
  clean(t, disabled);
});

t.test('version 2 images are read-only; internal snapshots make images read-only', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = t.testdir();
  const v2 = join(dir, 'v2.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', v2, '2M');
  qemuIo(v2, ['write -P 0x44 1000 100000', 'write -z 512k 64k']);
  qemuImg('convert', '-O', 'raw', v2, join(dir, 'v2.raw'));
  const ro = await openTestImage(v2, { readOnly: true });
  t.equal(ro.info.version, 2);
  const buf = new Uint8Array(ro.length);
  await ro.read(0, buf);
  t.ok(Buffer.from(buf).equals(readFileSync(join(dir, 'v2.raw'))), 'reads like qemu');
  await ro.close();
  await t.rejects(openTestImage(v2), { code: 'ERR_NOT_IMPLEMENTED', message: /version 2/ });

  const snap = join(dir, 'snap.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', snap, '2M');
  qemuIo(snap, ['write -P 0x55 0 64k']);
  qemuImg('snapshot', '-c', 's1', snap);
  qemuIo(snap, ['write -P 0x66 0 4k']);
  await t.rejects(openTestImage(snap), { code: 'ERR_NOT_IMPLEMENTED', message: /snapshot/ });
  const sro = await openTestImage(snap, { readOnly: true });
  const b = new Uint8Array(8192);
  await sro.read(0, b);
  t.same([b[0], b[4095], b[4096], b[8191]], [0x66, 0x66, 0x55, 0x55], 'reads the active layer');
  await sro.close();
});

t.test('zstd images open, but their compressed clusters are not implemented', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = t.testdir();
  const path = join(dir, 'zstd.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compression_type=zstd', path, '1M');
  qemuIo(path, ['write -c -P 1 0 64k', 'write -P 2 64k 64k']);
  const img = await openTestImage(path);
  t.equal(img.info.compressionType, 'zstd');
  const b = new Uint8Array(10);
  await img.read(65536, b);
  t.same([...b], new Array(10).fill(2));
  await t.rejects(img.read(0, b), { code: 'ERR_NOT_IMPLEMENTED', message: /zstd/ });
  await t.rejects(img.writeCompressed(131072, new Uint8Array(65536)), { code: 'ERR_NOT_IMPLEMENTED' });
  await img.close();
});

t.test('backing files: an opener is required unless backing is given', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  writeFileSync(join(dir, 'base.raw'), new Uint8Array(MiB).fill(3));
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', join(dir, 'top.qcow2'), '2M');
  await t.rejects(Qcow2Image.open(await TestFileIO.open(join(dir, 'top.qcow2'))), { code: 'ERR_INVALID_ARGUMENT', message: /base\.raw/ });
  const alone = await Qcow2Image.open(await TestFileIO.open(join(dir, 'top.qcow2')), { readOnly: true, backing: null });
  const b = new Uint8Array(4);
  await alone.read(0, b);
  t.same([...b], [0, 0, 0, 0], 'backing: null reads unallocated clusters as zeroes');
  await alone.close();
  const chained = await openTestImage(join(dir, 'top.qcow2'), { readOnly: true });
  await chained.read(MiB - 2, b);
  t.same([...b], [3, 3, 0, 0], 'reads through, zeroes past the end of the backing file');
  t.same(await chained.blockStatus(0, 2 * MiB), [
    { offset: 0, bytes: MiB, data: true, zero: false, allocated: false },
    { offset: MiB, bytes: MiB, data: false, zero: true, allocated: false },
  ]);
  await chained.close();
});
