import t from 'tap';
import fc from 'fast-check';
import * as fs from 'node:fs';
import path from 'node:path';
import { FileDriver, type BlockStatusExtent } from '@shear/block';
import { StatusWindow } from './status-window.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** Normalises extents to (offset, bytes, data) runs, merged, so two answers compare by content. */
function runs(extents: BlockStatusExtent[]): [number, number, boolean][] {
  const out: [number, number, boolean][] = [];
  for (const e of extents) {
    const last = out.at(-1);
    if (last && last[2] === e.data && last[0] + last[1] === e.offset) last[1] += e.bytes;
    else out.push([e.offset, e.bytes, e.data]);
  }
  return out;
}

async function fullStatus(io: { blockStatus(o: number, n: number): Promise<BlockStatusExtent[]> }, offset: number, bytes: number): Promise<BlockStatusExtent[]> {
  const all: BlockStatusExtent[] = [];
  for (let at = offset; at < offset + bytes; ) {
    const got = await io.blockStatus(at, offset + bytes - at);
    t.ok(got.length > 0 && got[0]!.offset === at, 'an answer starts where it was asked');
    all.push(...got);
    at = got.at(-1)!.offset + got.at(-1)!.bytes;
  }
  return all;
}

t.test('answers as the node does, for any ranges in any order, with one query per window', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'sparse.raw');
  const size = 48 * MiB;
  fs.writeFileSync(file, Buffer.alloc(0));
  fs.truncateSync(file, size);
  const fd = fs.openSync(file, 'r+');
  // Data in scattered 64 KiB clusters, holes between them.
  for (let o = 0; o < size; o += 64 * KiB) if ((o / (64 * KiB)) % 5 === 1 || (o / (64 * KiB)) % 7 === 3) fs.writeSync(fd, Buffer.alloc(64 * KiB, 1), 0, 64 * KiB, o);
  fs.closeSync(fd);
  const io = await FileDriver.open(file, { readOnly: true });
  t.teardown(() => io.close());
  await fc.assert(
    fc.asyncProperty(fc.array(fc.tuple(fc.nat(size / (64 * KiB) - 1), fc.integer({ min: 1, max: 256 })), { minLength: 1, maxLength: 20 }), async (ranges) => {
      const w = new StatusWindow(io, size, 16 * MiB);
      for (const [c, n] of ranges) {
        const offset = c * 64 * KiB;
        const bytes = Math.min(n * 64 * KiB, size - offset);
        t.same(runs(await fullStatus(w, offset, bytes)), runs(await fullStatus(io, offset, bytes)));
      }
    }),
    { numRuns: 30 },
  );
  // A sequential pass in 4 MiB tasks, four at a time, shares each window's query.
  const w = new StatusWindow(io, size, 16 * MiB);
  for (let o = 0; o < size; o += 16 * MiB) {
    await Promise.all([0, 1, 2, 3].map((i) => fullStatus(w, o + i * 4 * MiB, 4 * MiB)));
  }
  t.ok(w.queries <= 6, `${w.queries} queries for 12 tasks`);
  // reset() forgets: a changed file is seen afresh.
  t.equal((await w.blockStatus(0, 64 * KiB))[0]!.data, false);
  const fd2 = fs.openSync(file, 'r+');
  fs.writeSync(fd2, Buffer.alloc(64 * KiB, 2), 0, 64 * KiB, 0);
  fs.closeSync(fd2);
  t.equal((await w.blockStatus(0, 64 * KiB))[0]!.data, false, 'the cached window is still the old one');
  w.reset();
  t.equal((await w.blockStatus(0, 64 * KiB))[0]!.data, true, 'after reset the write is seen');
});
