import type { Test } from 'tap';
import { alignUp, isShearError } from '@shear/base';
import type { BlockIO, BlockStatusExtent } from '@shear/block';

/**
 * How to make the node under test. The suite calls `open` once per subtest and closes what it
 * gets; temporary files belong in t.testdir().
 */
export interface BlockIOFactory {
  /** A fresh node of exactly `length` bytes (already a multiple of lengthAlignment) that reads as zeroes. */
  open(t: Test, length: number): Promise<BlockIO>;
  /** False for nodes that drop writes (null-co): every check of read-back content is skipped. */
  persistsData: boolean;
  /** Discarded ranges read back as zeroes. Otherwise they may read as anything, but stably. */
  discardReadsZero?: boolean;
  /** Lengths the node can have are multiples of this (qcow2: 512). Default 1. */
  lengthAlignment?: number;
}

const KiB = 1024;
const MiB = 1024 * KiB;
/** Not a multiple of 4096, so units straddle the end of every node the suite makes. */
const BASE_LENGTH_BYTES = 2 * MiB + 1541;
/** Random operation sequences in the model test, and operations in each. */
const MODEL_RUNS = 12;
const MODEL_STEPS = 24;

/**
 * The BlockIO contract (packages/block/src/io.ts) as one tap suite: bounds, zero-length requests, unaligned and
 * partial-unit I/O, read-after-write, writeZeroes with and without mayUnmap, discard, block
 * status coverage and agreement with content, flush and FUA, concurrent writes into one unit,
 * typed-array views, and close. Every driver runs it with only the factory changing.
 *
 * No runtime dependency beyond tap's `t`: random sequences come from a seeded generator, and a
 * failure names its seed.
 */
export function runBlockIOConformance(t: Test, name: string, factory: BlockIOFactory): Promise<unknown> {
  const length = alignUp(BASE_LENGTH_BYTES, factory.lengthAlignment ?? 1);
  const data = factory.persistsData;

  /** Runs fn on a fresh node and closes it on every path. */
  async function withNode(tt: Test, fn: (io: BlockIO) => Promise<void>): Promise<void> {
    const io = await factory.open(tt, length);
    try {
      await fn(io);
    } finally {
      await io.close();
    }
  }

  return t.test(`BlockIO conformance: ${name}`, async (t) => {
    t.test('length is as asked and a fresh node reads as zeroes', (tt) =>
      withNode(tt, async (io) => {
        tt.equal(io.length, length);
        if (!data) return;
        const all = await readAll(io);
        tt.equal(firstNonZero(all), -1, 'all zero');
      }),
    );

    t.test('requests outside the node or with bad numbers reject', (tt) =>
      withNode(tt, async (io) => {
        const L = io.length;
        const one = new Uint8Array(1);
        const two = new Uint8Array(2);
        const outside: [string, () => Promise<unknown>][] = [
          ['read at length', () => io.read(L, one)],
          ['read across the end', () => io.read(L - 1, two)],
          ['write at length', () => io.write(L, one)],
          ['write across the end', () => io.write(L - 1, two)],
          ['writeZeroes across the end', () => io.writeZeroes(L - 1, 2)],
          ['discard across the end', () => io.discard(L - 1, 2)],
          ['blockStatus across the end', () => io.blockStatus(L - 1, 2)],
          ['a range ending past 2^53', () => io.blockStatus(L - 1, Number.MAX_SAFE_INTEGER)],
        ];
        for (const [what, call] of outside) await expectCode(tt, call, 'ERR_OUT_OF_BOUNDS', what);
        const invalid: [string, () => Promise<unknown>][] = [
          ['negative offset', () => io.read(-1, one)],
          ['fractional offset', () => io.write(0.5, one)],
          ['NaN offset', () => io.writeZeroes(Number.NaN, 1)],
          ['negative bytes', () => io.discard(0, -1)],
          ['fractional bytes', () => io.blockStatus(0, 1.5)],
          ['unsafe offset', () => io.read(2 ** 53, one)],
        ];
        for (const [what, call] of invalid) await expectCode(tt, call, 'ERR_INVALID_ARGUMENT', what);
      }),
    );

    t.test('zero-length requests succeed and change nothing', (tt) =>
      withNode(tt, async (io) => {
        const L = io.length;
        const pattern = patternBytes(4096, 1);
        await io.write(L - 4096, pattern);
        const empty = new Uint8Array(0);
        for (const at of [0, 1, L - 1, L]) {
          await io.read(at, empty);
          await io.write(at, empty);
          await io.writeZeroes(at, 0, { mayUnmap: true });
          await io.discard(at, 0);
          tt.ok(Array.isArray(await io.blockStatus(at, 0)), `blockStatus(${at}, 0)`);
        }
        if (data) tt.same(await readRange(io, L - 4096, 4096), pattern, 'content unchanged');
      }),
    );

    t.test('read-after-write at unaligned offsets, across units and at the end', (tt) =>
      withNode(tt, async (io) => {
        const L = io.length;
        const model = new Uint8Array(L);
        const writes: [number, number][] = [
          [0, 1],
          [1, 7],
          [511, 2],
          [4095, 4097],
          [65536 - 3, 70_000],
          [MiB - 100, 513],
          [MiB + 4096, 8192],
          [L - 5000, 5000],
          [L - 1, 1],
        ];
        let seed = 1;
        for (const [offset, bytes] of writes) {
          const buf = patternBytes(bytes, seed++);
          await io.write(offset, buf);
          model.set(buf, offset);
        }
        if (!data) return;
        tt.equal(firstDifference(await readAll(io), model), -1, 'whole node matches');
        for (const [offset, bytes] of [[3, 5000], [65530, 20], [L - 4097, 4097], [MiB - 1, 2]] as const) {
          tt.equal(firstDifference(await readRange(io, offset, bytes), model.subarray(offset, offset + bytes)), -1, `window (${offset}, ${bytes})`);
        }
      }),
    );

    t.test('random sequences of writes, zeroes, discards and reads agree with a model', async (tt) => {
      for (let run = 0; run < MODEL_RUNS; run++) {
        const seed = 0x5eed + run;
        await withNode(tt, async (io) => {
          const failure = await modelRun(io, seed, data, factory.discardReadsZero ?? false);
          tt.equal(failure, undefined, `seed ${seed}`);
        });
      }
    });

    t.test('writeZeroes with and without mayUnmap reads back zeroes and spares neighbours', (tt) =>
      withNode(tt, async (io) => {
        const L = io.length;
        const model = patternBytes(L, 77);
        await io.write(0, model);
        const cases: [number, number, { mayUnmap?: boolean; fua?: boolean }][] = [
          [1000, 70_000, { mayUnmap: true }],
          [200_000, 70_001, {}],
          [MiB, MiB, { mayUnmap: true }],
          [300_000, 4096, { fua: true }],
          [L - 3000, 3000, { mayUnmap: false }],
        ];
        for (const [offset, bytes, opts] of cases) {
          await io.writeZeroes(offset, bytes, opts);
          model.fill(0, offset, offset + bytes);
        }
        // fastOnly either zeroes or refuses with ERR_NOT_IMPLEMENTED, never anything else.
        try {
          await io.writeZeroes(500_000, 10_000, { fastOnly: true });
          model.fill(0, 500_000, 510_000);
        } catch (err) {
          tt.ok(isShearError(err, 'ERR_NOT_IMPLEMENTED'), `fastOnly refusal is ERR_NOT_IMPLEMENTED (${String(err)})`);
        }
        if (!data) return;
        tt.equal(firstDifference(await readAll(io), model), -1, 'content matches');
        await checkStatus(tt, io, 0, L, model);
      }),
    );

    t.test('discard changes only its range, stably, and block status agrees', (tt) =>
      withNode(tt, async (io) => {
        const L = io.length;
        const model = patternBytes(L, 99);
        await io.write(0, model);
        const ranges: [number, number][] = [
          [4096 * 3, 4096 * 20],
          [123_457, 99_999],
          [L - 7000, 7000],
        ];
        for (const [offset, bytes] of ranges) await io.discard(offset, bytes);
        if (!data) return;
        const first = await readAll(io);
        const second = await readAll(io);
        tt.equal(firstDifference(first, second), -1, 'discarded ranges read the same twice');
        for (const [offset, bytes] of ranges) {
          if (factory.discardReadsZero) tt.equal(firstNonZero(first.subarray(offset, offset + bytes)), -1, `(${offset}, ${bytes}) reads zero`);
          model.set(first.subarray(offset, offset + bytes), offset);
        }
        tt.equal(firstDifference(first, model), -1, 'nothing outside the discarded ranges changed');
        await checkStatus(tt, io, 0, L, model);
      }),
    );

    t.test('blockStatus covers any range contiguously, in order, and agrees with content', (tt) =>
      withNode(tt, async (io) => {
        const L = io.length;
        const model = new Uint8Array(L);
        const put = async (offset: number, bytes: number, seed: number) => {
          const buf = patternBytes(bytes, seed);
          await io.write(offset, buf);
          model.set(buf, offset);
        };
        await put(0, 1, 1);
        await put(65536, 65536, 2);
        await put(MiB + 12_345, 200_000, 3);
        await io.writeZeroes(MiB + 50_000, 100_000);
        model.fill(0, MiB + 50_000, MiB + 150_000);
        await put(L - 10, 10, 4);
        for (const [offset, bytes] of [[0, L], [1, L - 1], [65535, 3], [MiB, 1], [L - 1, 1], [100, 1_000_000]] as const) {
          await checkStatus(tt, io, offset, bytes, data ? model : undefined);
        }
      }),
    );

    t.test('flush and FUA writes succeed and the data reads back', (tt) =>
      withNode(tt, async (io) => {
        const buf = patternBytes(10_000, 5);
        await io.write(777, buf, { fua: true });
        await io.flush();
        await io.writeZeroes(800, 100, { fua: true });
        await io.flush();
        if (!data) return;
        const expected = buf.slice();
        expected.fill(0, 800 - 777, 900 - 777);
        tt.equal(firstDifference(await readRange(io, 777, 10_000), expected), -1);
      }),
    );

    t.test('concurrent writes to neighbouring bytes of the same units all land', (tt) =>
      withNode(tt, async (io) => {
        const model = new Uint8Array(io.length);
        const ops: Promise<void>[] = [];
        for (let i = 0; i < 64; i++) {
          const offset = 7 + i * 100;
          const buf = patternBytes(100, 1000 + i);
          model.set(buf, offset);
          ops.push(io.write(offset, buf));
        }
        // zeroes and data interleaved on one unit boundary region
        for (let i = 0; i < 16; i++) {
          const offset = 20_000 + i * 300;
          if (i % 2 === 0) {
            ops.push(io.writeZeroes(offset, 300, { mayUnmap: i % 4 === 0 }));
          } else {
            const buf = patternBytes(300, 2000 + i);
            model.set(buf, offset);
            ops.push(io.write(offset, buf));
          }
        }
        await Promise.all(ops);
        if (!data) return;
        tt.equal(firstDifference(await readRange(io, 0, 32_768), model.subarray(0, 32_768)), -1);
      }),
    );

    t.test('views with a byte offset are read into and written from exactly', (tt) =>
      withNode(tt, async (io) => {
        const backing = new Uint8Array(10_000).fill(0xee);
        const view = backing.subarray(3, 3 + 5000);
        view.set(patternBytes(5000, 8));
        await io.write(4093, view);
        const target = new Uint8Array(12_000).fill(0xcc);
        await io.read(4093, target.subarray(5, 5005));
        tt.equal(target[4], 0xcc, 'byte before the view untouched');
        tt.equal(target[5005], 0xcc, 'byte after the view untouched');
        if (data) tt.equal(firstDifference(target.subarray(5, 5005), view), -1, 'content');
        tt.equal(backing[2], 0xee, 'source buffer untouched');
      }),
    );

    t.test('close waits for requests in flight, is idempotent, and later calls reject', async (tt) => {
      const io = await factory.open(tt, length);
      const inflight = io.write(4096, patternBytes(65536, 3));
      const closing = io.close();
      await inflight;
      await closing;
      await io.close();
      const calls: [string, () => Promise<unknown>][] = [
        ['read', () => io.read(0, new Uint8Array(1))],
        ['write', () => io.write(0, new Uint8Array(1))],
        ['writeZeroes', () => io.writeZeroes(0, 1)],
        ['discard', () => io.discard(0, 1)],
        ['flush', () => io.flush()],
        ['blockStatus', () => io.blockStatus(0, 1)],
      ];
      for (const [what, call] of calls) {
        try {
          await call();
          tt.fail(`${what} after close resolved`);
        } catch (err) {
          tt.ok(isShearError(err), `${what} after close rejects with a ShearError (${String(err)})`);
        }
      }
    });
  });
}

// ---- helpers ----

async function expectCode(t: Test, call: () => Promise<unknown>, code: string, what: string): Promise<void> {
  try {
    await call();
    t.fail(`${what}: resolved, expected ${code}`);
  } catch (err) {
    t.ok(isShearError(err) && err.code === code, `${what}: ${code} (${String(err)})`);
  }
}

async function readRange(io: BlockIO, offset: number, bytes: number): Promise<Uint8Array> {
  const buf = new Uint8Array(bytes).fill(0xa5);
  await io.read(offset, buf);
  return buf;
}

const readAll = (io: BlockIO) => readRange(io, 0, io.length);

/** Deterministic bytes, none zero, so a lost write never looks like a zero. */
function patternBytes(bytes: number, seed: number): Uint8Array {
  const out = new Uint8Array(bytes);
  const next = prng(seed);
  for (let i = 0; i < bytes; i++) out[i] = 1 + (next() % 255);
  return out;
}

function firstNonZero(buf: Uint8Array): number {
  return buf.findIndex((b) => b !== 0);
}

function firstDifference(a: Uint8Array, b: Uint8Array): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

/** mulberry32: a small seeded generator of 32-bit unsigned integers. */
function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let x = s;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return (x ^ (x >>> 14)) >>> 0;
  };
}

/**
 * Walks blockStatus over [offset, offset + bytes) the way callers do (looping when an answer
 * stops early) and checks the shape of every answer; with a model, also that zero extents read
 * as zeroes there.
 */
async function checkStatus(t: Test, io: BlockIO, offset: number, bytes: number, model: Uint8Array | undefined): Promise<void> {
  const end = offset + bytes;
  const problems: string[] = [];
  let pos = offset;
  for (let calls = 0; pos < end && problems.length === 0; calls++) {
    if (calls > 100_000) {
      problems.push('no progress after 100000 calls');
      break;
    }
    const extents: BlockStatusExtent[] = await io.blockStatus(pos, end - pos);
    if (extents.length === 0) {
      problems.push(`empty answer at ${pos}`);
      break;
    }
    for (const e of extents) {
      if (e.offset !== pos) problems.push(`extent at ${e.offset}, expected ${pos}`);
      if (!Number.isSafeInteger(e.bytes) || e.bytes <= 0) problems.push(`extent at ${e.offset} has ${e.bytes} bytes`);
      if (e.offset + e.bytes > end) problems.push(`extent (${e.offset}, ${e.bytes}) ends past ${end}`);
      if (typeof e.data !== 'boolean' || typeof e.zero !== 'boolean' || typeof e.allocated !== 'boolean') problems.push(`extent at ${e.offset} has non-boolean flags`);
      if (model && e.zero) {
        const nz = firstNonZero(model.subarray(e.offset, e.offset + e.bytes));
        if (nz !== -1) problems.push(`extent (${e.offset}, ${e.bytes}) says zero but byte ${e.offset + nz} is not`);
      }
      if (problems.length > 0) break;
      pos = e.offset + e.bytes;
    }
  }
  t.same(problems, [], `blockStatus over (${offset}, ${bytes})`);
}

type ModelOp =
  | { kind: 'write'; offset: number; bytes: number; seed: number }
  | { kind: 'zeroes'; offset: number; bytes: number; mayUnmap: boolean }
  | { kind: 'discard'; offset: number; bytes: number }
  | { kind: 'read'; offset: number; bytes: number }
  | { kind: 'status'; offset: number; bytes: number };

/**
 * One seeded random sequence against a model. Discarded bytes become unknown (unless they read
 * as zeroes by contract) until written again. Returns a description of the first disagreement.
 */
async function modelRun(io: BlockIO, seed: number, checkData: boolean, discardReadsZero: boolean): Promise<string | undefined> {
  const L = io.length;
  const next = prng(seed);
  const model = new Uint8Array(L);
  const known = new Uint8Array(L).fill(1);
  const done: string[] = [];
  const range = (): [number, number] => {
    // Mostly small unaligned ranges, sometimes large ones, often near unit boundaries.
    const big = next() % 8 === 0;
    const bytes = 1 + (next() % (big ? 300_000 : 9000));
    const near = next() % 3 === 0;
    let offset = near ? (next() % Math.floor(L / 4096)) * 4096 - (next() % 3) : next() % L;
    offset = Math.max(0, Math.min(offset, L - 1));
    return [offset, Math.min(bytes, L - offset)];
  };
  for (let step = 0; step < MODEL_STEPS; step++) {
    const [offset, bytes] = range();
    const pick = next() % 10;
    const op: ModelOp =
      pick < 4
        ? { kind: 'write', offset, bytes, seed: next() }
        : pick < 6
          ? { kind: 'zeroes', offset, bytes, mayUnmap: next() % 2 === 0 }
          : pick < 7
            ? { kind: 'discard', offset, bytes }
            : pick < 9
              ? { kind: 'read', offset, bytes }
              : { kind: 'status', offset, bytes };
    done.push(JSON.stringify(op));
    const where = () => `seed ${seed}, after ${done.join(' ')}`;
    switch (op.kind) {
      case 'write': {
        const buf = patternBytes(op.bytes, op.seed);
        await io.write(op.offset, buf);
        model.set(buf, op.offset);
        known.fill(1, op.offset, op.offset + op.bytes);
        break;
      }
      case 'zeroes':
        await io.writeZeroes(op.offset, op.bytes, { mayUnmap: op.mayUnmap });
        model.fill(0, op.offset, op.offset + op.bytes);
        known.fill(1, op.offset, op.offset + op.bytes);
        break;
      case 'discard':
        await io.discard(op.offset, op.bytes);
        model.fill(0, op.offset, op.offset + op.bytes);
        known.fill(discardReadsZero ? 1 : 0, op.offset, op.offset + op.bytes);
        break;
      case 'read': {
        const got = await readRange(io, op.offset, op.bytes);
        if (!checkData) break;
        for (let i = 0; i < op.bytes; i++) {
          const at = op.offset + i;
          if (known[at] === 1 && got[i] !== model[at]) return `byte ${at} is ${got[i]}, expected ${model[at]}; ${where()}`;
          if (known[at] === 0) {
            // Whatever a discarded byte reads as, it must keep reading as that.
            model[at] = got[i] as number;
            known[at] = 1;
          }
        }
        break;
      }
      case 'status': {
        let pos = op.offset;
        const end = op.offset + op.bytes;
        while (pos < end) {
          const extents = await io.blockStatus(pos, end - pos);
          const first = extents[0];
          if (!first || first.offset !== pos) return `blockStatus(${pos}) answered ${JSON.stringify(extents.slice(0, 2))}; ${where()}`;
          for (const e of extents) {
            if (e.offset !== pos || e.bytes <= 0 || e.offset + e.bytes > end) return `bad extent ${JSON.stringify(e)} at ${pos}; ${where()}`;
            if (checkData && e.zero) {
              for (let at = e.offset; at < e.offset + e.bytes; at++) {
                if (known[at] === 1 && model[at] !== 0) return `extent ${JSON.stringify(e)} says zero but byte ${at} is ${model[at]}; ${where()}`;
                // A discarded byte reported zero must read as zero from now on.
                model[at] = 0;
                known[at] = 1;
              }
            }
            pos = e.offset + e.bytes;
          }
        }
        break;
      }
    }
  }
  if (!checkData) return undefined;
  const all = await readAll(io);
  for (let at = 0; at < L; at++) {
    if (known[at] === 1 && all[at] !== model[at]) return `final: byte ${at} is ${all[at]}, expected ${model[at]}; seed ${seed}, after ${done.join(' ')}`;
  }
  return undefined;
}
