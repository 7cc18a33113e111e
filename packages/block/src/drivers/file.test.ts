import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, fstatSync, openSync, readFileSync, statSync, truncateSync, writeFileSync, writeSync, ftruncateSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import type { Test } from 'tap';
import fc from 'fast-check';
import { isShearError } from '@shear/base';
import { loadNative, type NativeIO } from '@shear/native';
import { haveTool, requireNativeAddon, runBlockIOConformance, skipLoudly } from '@shear/testkit';
import { FileDriver, ZERO_CHUNK_BYTES, type FileDriverOptions } from './file.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const O_DIRECT_FLAG = 0o40000; // as printed in /proc/self/fdinfo (octal flags)

const addon = loadNative({ forceFallback: false });
const fallback = loadNative({ forceFallback: true });

let fileCounter = 0;
function freshPath(t: Test, name = 'disk'): string {
  return join(t.testdir(), `${name}-${++fileCounter}.raw`);
}

function fileFactory(opts: Omit<FileDriverOptions, 'create'>, discardReadsZero: boolean) {
  return {
    open: (t: Test, length: number) => FileDriver.open(freshPath(t), { ...opts, create: { size: length } }),
    persistsData: true,
    discardReadsZero,
  };
}

/** Whether O_DIRECT works in the directory tap gives tests (ext4 here; tmpfs on old kernels refuses it). */
async function directSupported(t: Test): Promise<string | undefined> {
  try {
    const io = await FileDriver.open(freshPath(t, 'probe'), { direct: true, native: addon, create: { size: 4096 } });
    await io.close();
    return undefined;
  } catch (err) {
    if (isShearError(err, 'ERR_IO_UNSUPPORTED')) return err.message;
    throw err;
  }
}

void runBlockIOConformance(t, 'file, buffered, addon', fileFactory({ native: addon }, addon.available));
void runBlockIOConformance(t, 'file, buffered, fallback', fileFactory({ native: fallback }, false));

t.test('file with O_DIRECT', async (t) => {
  if (!requireNativeAddon(t, addon)) return;
  const refused = await directSupported(t);
  if (refused) {
    skipLoudly(t, `O_DIRECT conformance: O_DIRECT refused in the test directory: ${refused}`);
    return;
  }
  await runBlockIOConformance(t, 'file, O_DIRECT, kernel alignment', fileFactory({ native: addon, direct: true }, true));
  await runBlockIOConformance(t, 'file, O_DIRECT, 4 KiB alignment', fileFactory({ native: addon, direct: true, alignment: 4096 }, true));
});

function writeSparse(path: string, size: number, runs: [number, number][]): Buffer {
  const model = Buffer.alloc(size);
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, size);
    for (const [offset, bytes] of runs) {
      const data = randomBytes(bytes);
      writeSync(fd, data, 0, bytes, offset);
      data.copy(model, offset);
    }
  } finally {
    closeSync(fd);
  }
  return model;
}

t.test('blockStatus reports holes as zero and data runs as data, from SEEK_DATA/SEEK_HOLE', async (t) => {
  if (!requireNativeAddon(t, addon)) return;
  const path = freshPath(t);
  writeSparse(path, 4 * MiB, [
    [MiB, 256 * KiB],
    [3 * MiB, 64 * KiB],
  ]);
  const io = await FileDriver.open(path, { native: addon, readOnly: true });
  t.teardown(() => io.close());
  t.same(await io.blockStatus(0, 4 * MiB), [
    { offset: 0, bytes: MiB, data: false, zero: true, allocated: true },
    { offset: MiB, bytes: 256 * KiB, data: true, zero: false, allocated: true },
    { offset: MiB + 256 * KiB, bytes: 3 * MiB - (MiB + 256 * KiB), data: false, zero: true, allocated: true },
    { offset: 3 * MiB, bytes: 64 * KiB, data: true, zero: false, allocated: true },
    { offset: 3 * MiB + 64 * KiB, bytes: MiB - 64 * KiB, data: false, zero: true, allocated: true },
  ]);
  t.same(await io.blockStatus(MiB + 100, 1000), [{ offset: MiB + 100, bytes: 1000, data: true, zero: false, allocated: true }], 'clipped to the range');
  t.same(await io.blockStatus(2 * MiB, 10), [{ offset: 2 * MiB, bytes: 10, data: false, zero: true, allocated: true }]);
});

t.test('without the addon everything is data', async (t) => {
  const path = freshPath(t);
  writeSparse(path, 4 * MiB, [[MiB, 4096]]);
  const io = await FileDriver.open(path, { native: fallback });
  t.teardown(() => io.close());
  t.same(await io.blockStatus(0, 4 * MiB), [{ offset: 0, bytes: 4 * MiB, data: true, zero: false, allocated: true }]);
});

t.test('writeZeroes: mayUnmap punches a hole, otherwise the range stays allocated', async (t) => {
  if (!requireNativeAddon(t, addon)) return;
  const path = freshPath(t);
  writeFileSync(path, randomBytes(4 * MiB));
  const io = await FileDriver.open(path, { native: addon });
  t.teardown(() => io.close());
  const blocks = () => statSync(path).blocks;
  const full = blocks();
  await io.writeZeroes(MiB, MiB, { mayUnmap: true });
  t.ok(blocks() <= full - (MiB / 512) * 0.9, `punched: ${full} -> ${blocks()} blocks`);
  t.same((await io.blockStatus(MiB, MiB))[0], { offset: MiB, bytes: MiB, data: false, zero: true, allocated: true });
  const before = blocks();
  await io.writeZeroes(2 * MiB, MiB);
  t.equal(blocks(), before, 'zero-range keeps blocks allocated');
  const buf = Buffer.alloc(2 * MiB, 1);
  await io.read(MiB, buf);
  t.ok(buf.every((b) => b === 0), 'both read as zeroes');
  await io.discard(3 * MiB, MiB);
  t.ok(blocks() < before, 'discard punches');
});

t.test('writeZeroes without the addon writes zero buffers; fastOnly refuses instead', async (t) => {
  const path = freshPath(t);
  const size = 3 * ZERO_CHUNK_BYTES + 12_345;
  const content = randomBytes(size);
  writeFileSync(path, content);
  const io = await FileDriver.open(path, { native: fallback });
  t.teardown(() => io.close());
  await t.rejects(io.writeZeroes(10, 1000, { fastOnly: true }), { code: 'ERR_NOT_IMPLEMENTED' });
  t.same(readFileSync(path), content, 'nothing written by the refused request');
  await io.writeZeroes(5, size - 10, { mayUnmap: true });
  const after = readFileSync(path);
  t.same(after.subarray(0, 5), content.subarray(0, 5));
  t.ok(after.subarray(5, size - 5).every((b) => b === 0), 'zeroed across several chunks');
  t.same(after.subarray(size - 5), content.subarray(size - 5));
  await io.discard(0, 100); // a no-op without punch-hole
  t.same(readFileSync(path).subarray(0, 5), content.subarray(0, 5));
});

t.test('read-only files refuse changes and still serve reads', async (t) => {
  const path = freshPath(t);
  const content = randomBytes(64 * KiB);
  writeFileSync(path, content);
  const io = await FileDriver.open(path, { readOnly: true });
  t.teardown(() => io.close());
  for (const call of [() => io.write(0, new Uint8Array(1)), () => io.writeZeroes(0, 1), () => io.discard(0, 1), () => io.truncate(10)]) {
    await t.rejects(call(), { code: 'ERR_READ_ONLY', kind: 'permission' });
  }
  const buf = Buffer.alloc(100);
  await io.read(1000, buf);
  t.same(buf, content.subarray(1000, 1100));
  await io.flush();
  t.same(readFileSync(path), content);
});

t.test('open failures name the file and say why', async (t) => {
  const dir = t.testdir({ existing: 'x' });
  const missing = join(dir, 'missing.raw');
  await t.rejects(FileDriver.open(missing), { code: 'ERR_FILE_NOT_FOUND', kind: 'not-found', context: { errno: 'ENOENT', path: missing } });
  await t.rejects(FileDriver.open(dir, { readOnly: true }), { code: 'ERR_INVALID_ARGUMENT', message: /not a regular file/ });
  await t.rejects(FileDriver.open(dir), { code: 'ERR_IO', context: { errno: 'EISDIR' } });
  await t.rejects(FileDriver.open(join(dir, 'existing'), { create: { size: 10, exclusive: true } }), { code: 'ERR_IO', context: { errno: 'EEXIST' } });
  await t.rejects(FileDriver.open(join(dir, 'new'), { readOnly: true, create: { size: 10 } }), { code: 'ERR_INVALID_ARGUMENT' });
  await t.rejects(FileDriver.open(join(dir, 'existing'), { alignment: 4096 }), { code: 'ERR_INVALID_ARGUMENT' }, 'alignment without direct');
  await t.rejects(FileDriver.open(join(dir, 'existing'), { direct: true, native: fallback }), { code: 'ERR_IO_UNSUPPORTED', message: /native addon/ });
  if (addon.available) {
    // procfs has no direct I/O: the kernel refuses O_DIRECT at open with EINVAL
    await t.rejects(FileDriver.open('/proc/self/status', { readOnly: true, direct: true, native: addon }), {
      code: 'ERR_IO_UNSUPPORTED',
      message: /O_DIRECT: the file system refuses direct I\/O/,
      context: { errno: 'EINVAL' },
    });
    await t.rejects(FileDriver.open(join(dir, 'existing'), { direct: true, native: addon, alignment: 256 }), { code: 'ERR_INVALID_ARGUMENT' }, 'alignment below the kernel minimum');
  }
  const created = await FileDriver.open(join(dir, 'created'), { create: { size: 12_345 } });
  t.equal(created.length, 12_345);
  await created.close();
  t.equal(statSync(join(dir, 'created')).size, 12_345);
});

t.test('length is fixed at open; truncate changes it explicitly', async (t) => {
  const path = freshPath(t);
  const io = await FileDriver.open(path, { create: { size: 10_000 } });
  t.teardown(() => io.close());
  await t.rejects(io.write(9_999, new Uint8Array(2)), { code: 'ERR_OUT_OF_BOUNDS' });
  await io.write(9_999, new Uint8Array([5]));
  t.equal(statSync(path).size, 10_000);
  await io.truncate(20_000);
  t.equal(io.length, 20_000);
  const buf = Buffer.alloc(10_001, 1);
  await io.read(9_999, buf);
  t.equal(buf[0], 5);
  t.ok(buf.subarray(1).every((b) => b === 0), 'grown part reads zero');
  await io.truncate(100);
  t.equal(io.length, 100);
  t.equal(statSync(path).size, 100);
  await t.rejects(io.read(100, new Uint8Array(1)), { code: 'ERR_OUT_OF_BOUNDS' });
});

t.test('a file shrunk behind the driver reads zeroes past its end', async (t) => {
  const path = freshPath(t);
  writeFileSync(path, Buffer.alloc(8192, 3));
  const io = await FileDriver.open(path);
  t.teardown(() => io.close());
  truncateSync(path, 1000);
  const buf = Buffer.alloc(8192, 9);
  await io.read(0, buf);
  t.ok(buf.subarray(0, 1000).every((b) => b === 3));
  t.ok(buf.subarray(1000).every((b) => b === 0));
});

t.test('O_DIRECT: the fd has O_DIRECT, unaligned length keeps its size, aligned buffers take the direct path', async (t) => {
  if (!requireNativeAddon(t, addon)) return;
  const refused = await directSupported(t);
  if (refused) return skipLoudly(t, `O_DIRECT refused here: ${refused}`);
  const length = MiB + 1000;
  const path = freshPath(t);
  const io = await FileDriver.open(path, { direct: true, native: addon, create: { size: length } });
  t.teardown(() => io.close());
  const flags = Number.parseInt(/flags:\s*([0-7]+)/.exec(readFileSync(`/proc/self/fdinfo/${io.fd}`, 'utf8'))?.[1] ?? '0', 8);
  t.ok(flags & O_DIRECT_FLAG, 'O_DIRECT set on the fd');
  t.ok(io.alignment >= 512 && io.alignment <= 4096, `alignment ${io.alignment}`);
  await io.write(length - 10, Buffer.alloc(10, 7));
  await io.writeZeroes(length - 3, 3);
  t.equal(statSync(path).size, length, 'size unchanged after writes into the unit that straddles EOF');
  const tail = readFileSync(path).subarray(length - 10);
  t.same([...tail], [7, 7, 7, 7, 7, 7, 7, 0, 0, 0]);
  const { buffer } = addon.allocAligned(64 * KiB, 4096);
  buffer.fill(0x42);
  await io.write(128 * KiB, buffer);
  const back = addon.allocAligned(64 * KiB, 4096).buffer;
  await io.read(128 * KiB, back);
  t.same(back, buffer);

  const buffered = await FileDriver.open(path, { native: addon });
  const bflags = Number.parseInt(/flags:\s*([0-7]+)/.exec(readFileSync(`/proc/self/fdinfo/${buffered.fd}`, 'utf8'))?.[1] ?? '0', 8);
  t.notOk(bflags & O_DIRECT_FLAG, 'no O_DIRECT when buffered');
  t.equal(buffered.alignment, 1);
  await buffered.close();
});

t.test('property (O_DIRECT, 4 KiB units): concurrent unaligned writes and zeroes match a model', async (t) => {
  if (!requireNativeAddon(t, addon)) return;
  const refused = await directSupported(t);
  if (refused) return skipLoudly(t, `O_DIRECT refused here: ${refused}`);
  const length = 64 * KiB + 300;
  const op = fc.record({
    offset: fc.nat({ max: length - 1 }),
    bytes: fc.integer({ min: 1, max: 9000 }),
    fill: fc.integer({ min: 0, max: 255 }),
    zeroes: fc.boolean(),
  });
  await fc.assert(
    fc.asyncProperty(fc.array(fc.array(op, { minLength: 1, maxLength: 8 }), { maxLength: 6 }), async (batches) => {
      const io = await FileDriver.open(freshPath(t), { direct: true, native: addon, alignment: 4096, create: { size: length } });
      try {
        const model = new Uint8Array(length);
        for (const batch of batches) {
          // Within a batch the requests run concurrently; overlapping ones may land in any
          // order, so the model only covers batches whose ranges are disjoint.
          const ranges = batch.map((o) => [o.offset, Math.min(o.bytes, length - o.offset)] as const);
          const disjoint = ranges.every(([a, n], i) => ranges.every(([b, m], j) => i === j || a + n <= b || b + m <= a));
          if (!disjoint) continue;
          await Promise.all(
            batch.map((o, i) => {
              const [offset, bytes] = ranges[i] as readonly [number, number];
              if (o.zeroes || o.fill === 0) {
                model.fill(0, offset, offset + bytes);
                return io.writeZeroes(offset, bytes, { mayUnmap: o.fill % 2 === 0 });
              }
              model.fill(o.fill, offset, offset + bytes);
              return io.write(offset, new Uint8Array(bytes).fill(o.fill));
            }),
          );
        }
        const all = new Uint8Array(length);
        await io.read(0, all);
        return Buffer.compare(all, model) === 0;
      } finally {
        await io.close();
      }
    }),
    { numRuns: 40 },
  );
  t.pass('property held');
});

t.test('fd is usable until close; syncRange and dropCache', async (t) => {
  for (const native of [addon, fallback] as NativeIO[]) {
    const io = await FileDriver.open(freshPath(t), { native, create: { size: 4 * MiB } });
    t.equal(fstatSync(io.fd).size, 4 * MiB, `fd answers fstat (${native.available ? 'addon' : 'fallback'})`);
    await io.write(0, randomBytes(4 * MiB));
    await io.syncRange(0, 0, { wait: true });
    await io.syncRange(MiB, MiB);
    await io.dropCache(0, 0);
    await t.rejects(io.syncRange(4 * MiB, 1), { code: 'ERR_OUT_OF_BOUNDS' });
    await io.close();
    t.throws(() => io.fd, { code: 'ERR_CLOSED' });
    await t.rejects(io.syncRange(0, 0), { code: 'ERR_CLOSED' });
  }
});

t.test('dropCache empties the page cache of written-back data (fincore)', async (t) => {
  if (!requireNativeAddon(t, addon)) return;
  if (!haveTool('fincore')) {
    if (process.env['CI']) t.fail('fincore (util-linux) missing');
    else skipLoudly(t, 'fincore (util-linux) missing');
    return;
  }
  const path = freshPath(t);
  const io = await FileDriver.open(path, { native: addon, create: { size: 8 * MiB } });
  t.teardown(() => io.close());
  await io.write(0, randomBytes(8 * MiB));
  const resident = () => Number(execFileSync('fincore', ['--bytes', '--noheadings', '--output', 'RES', path], { encoding: 'utf8' }).trim());
  t.ok(resident() > 4 * MiB, `written data is cached (${resident()} bytes)`);
  await io.syncRange(0, 0, { wait: true });
  await io.dropCache(0, 0);
  t.ok(resident() < MiB, `after syncRange+dropCache: ${resident()} bytes cached`);
});
