import t from 'tap';
import fc from 'fast-check';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { requireTools } from '@shear/testkit';
import { Qcow2Image } from './index.js';
import { TestFileIO } from './test-file-io.fixture.js';
import { patternBytes, qemuCheck, qemuCompare } from './test-qemu.fixture.js';

const C = 4096;
const SIZE = 64 * C + 1536; // the last cluster is short
const BACKING_BYTES = 40 * C + 100;

type Op =
  | { op: 'write'; offset: number; bytes: number; seed: number }
  | { op: 'zero'; offset: number; bytes: number; unmap: boolean }
  | { op: 'discard'; offset: number; bytes: number }
  | { op: 'compress'; cluster: number; seed: number }
  | { op: 'read'; offset: number; bytes: number }
  | { op: 'flush' }
  | { op: 'reopen' };

/** Offsets near cluster boundaries are where the interesting cases are. */
const position = fc
  .tuple(fc.integer({ min: 0, max: Math.ceil(SIZE / C) }), fc.constantFrom(0, 0, 0, 1, 511, 512, C - 1, C / 2))
  .map(([c, d]) => Math.min(SIZE, c * C + d));
const range = fc.tuple(position, position).map(([a, b]) => ({ offset: Math.min(a, b), bytes: Math.abs(a - b) }));

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 5, arbitrary: fc.tuple(range, fc.nat()).map(([r, seed]) => ({ op: 'write' as const, ...r, seed })) },
  { weight: 2, arbitrary: fc.tuple(range, fc.boolean()).map(([r, unmap]) => ({ op: 'zero' as const, ...r, unmap })) },
  { weight: 2, arbitrary: range.map((r) => ({ op: 'discard' as const, ...r })) },
  { weight: 1, arbitrary: fc.tuple(fc.integer({ min: 0, max: Math.ceil(SIZE / C) - 1 }), fc.nat()).map(([cluster, seed]) => ({ op: 'compress' as const, cluster, seed })) },
  { weight: 3, arbitrary: range.map((r) => ({ op: 'read' as const, ...r })) },
  { weight: 1, arbitrary: fc.constant({ op: 'flush' as const }) },
  { weight: 1, arbitrary: fc.constant({ op: 'reopen' as const }) },
);

/** Data that is sometimes compressible, sometimes not. */
function dataFor(bytes: number, seed: number): Uint8Array {
  if (seed % 3 === 0) return new Uint8Array(bytes).fill(seed & 0xff);
  return patternBytes(bytes, seed + 1);
}

t.test('random operations match a byte-array model', async (t) => {
  const dir = t.testdir();
  const backingData = patternBytes(BACKING_BYTES, 1234);
  writeFileSync(join(dir, 'base.raw'), backingData);
  // The model part runs without qemu-img; the qemu-img checks need it.
  const qemu = requireTools(t, 'qemu-img');
  let run = 0;
  await fc.assert(
    fc.asyncProperty(fc.boolean(), fc.constantFrom(1, 2, 16, 64), fc.array(opArb, { minLength: 1, maxLength: 40 }), async (withBacking, refcountBits, ops) => {
      const path = join(dir, `p${run++}.qcow2`);
      const openBacking = async (): Promise<TestFileIO> => TestFileIO.open(join(dir, 'base.raw'), { readOnly: true });
      const model = new Uint8Array(SIZE);
      if (withBacking) model.set(backingData);
      let img = await Qcow2Image.create(await TestFileIO.open(path, { create: true }), {
        size: SIZE,
        clusterBytes: C,
        refcountBits,
        ...(withBacking ? { backingFile: 'base.raw', backingFormat: 'raw', openBacking } : {}),
        l2CacheBytes: 4 * C,
      });
      try {
        for (const o of ops) {
          switch (o.op) {
            case 'write': {
              const d = dataFor(o.bytes, o.seed);
              await img.write(o.offset, d);
              model.set(d, o.offset);
              break;
            }
            case 'zero':
              await img.writeZeroes(o.offset, o.bytes, { mayUnmap: o.unmap });
              model.fill(0, o.offset, o.offset + o.bytes);
              break;
            case 'discard': {
              await img.discard(o.offset, o.bytes);
              const end = o.offset + o.bytes;
              const from = Math.ceil(o.offset / C) * C;
              const to = end === SIZE ? SIZE : Math.floor(end / C) * C;
              if (from < to) model.fill(0, from, to);
              break;
            }
            case 'compress': {
              const bytes = Math.min(C, SIZE - o.cluster * C);
              const d = dataFor(bytes, o.seed);
              await img.writeCompressed(o.cluster * C, d);
              model.set(d, o.cluster * C);
              break;
            }
            case 'read': {
              const buf = new Uint8Array(o.bytes);
              await img.read(o.offset, buf);
              if (!Buffer.from(buf).equals(Buffer.from(model.subarray(o.offset, o.offset + o.bytes)))) {
                throw new Error(`read (${o.offset}, ${o.bytes}) differs from the model`);
              }
              break;
            }
            case 'flush':
              await img.flush();
              break;
            case 'reopen':
              await img.close();
              img = await Qcow2Image.open(await TestFileIO.open(path), { openBacking, l2CacheBytes: 4 * C });
              break;
          }
        }
        const all = new Uint8Array(SIZE);
        await img.read(0, all);
        if (!Buffer.from(all).equals(Buffer.from(model))) throw new Error('final content differs from the model');
      } finally {
        await img.close();
      }
      if (qemu) {
        const check = qemuCheck(path);
        if (check['check-errors'] !== 0 || check.leaks || check.corruptions) throw new Error(`qemu-img check: ${JSON.stringify(check)}`);
        if (run % 4 === 0) {
          writeFileSync(`${path}.raw`, model);
          const cmp = qemuCompare(path, 'qcow2', `${path}.raw`, 'raw');
          if (!cmp.same) throw new Error(`qemu-img compare: ${cmp.output}`);
        }
      }
    }),
    { numRuns: 60 },
  );
  t.pass('the model held');
});
