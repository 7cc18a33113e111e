import t, { type Test } from 'tap';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { requireTools } from '@shear/testkit';
import { Qcow2Image } from './index.js';
import { TestFileIO } from './test-file-io.fixture.js';
import { patternBytes, qemuCheck, qemuCompare } from './test-qemu.fixture.js';

const C = 4096;
const SIZE = 32 * C;

const qemuTools = new Map<Test, boolean>();
function useQemu(t: Test): void {
  qemuTools.set(t, requireTools(t, 'qemu-img'));
}

async function makeImage(dir: string, name: string, withBacking: boolean): Promise<{ img: Qcow2Image; model: Uint8Array; path: string }> {
  const path = join(dir, name);
  const model = new Uint8Array(SIZE);
  const opts: Parameters<typeof Qcow2Image.create>[1] = { size: SIZE, clusterBytes: C };
  if (withBacking) {
    const base = patternBytes(SIZE - 3 * C, 42);
    writeFileSync(join(dir, `${name}.base.raw`), base);
    model.set(base);
    Object.assign(opts, {
      backingFile: `${name}.base.raw`,
      backingFormat: 'raw',
      openBacking: async () => TestFileIO.open(join(dir, `${name}.base.raw`), { readOnly: true }),
    });
  }
  return { img: await Qcow2Image.create(await TestFileIO.open(path, { create: true }), opts), model, path };
}

async function readAll(img: Qcow2Image): Promise<Uint8Array> {
  const buf = new Uint8Array(img.length);
  await img.read(0, buf);
  return buf;
}

/** qemu-img check and compare, when qemu-img is installed (requireTools reports it missing once per test). */
function verify(t: Test, path: string, model: Uint8Array): void {
  if (!qemuTools.get(t)) return;
  const c = qemuCheck(path);
  t.equal(c['check-errors'], 0, 'qemu-img check: no errors');
  t.notOk(c.leaks, 'qemu-img check: no leaks');
  writeFileSync(`${path}.raw`, model);
  t.ok(qemuCompare(path, 'qcow2', `${path}.raw`, 'raw').same, 'qemu-img compare: equal');
}

/** Splits [0, SIZE) into pieces of uneven sizes, many of them inside one cluster. */
function pieces(seed: number): [number, number][] {
  const rnd = patternBytes(256, seed);
  const out: [number, number][] = [];
  let off = 0;
  for (let i = 0; off < SIZE; i++) {
    const kind = rnd[i % rnd.length]! % 4;
    const len = Math.min(SIZE - off, kind === 0 ? 100 + rnd[(i + 1) % 256]! : kind === 1 ? C : kind === 2 ? C - 1 : 2 * C + 513);
    out.push([off, len]);
    off += len;
  }
  return out;
}

t.test('concurrent non-overlapping writes to unallocated clusters land exactly', async (t) => {
  useQemu(t);
  const dir = t.testdir();
  for (const withBacking of [false, true]) {
    for (const seed of [1, 2, 3]) {
      const name = `n${seed}${withBacking ? 'b' : ''}.qcow2`;
      const { img, model, path } = await makeImage(dir, name, withBacking);
      const ps = pieces(seed);
      // Write every other piece, so the untouched ones must keep backing data (copy-on-write races).
      await Promise.all(
        ps
          .filter((_, i) => i % 2 === 0)
          .map(([off, len], i) => {
            const d = patternBytes(len, seed * 1000 + i);
            model.set(d, off);
            return img.write(off, d);
          }),
      );
      t.ok(Buffer.from(await readAll(img)).equals(Buffer.from(model)), `${name}: content`);
      await img.close();
      verify(t, path, model);
    }
  }
});

t.test('concurrent overlapping writes end as some sequential order', async (t) => {
  useQemu(t);
  const dir = t.testdir();
  const shapes: [number, number][][] = [
    [[0, 3 * C], [C / 2, 2 * C + 100], [C + 7, 43]],
    [[5 * C + 1, 10], [5 * C + 5, C], [4 * C, 3 * C]],
    [[10 * C, C], [10 * C, C], [10 * C + 1, C - 2]],
    // The middle request writes zeroes (whole and partial clusters).
    [[0, 3 * C], [C / 2, 2 * C], [C + 7, 43]],
  ];
  for (const [k, shape] of shapes.entries()) {
    const { img, model, path } = await makeImage(dir, `o${k}.qcow2`, true);
    const zeroes = k === 3 ? 1 : -1;
    const datas = shape.map(([, len], i) => (i === zeroes ? new Uint8Array(len) : patternBytes(len, k * 10 + i + 1)));
    await Promise.all(shape.map(([off, len], i) => (i === zeroes ? img.writeZeroes(off, len) : img.write(off, datas[i]!))));
    const got = Buffer.from(await readAll(img));
    const orders = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
    const matching = orders.filter((order) => {
      const m = model.slice();
      for (const i of order) m.set(datas[i]!, shape[i]![0]);
      return got.equals(Buffer.from(m));
    });
    t.ok(matching.length > 0, `shape ${k}: equals a sequential order (${JSON.stringify(matching[0])})`);
    for (const i of matching[0] ?? []) model.set(datas[i]!, shape[i]![0]);
    await img.close();
    verify(t, path, model);
  }
});

t.test('mixed concurrent writes, zeroes, discards, reads and flushes', async (t) => {
  useQemu(t);
  const dir = t.testdir();
  const { img, model, path } = await makeImage(dir, 'm.qcow2', true);
  const old = model.slice();
  const jobs: Promise<unknown>[] = [];
  const reads: { off: number; buf: Uint8Array }[] = [];
  for (let c = 0; c < 32; c++) {
    const off = c * C;
    switch (c % 6) {
      case 0: {
        const d = patternBytes(C, c);
        model.set(d, off);
        jobs.push(img.write(off, d));
        break;
      }
      case 1:
        model.fill(0, off + 10, off + 2000);
        jobs.push(img.writeZeroes(off + 10, 1990));
        break;
      case 2:
        model.fill(0, off, off + C);
        jobs.push(img.discard(off, C));
        break;
      case 3:
        model.fill(0, off, off + C);
        jobs.push(img.writeZeroes(off, C, { mayUnmap: true }));
        break;
      case 4: {
        const buf = new Uint8Array(C);
        reads.push({ off, buf });
        jobs.push(img.read(off, buf));
        break;
      }
      default:
        jobs.push(img.flush());
    }
  }
  await Promise.all(jobs);
  for (const r of reads) t.ok(Buffer.from(r.buf).equals(Buffer.from(old.subarray(r.off, r.off + C))), `read at ${r.off}`);
  t.ok(Buffer.from(await readAll(img)).equals(Buffer.from(model)), 'content');
  await img.close();
  verify(t, path, model);
});

t.test('a read racing a write sees the cluster wholly before or wholly after', async (t) => {
  useQemu(t);
  const dir = t.testdir();
  const { img, model, path } = await makeImage(dir, 'r.qcow2', true);
  const before = Buffer.from(model.subarray(0, 2 * C));
  const d = patternBytes(2 * C, 9);
  const bufs = [0, 1, 2, 3].map(() => new Uint8Array(2 * C));
  await Promise.all([img.read(0, bufs[0]!), img.write(0, d), img.read(0, bufs[1]!), img.read(0, bufs[2]!), img.write(100, d.subarray(100, 200)), img.read(0, bufs[3]!)]);
  model.set(d);
  for (const [i, b] of bufs.entries()) {
    const s = Buffer.from(b);
    t.ok(s.equals(before) || s.equals(Buffer.from(d)), `read ${i} is old or new`);
  }
  await img.close();
  verify(t, path, model);
});
