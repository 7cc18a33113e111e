import t, { type Test } from 'tap';
import { randomBytes } from 'node:crypto';
import { RawClient, readData, replyError, statusExtents, type TxReply } from './raw-client.fixture.js';
import { KiB, MiB, makeDisk, openHandles, serve, until } from './setup.fixture.js';

/**
 * The transmission rows (T01–T30) of the checklist's robustness table, and the cases it asks us
 * to add: overflow near 2^64, disconnects in the middle of requests and replies, several
 * contexts at once, pipelining with out-of-order completion, leaks.
 */

const READ = 0;
const WRITE = 1;
const DISC = 2;
const FLUSH = 3;
const TRIM = 4;
const CACHE = 5;
const ZEROES = 6;
const STATUS = 7;
const EPERM = 1;
const EINVAL = 22;
const ENOSPC = 28;
const SIZE = 4 * MiB;

async function setup(t: Test, opts: { writable?: boolean } = {}) {
  // Data in chunks 0, 1, 3 and 48..49 (3 MiB): holes between.
  const disk = await makeDisk(SIZE, { dataChunks: [0, 1, 3, 48, 49] });
  const bm = disk.node.bitmaps.add({ name: 'b0', disabled: true });
  bm.bits.set(64 * KiB, 64 * KiB);
  bm.bits.set(1 * MiB, 192 * KiB);
  const s = await serve(t, disk, { writable: opts.writable ?? true, bitmaps: [bm], allocationDepth: true });
  const open = async (o: { structured?: boolean; meta?: string[] } = {}) => {
    const c = await RawClient.connect(s.address);
    await c.go('disk', o);
    return c;
  };
  return { ...s, open };
}

function isError(t: Test, r: TxReply, error: number, what: string) {
  t.equal(replyError(r).error, error, what);
}

t.test('T01 bad request magic: close', async (t) => {
  const s = await setup(t);
  const c = await s.open();
  c.sendReq(READ, { length: 512, magic: 0x12345678 });
  await c.closedByServer();
  t.pass();
});

t.test('T02 unknown command: EINVAL and continue; T03/T25 bad flags: EINVAL', async (t) => {
  const s = await setup(t);
  for (const structured of [true, false]) {
    const c = await s.open({ structured });
    c.sendReq(0x55, { length: 512 });
    const r = await c.reply();
    isError(t, r, EINVAL, `unknown command (structured ${structured})`);
    if (structured) t.match(replyError(r).message, /invalid request type \(85\)/);
    c.sendReq(8, { length: 0 });
    isError(t, await c.reply(), EINVAL, 'RESIZE is not supported');
    c.sendReq(READ, { flags: 0x8000, length: 512 });
    isError(t, await c.reply(), EINVAL, 'unknown flag');
    c.sendReq(READ, { flags: 2, length: 512 });
    isError(t, await c.reply(), EINVAL, 'NO_HOLE on READ');
    c.sendReq(READ, { flags: 8, length: 512 });
    isError(t, await c.reply(), EINVAL, 'REQ_ONE on READ');
    c.sendReq(WRITE, { flags: 16, payload: Buffer.alloc(1) });
    isError(t, await c.reply(), EINVAL, 'FAST_ZERO on WRITE');
    if (!structured) {
      c.sendReq(READ, { flags: 4, length: 512 });
      isError(t, await c.reply(), EINVAL, 'DF without structured replies');
    }
    c.sendReq(READ, { length: 512, cookie: 2n });
    const ok = await c.reply(512);
    t.ok(readData(ok, 0, 512).equals(s.disk.content.subarray(0, 512)), 'the connection still works');
    c.close();
  }
});

t.test('T04/T05/T27 READ, TRIM, CACHE past the end: EINVAL; T06/T28 WRITE, WRITE_ZEROES: ENOSPC', async (t) => {
  const s = await setup(t);
  const c = await s.open();
  const cases: [number, number, number, number][] = [
    [READ, SIZE - 512, 1024, EINVAL],
    [READ, SIZE + 4096, 512, EINVAL],
    [TRIM, SIZE - 512, 4096, EINVAL],
    [CACHE, SIZE - 512, 4096, EINVAL],
    [ZEROES, SIZE - 512, 4096, ENOSPC],
    [STATUS, SIZE - 512, 4096, EINVAL],
  ];
  for (const [type, offset, length, error] of cases) {
    c.sendReq(type, { offset, length });
    isError(t, await c.reply(), error, `command ${type} at ${offset}+${length}`);
  }
  c.sendReq(WRITE, { offset: SIZE - 512, payload: Buffer.alloc(1024, 7) });
  const w = await c.reply();
  isError(t, w, ENOSPC, 'WRITE across the end');
  t.match(replyError(w).message, /past EOF/);
  t.ok(s.disk.content.subarray(SIZE - 512).equals(await readBack(s, SIZE - 512, 512)), 'nothing written');
  c.close();
});

t.test('offsets near 2^64: no overflow, EINVAL', async (t) => {
  const s = await setup(t);
  const c = await s.open();
  for (const offset of [0xffffffffffffffffn, 0xfffffffffffffe00n, 0x8000000000000000n, BigInt(Number.MAX_SAFE_INTEGER) + 1n]) {
    c.sendReq(READ, { offset, length: 512 });
    isError(t, await c.reply(), EINVAL, `READ at ${offset}`);
    c.sendReq(STATUS, { offset, length: 512 });
    isError(t, await c.reply(), EINVAL, `BLOCK_STATUS at ${offset}`);
  }
  c.sendReq(READ, { offset: SIZE, length: 0 });
  t.equal(replyError(await c.reply()).error, 0, 'zero-length READ at the very end is fine');
  c.close();
});

t.test('T07 WRITE then READ; T11 WRITE length 0; T10 READ length 0; zero-length TRIM/ZERO/CACHE', async (t) => {
  const s = await setup(t);
  const c = await s.open();
  const data = randomBytes(4096);
  c.sendReq(WRITE, { offset: 100, payload: data });
  t.same(await c.reply(), { kind: 'simple', cookie: 1n, error: 0 });
  data.copy(s.disk.content, 100);
  c.sendReq(READ, { offset: 0, length: 8192, cookie: 2n });
  t.ok(readData(await c.reply(), 0, 8192).equals(s.disk.content.subarray(0, 8192)));
  c.sendReq(WRITE, { offset: 0, length: 0 });
  t.equal(replyError(await c.reply()).error, 0, 'WRITE 0');
  c.sendReq(READ, { offset: 0, length: 0, cookie: 3n });
  const r = await c.reply();
  t.ok(r.kind === 'chunks' && r.chunks.length === 1 && r.chunks[0]!.type === 0 && r.chunks[0]!.flags === 1, 'READ 0 gets a lone NONE chunk');
  for (const type of [TRIM, ZEROES, CACHE]) {
    c.sendReq(type, { offset: 4096, length: 0 });
    t.equal(replyError(await c.reply()).error, 0, `command ${type} with length 0`);
  }
  c.sendReq(STATUS, { offset: 0, length: 0 });
  isError(t, await c.reply(), EINVAL, 'T12 BLOCK_STATUS length 0 (no context either)');
  c.close();
});

t.test('T12 BLOCK_STATUS length 0 with a context: EINVAL; T19 without a context: EINVAL', async (t) => {
  const s = await setup(t);
  const c = await s.open({ meta: ['base:allocation'] });
  c.sendReq(STATUS, { length: 0 });
  const r = await c.reply();
  isError(t, r, EINVAL, 'length 0');
  t.match(replyError(r).message, /non-zero length/);
  c.close();
  const d = await s.open();
  d.sendReq(STATUS, { length: 65536 });
  isError(t, await d.reply(), EINVAL, 'no context');
  d.close();
  const e = await s.open({ structured: false });
  e.sendReq(STATUS, { length: 65536 });
  isError(t, await e.reply(), EINVAL, 'no structured replies');
  e.close();
});

t.test('T07–T09 on a read-only export: WRITE, TRIM, WRITE_ZEROES get EPERM; READ works', async (t) => {
  const s = await setup(t, { writable: false });
  const c = await s.open();
  t.equal(c.tflags, 0x058f, 'qemu-nbd read-only flags');
  c.sendReq(WRITE, { payload: Buffer.alloc(4096, 0x5a) });
  isError(t, await c.reply(), EPERM, 'WRITE');
  c.sendReq(TRIM, { offset: MiB, length: 65536 });
  isError(t, await c.reply(), EPERM, 'TRIM');
  c.sendReq(ZEROES, { offset: MiB, length: 65536 });
  isError(t, await c.reply(), EPERM, 'WRITE_ZEROES');
  c.sendReq(READ, { length: 4096 });
  t.ok(readData(await c.reply(), 0, 4096).equals(s.disk.content.subarray(0, 4096)), 'unchanged');
  c.close();
});

t.test('T09 TRIM and WRITE_ZEROES (with and without NO_HOLE, FAST_ZERO) on a memory node', async (t) => {
  const s = await setup(t);
  const c = await s.open({ meta: ['base:allocation'] });
  c.sendReq(TRIM, { offset: 0, length: 65536 });
  t.equal(replyError(await c.reply()).error, 0);
  c.sendReq(ZEROES, { offset: 64 * KiB, length: 65536, flags: 2 });
  t.equal(replyError(await c.reply()).error, 0);
  c.sendReq(ZEROES, { offset: 3 * 64 * KiB, length: 65536, flags: 16 | 1 });
  t.equal(replyError(await c.reply()).error, 0, 'FAST_ZERO|FUA: memory zeroes cheaply');
  s.disk.content.fill(0, 0, 4 * 64 * KiB);
  c.sendReq(READ, { offset: 0, length: 4 * 64 * KiB });
  t.ok(readData(await c.reply(), 0, 4 * 64 * KiB).equals(Buffer.alloc(4 * 64 * KiB)));
  c.sendReq(STATUS, { offset: 0, length: 4 * 64 * KiB });
  const ext = statusExtents(await c.reply()).get(0);
  // TRIM and zero without NO_HOLE unmap (hole,zero = 3); NO_HOLE keeps it allocated (zero = 2).
  t.same(ext, [[64 * KiB, 3], [64 * KiB, 2], [2 * 64 * KiB, 3]]);
  c.close();
});

t.test('T13 READ over the maximum: EINVAL, continue; T14 WRITE header over the maximum: EINVAL, close', async (t) => {
  const s = await setup(t);
  const c = await s.open();
  c.sendReq(READ, { length: 64 * MiB });
  isError(t, await c.reply(), EINVAL, 'READ 64 MiB');
  c.sendReq(READ, { length: 512, cookie: 2n });
  t.ok(readData(await c.reply(), 0, 512).equals(s.disk.content.subarray(0, 512)));
  c.sendReq(WRITE, { length: 64 * MiB });
  isError(t, await c.reply(), EINVAL, 'WRITE 64 MiB');
  await c.closedByServer();
});

t.test('T15 unaligned READ; T16 FLUSH with offset/length; T18 READ with FUA; T24 CACHE', async (t) => {
  const s = await setup(t);
  const c = await s.open();
  c.sendReq(READ, { offset: 1, length: 3 });
  t.ok(readData(await c.reply(), 1, 3).equals(s.disk.content.subarray(1, 4)));
  c.sendReq(FLUSH, { offset: 4096, length: 4096 });
  t.equal(replyError(await c.reply()).error, 0);
  c.sendReq(READ, { flags: 1, length: 512 });
  t.ok(readData(await c.reply(), 0, 512).equals(s.disk.content.subarray(0, 512)));
  c.sendReq(CACHE, { length: 65536 });
  t.equal(replyError(await c.reply()).error, 0);
  c.sendReq(CACHE, { length: SIZE });
  t.equal(replyError(await c.reply()).error, 0, 'CACHE of the whole export');
  c.close();
});

t.test('T17 READ over data and hole: DATA + HOLE chunks; with DF one DATA chunk', async (t) => {
  const s = await setup(t);
  const c = await s.open();
  const off = 3 * 64 * KiB;
  c.sendReq(READ, { offset: off, length: 256 * KiB });
  const r = await c.reply();
  t.ok(r.kind === 'chunks');
  if (r.kind !== 'chunks') return;
  t.same(r.chunks.map((x) => x.type), [1, 2], 'DATA then HOLE');
  t.equal(r.chunks[0]!.payload.length - 8, 64 * KiB);
  t.equal(r.chunks[1]!.payload.readUInt32BE(8), 192 * KiB);
  t.same(r.chunks.map((x) => x.flags), [0, 1], 'DONE on the last chunk only');
  t.ok(readData(r, off, 256 * KiB).equals(s.disk.content.subarray(off, off + 256 * KiB)));
  c.sendReq(READ, { flags: 4, offset: off, length: 256 * KiB });
  const df = await c.reply();
  t.ok(df.kind === 'chunks' && df.chunks.length === 1 && df.chunks[0]!.type === 1, 'one DATA chunk');
  t.ok(readData(df, off, 256 * KiB).equals(s.disk.content.subarray(off, off + 256 * KiB)));
  c.sendReq(READ, { offset: 5 * 64 * KiB, length: 64 * KiB });
  const hole = await c.reply();
  t.ok(hole.kind === 'chunks' && hole.chunks.length === 1 && hole.chunks[0]!.type === 2, 'an all-hole read is one HOLE chunk');
  c.close();
});

t.test('T20 BLOCK_STATUS with REQ_ONE and past the end; all contexts at once', async (t) => {
  const s = await setup(t);
  const c = await s.open({ meta: ['base:allocation', 'qemu:allocation-depth', 'qemu:dirty-bitmap:b0'] });
  const ids = c.contexts;
  t.equal(ids.size, 3);
  c.sendReq(STATUS, { flags: 8, offset: 0, length: SIZE });
  const one = statusExtents(await c.reply());
  t.same(one.get(ids.get('base:allocation')!), [[128 * KiB, 0]], 'REQ_ONE: first run of data');
  t.same(one.get(ids.get('qemu:allocation-depth')!), [[SIZE, 1]], 'memory nodes decide all their content');
  t.same(one.get(ids.get('qemu:dirty-bitmap:b0')!), [[64 * KiB, 0]], 'clean first granule');
  c.sendReq(STATUS, { offset: 100, length: 1 * MiB + 100 * KiB });
  const all = statusExtents(await c.reply());
  t.same(all.get(ids.get('base:allocation')!), [
    [128 * KiB - 100, 0],
    [64 * KiB, 3],
    [64 * KiB, 0],
    [1 * MiB + 100 * KiB + 100 - 256 * KiB, 3],
  ], 'clipped to the request, merged');
  t.same(all.get(ids.get('qemu:dirty-bitmap:b0')!), [
    [64 * KiB - 100, 0],
    [64 * KiB, 1],
    [MiB - 128 * KiB, 0],
    [100 * KiB + 100, 1],
  ], 'bitmap runs clipped to the request');
  c.sendReq(STATUS, { offset: SIZE - 512, length: 4096 });
  isError(t, await c.reply(), EINVAL, 'past the end');
  c.close();
});

t.test('T22 64 pipelined READs; replies may come out of order; T29 cookies echoed bit-exactly', async (t) => {
  const s = await setup(t);
  const c = await s.open();
  const cookies = Array.from({ length: 64 }, (_, i) => 0xfedcba9800000000n + BigInt(i) * 0x01010101n);
  cookies[0] = 0xffffffffffffffffn;
  cookies.forEach((cookie, i) => c.sendReq(READ, { cookie, offset: (i * 4096) % SIZE, length: 4096 }));
  const seen = new Set<bigint>();
  for (let i = 0; i < 64; i++) {
    const r = await c.reply();
    const idx = cookies.indexOf(r.cookie);
    t.ok(idx >= 0 && !seen.has(r.cookie), `cookie ${r.cookie} is one of ours, once`);
    seen.add(r.cookie);
    const off = (idx * 4096) % SIZE;
    if (!readData(r, off, 4096).equals(s.disk.content.subarray(off, off + 4096))) t.fail(`data of request ${idx}`);
  }
  t.equal(seen.size, 64);
  c.close();
});

t.test('overlapping pipelined writes apply in arrival order', async (t) => {
  const s = await setup(t);
  const c = await s.open();
  // Many writes to one block, sent without waiting: the last one sent must win.
  for (let i = 0; i < 40; i++) c.sendReq(WRITE, { cookie: BigInt(i), offset: 8192 + (i % 3), payload: Buffer.alloc(4096, i) });
  for (let i = 0; i < 40; i++) t.equal(replyError(await c.reply()).error, 0);
  const expect = Buffer.from(s.disk.content.subarray(8192, 8192 + 8192));
  for (let i = 0; i < 40; i++) expect.fill(i, i % 3, (i % 3) + 4096);
  c.sendReq(READ, { offset: 8192, length: 8192 });
  t.ok(readData(await c.reply(), 8192, 8192).equals(expect));
  c.close();
});

t.test('T21 client drops mid-WRITE payload or mid-header; T23 DISC with a READ outstanding is answered', async (t) => {
  const s = await setup(t);
  const c = await s.open();
  c.sendReq(WRITE, { length: 65536 });
  c.socket.write(Buffer.alloc(1000));
  c.close();
  await c.closedPromise;
  // And in the middle of a request header.
  const h = await s.open();
  h.socket.write(Buffer.from([0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0, 1, 2]));
  h.close();
  await h.closedPromise;
  await until(() => s.server.connectionCount === 0, 'both half-sent requests to be dropped');
  const d = await s.open();
  d.sendReq(READ, { cookie: 7n, length: MiB });
  d.sendReq(DISC, { cookie: 8n });
  const r = await d.reply();
  t.equal(r.cookie, 7n);
  t.ok(readData(r, 0, MiB).equals(s.disk.content.subarray(0, MiB)), 'outstanding READ answered');
  await d.closedByServer();
  await until(() => s.server.connectionCount === 0, 'connections to close');
});

t.test('T26 simple replies: READ past the end, then a good READ', async (t) => {
  const s = await setup(t);
  const c = await s.open({ structured: false });
  t.equal(c.tflags, 0x0d6d);
  c.sendReq(READ, { offset: SIZE - 512, length: 1024 });
  t.same(await c.reply(1024), { kind: 'simple', cookie: 1n, error: EINVAL }, 'error without data');
  c.sendReq(READ, { offset: 0, length: 512, cookie: 2n });
  const r = await c.reply(512);
  t.ok(r.kind === 'simple' && r.data?.equals(s.disk.content.subarray(0, 512)));
  c.close();
});

t.test('T30 20 concurrent connections; opened and closed in a loop without leaks', async (t) => {
  const s = await setup(t);
  const before = openHandles();
  for (let round = 0; round < 3; round++) {
    const cs = await Promise.all(Array.from({ length: 20 }, () => s.open()));
    cs.forEach((c, i) => c.sendReq(READ, { offset: i * 4096, length: 4096 }));
    const rs = await Promise.all(cs.map((c) => c.reply()));
    rs.forEach((r, i) => {
      if (!readData(r, i * 4096, 4096).equals(s.disk.content.subarray(i * 4096, i * 4096 + 4096))) t.fail(`connection ${i}`);
    });
    // Half say goodbye properly, half just drop.
    cs.forEach((c, i) => (i % 2 ? c.sendReq(DISC) : c.close()));
    await Promise.all(cs.map((c) => c.closedPromise));
    await until(() => s.server.connectionCount === 0, 'connections to close');
  }
  await until(() => openHandles() <= before, `open handles back to ${before}`);
  t.pass('no connection or handle left');
});

t.test('a client resetting during a big READ reply does not disturb others', async (t) => {
  const s = await setup(t);
  const c = await s.open();
  const other = await s.open();
  for (let i = 0; i < 8; i++) c.sendReq(READ, { cookie: BigInt(i), length: 32 * MiB > SIZE ? SIZE : 32 * MiB });
  await c.read(100);
  c.close();
  other.sendReq(READ, { length: 4096 });
  t.ok(readData(await other.reply(), 0, 4096).equals(s.disk.content.subarray(0, 4096)));
  other.close();
  await until(() => s.server.connectionCount === 0, 'connections to close');
});

t.test('a slow reader is paced by backpressure, then gets everything', async (t) => {
  const s = await setup(t);
  const c = await s.open();
  c.socket.pause();
  const n = 48;
  for (let i = 0; i < n; i++) c.sendReq(READ, { cookie: BigInt(i), offset: 0, length: SIZE });
  // While the client reads nothing, the server stops taking requests (in flight <= its limit).
  await new Promise((r) => setImmediate(r));
  c.socket.resume();
  for (let i = 0; i < n; i++) {
    const r = await c.reply();
    if (!readData(r, 0, SIZE).equals(s.disk.content)) t.fail(`reply ${i}`);
  }
  t.pass(`${n} replies of ${SIZE} bytes`);
  c.close();
});

t.test('garbage right after GO is a bad request: close', async (t) => {
  const s = await setup(t);
  const c = await s.open();
  c.socket.write(randomBytes(28).fill(0, 0, 4));
  await c.closedByServer();
  t.pass();
});

async function readBack(s: { disk: { memory: { read(o: number, b: Uint8Array): Promise<void> } } }, offset: number, bytes: number) {
  const b = Buffer.alloc(bytes);
  await s.disk.memory.read(offset, b);
  return b;
}
