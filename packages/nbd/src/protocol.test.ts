import t from 'tap';
import fc from 'fast-check';
import { isShearError } from '@shear/base';
import * as p from './protocol/index.js';

/**
 * The pure codec: round trips of every message we encode, and fuzzing of every parser with
 * random bytes and with mutated valid messages. A parser may return a value or throw
 * ERR_NBD_PROTOCOL, nothing else (no RangeError from a Buffer read, no hang).
 */

const RUNS = 300;

/** Calls fn; passes if it returns or throws ERR_NBD_PROTOCOL. */
function clean(fn: () => unknown): boolean {
  try {
    fn();
    return true;
  } catch (err) {
    if (isShearError(err, 'ERR_NBD_PROTOCOL')) return true;
    throw err;
  }
}

/** A valid message with some bytes changed, cut or extended. */
function mutated(valid: fc.Arbitrary<Uint8Array>): fc.Arbitrary<Uint8Array> {
  return fc.tuple(valid, fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { maxLength: 4 }), fc.integer({ min: -8, max: 8 })).map(([bytes, edits, resize]) => {
    const b = Buffer.from(bytes);
    for (const [at, v] of edits) if (b.length > 0) b[at % b.length] = v;
    if (resize < 0) return b.subarray(0, Math.max(0, b.length + resize));
    return Buffer.concat([b, Buffer.alloc(resize, 0xff)]);
  });
}

const name = fc.string({ maxLength: 40 }).filter((s) => !s.includes('\0'));
const u16 = fc.integer({ min: 0, max: 0xffff });
const u32 = fc.integer({ min: 0, max: 0xffffffff });
const u64 = fc.bigInt({ min: 0n, max: 0xffffffffffffffffn });

t.test('round trips: handshake messages', async (t) => {
  fc.assert(
    fc.property(u16, (flags) => p.parseGreeting(p.encodeGreeting(flags)) === flags),
    { numRuns: 50 },
  );
  fc.assert(fc.property(name, fc.array(u16, { maxLength: 8 }), (n, infos) => {
    const back = p.parseExportRequest(p.encodeExportRequest({ name: n, infos }));
    return back.name === n && JSON.stringify(back.infos) === JSON.stringify(infos);
  }), { numRuns: RUNS });
  fc.assert(fc.property(name, fc.array(name, { maxLength: 6 }), (n, queries) => {
    const back = p.parseMetaContextRequest(p.encodeMetaContextRequest({ name: n, queries }));
    return back.name === n && JSON.stringify(back.queries) === JSON.stringify(queries);
  }), { numRuns: RUNS });
  fc.assert(fc.property(u32, name, (id, n) => {
    const back = p.parseMetaContextReply(p.encodeMetaContextReply(id, n));
    return back.id === id && back.name === n;
  }), { numRuns: RUNS });
  fc.assert(fc.property(name, name, (n, d) => {
    const back = p.parseServerReply(p.encodeServerReply(n, d));
    return back.name === n && back.description === d;
  }), { numRuns: RUNS });
  const size = fc.bigInt({ min: 0n, max: 0xffffffffffffffffn });
  fc.assert(fc.property(size, u16, (s, f) => {
    const r = p.parseInfoReply(p.encodeInfoExport(s, f));
    return r.type === p.NBD_INFO_EXPORT && r.size === s && r.flags === f;
  }), { numRuns: RUNS });
  const r = p.parseInfoReply(p.encodeInfoBlockSize(1, 4096, 32 << 20));
  t.same(r, { type: p.NBD_INFO_BLOCK_SIZE, minimum: 1, preferred: 4096, maximum: 32 << 20 });
  const reply = p.encodeOptionReply(7, p.NBD_REP_ERR_UNKNOWN, Buffer.from('x'));
  t.same(p.parseOptionReplyHeader(reply.subarray(0, 20)), { option: 7, type: p.NBD_REP_ERR_UNKNOWN, length: 1 });
  t.same(p.parseOptionHeader(p.encodeOption(10, Buffer.alloc(3)).subarray(0, 16)), { option: 10, length: 3 });
  t.same(p.parseExportNameReply(p.encodeExportNameReply(12345, 0x0d6d, true)), { size: 12345n, flags: 0x0d6d });
  t.equal(p.encodeExportNameReply(1, 1, false).length, 134, '124 zero bytes without NO_ZEROES');
});

t.test('round trips: requests and replies through the reply decoder, split at any point', async (t) => {
  const header = fc.record({ flags: u16, type: u16, cookie: u64, offset: u64, length: u32 });
  fc.assert(fc.property(header, (h) => JSON.stringify(p.parseRequestHeader(p.encodeRequest(h)), (_, v) => (typeof v === 'bigint' ? v.toString() : v)) === JSON.stringify(h, (_, v) => (typeof v === 'bigint' ? v.toString() : v))), { numRuns: RUNS });

  // A stream of replies to known cookies, fed in random pieces, decodes to the same replies.
  const reply = fc.oneof(
    fc.record({ kind: fc.constant('simple-error' as const), cookie: u64, error: fc.integer({ min: 1, max: 200 }) }),
    fc.record({ kind: fc.constant('simple-read' as const), cookie: u64, data: fc.uint8Array({ maxLength: 300 }) }),
    fc.record({ kind: fc.constant('hole' as const), cookie: u64, offset: fc.nat(), bytes: fc.integer({ min: 1, max: 1e6 }) }),
    fc.record({ kind: fc.constant('data' as const), cookie: u64, offset: fc.nat(), data: fc.uint8Array({ minLength: 1, maxLength: 300 }) }),
    fc.record({ kind: fc.constant('status' as const), cookie: u64, id: u32, extents: fc.array(fc.record({ length: fc.integer({ min: 1, max: 0xffffffff }), flags: u32 }), { minLength: 1, maxLength: 20 }) }),
    fc.record({ kind: fc.constant('error' as const), cookie: u64, error: fc.integer({ min: 1, max: 200 }), message: fc.string({ maxLength: 60 }) }),
    fc.record({ kind: fc.constant('none' as const), cookie: u64 }),
  );
  fc.assert(
    // Cookies are unique in flight (a simple READ reply's length is looked up by cookie).
    fc.property(fc.uniqueArray(reply, { minLength: 1, maxLength: 10, selector: (r) => r.cookie }), fc.array(fc.nat(), { maxLength: 10 }), (replies, cuts) => {
      const readLen = new Map<bigint, number>();
      const wire: Buffer[] = [];
      for (const r of replies) {
        switch (r.kind) {
          case 'simple-error': readLen.set(r.cookie, 0); wire.push(p.encodeSimpleReply(r.cookie, r.error)); break;
          case 'simple-read': readLen.set(r.cookie, r.data.length); wire.push(p.encodeSimpleReply(r.cookie, 0), Buffer.from(r.data)); break;
          case 'hole': wire.push(p.encodeHoleChunk(1, r.cookie, r.offset, r.bytes)); break;
          case 'data': wire.push(p.encodeOffsetDataHeader(0, r.cookie, r.offset, r.data.length), Buffer.from(r.data)); break;
          case 'status': wire.push(p.encodeBlockStatusChunk(1, r.cookie, r.id, r.extents)); break;
          case 'error': wire.push(p.encodeErrorChunk(r.cookie, r.error, r.message)); break;
          case 'none': wire.push(p.encodeNoneChunk(r.cookie)); break;
        }
      }
      const all = Buffer.concat(wire);
      const dec = new p.ReplyDecoder({ simpleDataBytes: (c) => readLen.get(c) ?? 0 });
      const got: p.Reply[] = [];
      const points = [...new Set(cuts.map((c) => c % (all.length + 1)))].sort((a, b) => a - b);
      let from = 0;
      for (const at of [...points, all.length]) {
        dec.push(all.subarray(from, at));
        from = at;
        for (let r = dec.next(); r; r = dec.next()) got.push(r);
      }
      if (got.length !== replies.length || dec.buffered !== 0) return false;
      return replies.every((r, i) => {
        const g = got[i]!;
        if (g.cookie !== r.cookie) return false;
        switch (r.kind) {
          case 'simple-error': return g.kind === 'simple' && g.error === r.error;
          case 'simple-read': return g.kind === 'simple' && g.error === 0 && (r.data.length === 0 ? g.data === undefined : Buffer.from(r.data).equals(g.data!));
          case 'hole': { if (g.kind !== 'chunk') return false; const h = p.parseOffsetHole(g.payload); return h.offset === BigInt(r.offset) && h.bytes === r.bytes; }
          case 'data': { if (g.kind !== 'chunk') return false; const d = p.parseOffsetData(g.payload); return d.offset === BigInt(r.offset) && d.data.equals(Buffer.from(r.data)); }
          case 'status': { if (g.kind !== 'chunk') return false; const s = p.parseBlockStatus(g.payload); return s.contextId === r.id && JSON.stringify(s.extents) === JSON.stringify(r.extents); }
          case 'error': { if (g.kind !== 'chunk') return false; const e = p.parseErrorChunk(g.type, g.payload); return e.error === r.error && e.message === p.encodeTruncated(r.message, p.MAX_ERROR_MESSAGE_BYTES).toString(); }
          case 'none': return g.kind === 'chunk' && g.type === p.NBD_REPLY_TYPE_NONE && (g.flags & 1) === 1;
        }
        return false;
      });
    }),
    { numRuns: RUNS },
  );
  t.pass('replies decode whole from any split of the stream');
});

t.test('fuzz: every handshake parser on random bytes and mutated valid messages', async (t) => {
  const valid = {
    greeting: fc.constant(p.encodeGreeting(3)),
    optionHeader: fc.constant(p.encodeOption(7).subarray(0, 16)),
    exportRequest: fc.tuple(name, fc.array(u16, { maxLength: 4 })).map(([n, infos]) => p.encodeExportRequest({ name: n, infos })),
    metaRequest: fc.tuple(name, fc.array(name, { maxLength: 4 })).map(([n, q]) => p.encodeMetaContextRequest({ name: n, queries: q })),
    replyHeader: fc.constant(p.encodeOptionReply(1, 1).subarray(0, 20)),
    info: fc.oneof(fc.constant(p.encodeInfoExport(1n << 40n, 3)), fc.constant(p.encodeInfoBlockSize(1, 4096, 1 << 25)), name.map((n) => p.encodeInfoText(p.NBD_INFO_NAME, n))),
    server: fc.tuple(name, name).map(([n, d]) => p.encodeServerReply(n, d)),
    meta: fc.tuple(u32, name).map(([id, n]) => p.encodeMetaContextReply(id, n)),
  };
  const parsers: [string, (b: Uint8Array) => unknown, fc.Arbitrary<Uint8Array>][] = [
    ['greeting', p.parseGreeting, valid.greeting],
    ['client flags', p.parseClientFlags, fc.constant(Buffer.alloc(4))],
    ['option header', p.parseOptionHeader, valid.optionHeader],
    ['INFO/GO data', p.parseExportRequest, valid.exportRequest],
    ['meta context data', p.parseMetaContextRequest, valid.metaRequest],
    ['option reply header', p.parseOptionReplyHeader, valid.replyHeader],
    ['info reply', p.parseInfoReply, valid.info],
    ['server reply', p.parseServerReply, valid.server],
    ['meta context reply', p.parseMetaContextReply, valid.meta],
    ['export name reply', p.parseExportNameReply, fc.constant(p.encodeExportNameReply(1, 1, true))],
  ];
  for (const [what, parse, good] of parsers) {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 64 }), (b) => clean(() => parse(b))), { numRuns: RUNS });
    fc.assert(fc.property(mutated(good), (b) => clean(() => parse(b))), { numRuns: RUNS });
    t.pass(`${what}: only clean errors`);
  }
  // Lengths that claim more than the data holds are refused, not read past.
  t.throws(() => p.parseExportRequest(Buffer.from([0xff, 0xff, 0xff, 0xff])), { code: 'ERR_NBD_PROTOCOL' });
  t.throws(() => p.parseMetaContextRequest(Buffer.from([0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff])), { code: 'ERR_NBD_PROTOCOL' });
});

t.test('fuzz: transmission parsers and the reply decoder', async (t) => {
  fc.assert(fc.property(fc.uint8Array({ maxLength: 40 }), (b) => clean(() => p.parseRequestHeader(b))), { numRuns: RUNS });
  const payloadParsers: [string, (b: Buffer) => unknown][] = [
    ['OFFSET_DATA', p.parseOffsetData],
    ['OFFSET_HOLE', p.parseOffsetHole],
    ['BLOCK_STATUS', p.parseBlockStatus],
    ['ERROR', (b) => p.parseErrorChunk(p.NBD_REPLY_TYPE_ERROR, b)],
    ['ERROR_OFFSET', (b) => p.parseErrorChunk(p.NBD_REPLY_TYPE_ERROR_OFFSET, b)],
  ];
  for (const [what, parse] of payloadParsers) {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 80 }), (b) => clean(() => parse(Buffer.from(b)))), { numRuns: RUNS });
    t.pass(`${what} payload: only clean errors`);
  }
  // Random streams, and valid streams with bytes flipped: the decoder yields replies or fails cleanly, and stays failed.
  const valid = fc.array(fc.oneof(
    u64.map((c) => p.encodeSimpleReply(c, 5)),
    u64.map((c) => p.encodeHoleChunk(1, c, 0, 512)),
    u64.map((c) => Buffer.concat([p.encodeOffsetDataHeader(1, c, 0, 4), Buffer.from('abcd')])),
    u64.map((c) => p.encodeBlockStatusChunk(1, c, 0, [{ length: 1, flags: 3 }])),
  ), { minLength: 1, maxLength: 6 }).map((parts) => Buffer.concat(parts));
  fc.assert(fc.property(fc.oneof(fc.uint8Array({ maxLength: 200 }), mutated(valid)), fc.nat({ max: 200 }), (bytes, cut) => {
    const dec = new p.ReplyDecoder({ simpleDataBytes: (c) => (c % 3n === 0n ? undefined : Number(c % 7n)), maxChunkBytes: 4096 });
    let failed = false;
    for (const piece of [bytes.subarray(0, cut), bytes.subarray(cut)]) {
      dec.push(piece);
      if (!clean(() => { for (let r = dec.next(); r; r = dec.next()); })) return false;
      try {
        dec.next();
      } catch {
        failed = true;
      }
      if (failed && clean(() => dec.next())) {
        try {
          dec.next();
          return false; // a failed decoder must keep failing
        } catch {
          // expected
        }
      }
    }
    return true;
  }), { numRuns: RUNS * 2 });
  t.pass('reply decoder: only clean errors');
});

t.test('ByteQueue takes across chunk boundaries', async (t) => {
  fc.assert(fc.property(fc.array(fc.uint8Array({ maxLength: 20 }), { maxLength: 10 }), fc.array(fc.nat({ max: 25 }), { maxLength: 10 }), (chunks, takes) => {
    const q = new p.ByteQueue();
    for (const c of chunks) q.push(c);
    const all = Buffer.concat(chunks);
    let at = 0;
    for (const n of takes) {
      if (n > q.length) continue;
      if (!q.take(n).equals(all.subarray(at, at + n))) return false;
      at += n;
    }
    return q.length === all.length - at;
  }), { numRuns: RUNS });
  t.pass();
});
