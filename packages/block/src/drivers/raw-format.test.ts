import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import t, { type Test } from 'tap';
import fc from 'fast-check';
import { isShearError } from '@shear/base';
import { requireTools, runBlockIOConformance } from '@shear/testkit';
import type { BlockIO, BlockStatusExtent, WriteOptions, WriteZeroesOptions } from '../io.js';
import { FileDriver } from './file.js';
import { MemoryDriver } from './memory.js';
import { RawFormatDriver, type RawFormatOptions } from './raw-format.js';

const execFileP = promisify(execFile);
const KiB = 1024;

void runBlockIOConformance(t, 'raw without offset', {
  open: async (_t, length) => new RawFormatDriver({ file: new MemoryDriver({ length }) }),
  persistsData: true,
  discardReadsZero: true,
});

void runBlockIOConformance(t, 'raw with an unaligned offset, to the end of the child', {
  open: async (_t, length) => new RawFormatDriver({ file: new MemoryDriver({ length: length + 4099 }), offset: 4099 }),
  persistsData: true,
  discardReadsZero: true,
});

void runBlockIOConformance(t, 'raw with offset and size inside a larger child', {
  open: async (_t, length) => new RawFormatDriver({ file: new MemoryDriver({ length: length + 70_000 }), offset: 1000, size: length }),
  persistsData: true,
  discardReadsZero: true,
  lengthAlignment: 512,
});

/** Records what reaches the child; its length can be changed to act like a resized file. */
class SpyIO implements BlockIO {
  readonly calls: string[] = [];
  readonly inner: MemoryDriver;
  length: number;
  constructor(length: number) {
    this.inner = new MemoryDriver({ length });
    this.length = length;
  }
  read(offset: number, buf: Uint8Array): Promise<void> {
    this.calls.push(`read ${offset} ${buf.length}`);
    return this.inner.read(offset, buf);
  }
  write(offset: number, buf: Uint8Array, opts?: WriteOptions): Promise<void> {
    this.calls.push(`write ${offset} ${buf.length} ${JSON.stringify(opts ?? {})}`);
    return this.inner.write(offset, buf, opts);
  }
  writeZeroes(offset: number, bytes: number, opts?: WriteZeroesOptions): Promise<void> {
    this.calls.push(`zeroes ${offset} ${bytes} ${JSON.stringify(opts ?? {})}`);
    return this.inner.writeZeroes(offset, bytes, opts);
  }
  discard(offset: number, bytes: number): Promise<void> {
    this.calls.push(`discard ${offset} ${bytes}`);
    return this.inner.discard(offset, bytes);
  }
  flush(): Promise<void> {
    this.calls.push('flush');
    return this.inner.flush();
  }
  blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    this.calls.push(`status ${offset} ${bytes}`);
    return this.inner.blockStatus(offset, bytes);
  }
  close(): Promise<void> {
    this.calls.push('close');
    return this.inner.close();
  }
}

async function expectCode(t: Test, p: Promise<unknown>, code: string, what: string): Promise<void> {
  try {
    await p;
    t.fail(`${what}: resolved, expected ${code}`);
  } catch (err) {
    t.ok(isShearError(err) && err.code === code, `${what}: ${code} (${String(err)})`);
  }
}

t.test('requests land at offset + position in the child, options unchanged', async (t) => {
  const child = new SpyIO(64 * KiB);
  const io = new RawFormatDriver({ file: child, offset: 1000, size: 8 * KiB });
  t.equal(io.length, 8 * KiB);
  await io.write(0, new Uint8Array([1, 2, 3]), { fua: true });
  await io.read(5, new Uint8Array(10));
  await io.writeZeroes(100, 50, { mayUnmap: true, fastOnly: true });
  await io.discard(8 * KiB - 10, 10);
  await io.flush();
  t.same(child.calls, ['write 1000 3 {"fua":true}', 'read 1005 10', 'zeroes 1100 50 {"mayUnmap":true,"fastOnly":true}', `discard ${1000 + 8 * KiB - 10} 10`, 'flush']);
  const back = new Uint8Array(5);
  await child.inner.read(999, back);
  t.same([...back], [0, 1, 2, 3, 0]);
});

t.test('the window is enforced: nothing outside it is read or written', async (t) => {
  const child = new SpyIO(20 * KiB);
  await child.inner.write(0, new Uint8Array(20 * KiB).fill(9));
  const io = new RawFormatDriver({ file: child, offset: 4096, size: 4096 });
  child.calls.length = 0;
  await expectCode(t, io.read(4096, new Uint8Array(1)), 'ERR_OUT_OF_BOUNDS', 'read at the end');
  await expectCode(t, io.write(4000, new Uint8Array(97)), 'ERR_OUT_OF_BOUNDS', 'write across the end');
  await expectCode(t, io.writeZeroes(0, 4097), 'ERR_OUT_OF_BOUNDS', 'zeroes one byte too long');
  await expectCode(t, io.discard(1, 4096), 'ERR_OUT_OF_BOUNDS', 'discard across the end');
  await expectCode(t, io.blockStatus(4095, 2), 'ERR_OUT_OF_BOUNDS', 'status across the end');
  await expectCode(t, io.read(-1, new Uint8Array(1)), 'ERR_INVALID_ARGUMENT', 'negative offset');
  await expectCode(t, io.writeZeroes(0.5, 1), 'ERR_INVALID_ARGUMENT', 'fractional offset');
  t.same(child.calls, [], 'the child saw none of them');
  await io.write(0, new Uint8Array(4096).fill(1));
  const all = new Uint8Array(20 * KiB);
  await child.inner.read(0, all);
  t.ok(all.subarray(0, 4096).every((b) => b === 9), 'before the window untouched');
  t.ok(all.subarray(4096, 8192).every((b) => b === 1), 'the window written');
  t.ok(all.subarray(8192).every((b) => b === 9), 'after the window untouched');
});

t.test('blockStatus maps the child extents back into the window', async (t) => {
  const child = new MemoryDriver({ length: 16 * 64 * KiB });
  const c = 64 * KiB;
  await child.write(0, new Uint8Array(c).fill(1)); // before the window
  await child.write(3 * c, new Uint8Array(c).fill(1));
  await child.writeZeroes(5 * c, c);
  await child.write(9 * c, new Uint8Array(c).fill(1)); // after the window
  const offset = 2 * c + 100;
  const io = new RawFormatDriver({ file: child, offset, size: 6 * c });
  const extents = await io.blockStatus(0, io.length);
  t.same(
    extents.map((e) => [e.offset, e.bytes, e.data, e.zero, e.allocated]),
    [
      [0, c - 100, false, true, true],
      [c - 100, c, true, false, true],
      [2 * c - 100, c, false, true, true],
      [3 * c - 100, c, true, true, true],
      [4 * c - 100, 2 * c + 100, false, true, true],
    ],
  );
  t.same(
    (await io.blockStatus(c - 150, 100)).map((e) => [e.offset, e.bytes, e.data]),
    [
      [c - 150, 50, false],
      [c - 100, 50, true],
    ],
    'a small range is answered in window coordinates',
  );
  t.same(await io.blockStatus(7, 0), [], 'zero bytes');
});

t.test('zero-length windows and requests', async (t) => {
  const child = new SpyIO(4096);
  for (const opts of [{ offset: 4096 }, { offset: 1000, size: 0 }, { size: 0 }] as Omit<RawFormatOptions, 'file'>[]) {
    const io = new RawFormatDriver({ file: child, ...opts });
    t.equal(io.length, 0, JSON.stringify(opts));
    await io.read(0, new Uint8Array(0));
    await io.write(0, new Uint8Array(0));
    await io.writeZeroes(0, 0);
    await io.discard(0, 0);
    t.same(await io.blockStatus(0, 0), []);
    await expectCode(t, io.read(0, new Uint8Array(1)), 'ERR_OUT_OF_BOUNDS', `one byte of ${JSON.stringify(opts)}`);
  }
  const io = new RawFormatDriver({ file: child, offset: 10 });
  await io.write(5, new Uint8Array(0));
  await io.write(io.length, new Uint8Array(0));
});

t.test('offset and size are validated as QEMU does', async (t) => {
  const file = new MemoryDriver({ length: 8192 });
  const bad: [string, unknown][] = [
    ['negative offset', { file, offset: -1 }],
    ['fractional offset', { file, offset: 1.5 }],
    ['offset past the child', { file, offset: 8193 }],
    ['negative size', { file, size: -512 }],
    ['size not a multiple of 512', { file, size: 1000 }],
    ['offset + size past the child', { file, offset: 1, size: 8192 }],
    ['unknown option', { file, driver: 'raw' }],
    ['no child', { offset: 0 }],
  ];
  for (const [what, opts] of bad) t.throws(() => new RawFormatDriver(opts as RawFormatOptions), { code: 'ERR_INVALID_ARGUMENT' }, what);
  t.equal(new RawFormatDriver({ file, offset: 8192 }).length, 0, 'offset at the end is a window of 0 bytes');
  t.equal(new RawFormatDriver({ file, offset: 3, size: 7680 }).length, 7680, 'an offset needs no alignment');
  t.equal(new RawFormatDriver({ file, offset: 3 }).length, 8189, 'the default size needs none either');
});

t.test('length follows the child like QEMU raw_getlength', async (t) => {
  const child = new SpyIO(64 * KiB);
  const open = new RawFormatDriver({ file: child, offset: 4096 });
  const sized = new RawFormatDriver({ file: child, offset: 4096, size: 8192 });
  child.length = 128 * KiB;
  t.equal(open.length, 124 * KiB, 'grows with the child');
  t.equal(sized.length, 8192, 'an explicit size holds');
  child.length = 10_000;
  t.equal(sized.length, 10_000 - 4096, 'shrinks with the child');
  child.length = 1000;
  t.equal(open.length, 0, 'child shorter than the offset');
  t.equal(sized.length, 0);
});

t.test('close waits for requests, closes the child once, later requests reject', async (t) => {
  const child = new SpyIO(64 * KiB);
  const io = new RawFormatDriver({ file: child, offset: 512 });
  const pending = io.write(0, new Uint8Array(4096));
  const closing = io.close();
  await pending;
  await closing;
  await io.close();
  t.same(child.calls, ['write 512 4096 {}', 'close']);
  await expectCode(t, io.flush(), 'ERR_CLOSED', 'flush after close');
  await expectCode(t, io.read(0, new Uint8Array(1)), 'ERR_CLOSED', 'read after close');
});

t.test('property: a window over a child agrees with a model of the child bytes', async (t) => {
  const CHILD = 16 * KiB;
  const windowArb = fc
    .record({ offset: fc.integer({ min: 0, max: CHILD }), sectors: fc.option(fc.integer({ min: 0, max: CHILD / 512 }), { nil: undefined }) })
    .filter(({ offset, sectors }) => sectors === undefined || offset + sectors * 512 <= CHILD);
  const opArb = fc.record({
    kind: fc.constantFrom('write', 'zeroes', 'read'),
    at: fc.nat(),
    bytes: fc.integer({ min: 0, max: 3000 }),
    fill: fc.integer({ min: 1, max: 255 }),
  });
  await fc.assert(
    fc.asyncProperty(windowArb, fc.array(opArb, { maxLength: 20 }), async ({ offset, sectors }, ops) => {
      const child = new MemoryDriver({ length: CHILD, chunkBytes: 1024 });
      const model = new Uint8Array(CHILD);
      const io = new RawFormatDriver(sectors === undefined ? { file: child, offset } : { file: child, offset, size: sectors * 512 });
      const L = io.length;
      for (const op of ops) {
        const at = L === 0 ? 0 : op.at % (L + 1);
        const bytes = Math.min(op.bytes, L - at);
        if (op.kind === 'write') {
          await io.write(at, new Uint8Array(bytes).fill(op.fill));
          model.fill(op.fill, offset + at, offset + at + bytes);
        } else if (op.kind === 'zeroes') {
          await io.writeZeroes(at, bytes);
          model.fill(0, offset + at, offset + at + bytes);
        } else {
          const got = new Uint8Array(bytes);
          await io.read(at, got);
          if (!Buffer.from(got).equals(model.subarray(offset + at, offset + at + bytes))) throw new Error(`read (${at}, ${bytes}) differs`);
        }
      }
      const all = new Uint8Array(CHILD);
      await child.read(0, all);
      if (!Buffer.from(all).equals(model)) throw new Error('child bytes differ from the model');
    }),
    { numRuns: 200, seed: 0x4a3 },
  );
  t.pass('200 windows agreed');
});

t.test('qemu-io reads through its raw window what ours wrote, and refuses what ours refuses', async (t) => {
  if (!requireTools(t, 'qemu-io')) return;
  const path = join(t.testdir(), 'disk.raw');
  const file = await FileDriver.open(path, { create: { size: 256 * KiB } });
  const io = new RawFormatDriver({ file, offset: 3 * KiB + 7, size: 64 * KiB });
  await io.write(0, new Uint8Array(4096).fill(0x5a));
  await io.write(64 * KiB - 512, new Uint8Array(512).fill(0x6b));
  await io.close();
  const spec = (opts: object) => `json:${JSON.stringify({ driver: 'raw', ...opts, file: { driver: 'file', filename: path } })}`;
  const { stdout } = await execFileP('qemu-io', [
    '-r',
    '-c', 'read -P 0x5a 0 4096',
    '-c', `read -P 0x6b ${64 * KiB - 512} 512`,
    '-c', `read -P 0 4096 ${64 * KiB - 4096 - 512}`,
    '-c', 'length',
    spec({ offset: 3 * KiB + 7, size: 64 * KiB }),
  ]);
  t.notMatch(stdout, /Pattern verification failed/);
  t.match(stdout, /^64 KiB$/m);
  for (const [what, opts] of [
    ['size not a multiple of 512', { size: 1000 }],
    ['offset past the end', { offset: 256 * KiB + 1 }],
    ['offset + size past the end', { offset: 512, size: 256 * KiB }],
  ] as const) {
    t.throws(() => new RawFormatDriver({ file: new MemoryDriver({ length: 256 * KiB }), ...opts }), { code: 'ERR_INVALID_ARGUMENT' }, `ours: ${what}`);
    await t.rejects(execFileP('qemu-io', ['-r', '-c', 'length', spec(opts)]), `qemu-io: ${what}`);
  }
});
