import type { CampaignContext } from './context.js';
import { EXPORTS, type ExportKey } from './env.js';
import { bump } from './findings.js';
import { Eof, exportRequest, metaRequest, optionHeader, REP_MAGIC, REQ_MAGIC, SIMPLE_MAGIC, STRUCT_MAGIC, Timeout, u32, within, WireConn } from './nbd-wire.js';
import type { Prng } from './prng.js';

const READ = 0;
const WRITE = 1;
const DISC = 2;
const FLUSH = 3;
const TRIM = 4;
const CACHE = 5;
const WRITE_ZEROES = 6;
const BLOCK_STATUS = 7;
const NAMES: Record<number, string> = { 0: 'read', 1: 'write', 2: 'disc', 3: 'flush', 4: 'trim', 5: 'cache', 6: 'write-zeroes', 7: 'block-status' };

const F_FUA = 1;
const F_NO_HOLE = 2;
const F_DF = 4;
const F_REQ_ONE = 8;
const F_FAST_ZERO = 16;

const T_READ_ONLY = 1 << 1;
const T_SEND_DF = 1 << 7;
const T_SEND_FAST_ZERO = 1 << 11;

const EPERM = 1;
const EINVAL = 22;
const ENOSPC = 28;
const ENOTSUP = 95;
const ERRNO: Record<number, string> = { 0: 'OK', 1: 'EPERM', 5: 'EIO', 12: 'ENOMEM', 22: 'EINVAL', 28: 'ENOSPC', 75: 'EOVERFLOW', 95: 'ENOTSUP', 108: 'ESHUTDOWN' };

const MAX_PAYLOAD = 32 * 1024 * 1024;
/** The daemon's handshake deadline (DEFAULT_HANDSHAKE_TIMEOUT_MS). */
const HANDSHAKE_LIMIT_MS = 10_000;
/** Requests in flight per connection (the server reads up to 32 at once). */
const WINDOW = 32;
const U64 = (1n << 64n) - 1n;

export class TxViolation extends Error {}

interface Binding {
  name: string;
  size: number;
  tflags: number;
  structured: boolean;
  contexts: Map<number, string>;
  fleecing: boolean;
}

interface Request {
  flags: number;
  type: number;
  cookie: bigint;
  offset: bigint;
  length: number;
}

interface Pending {
  req: Request;
  bytes: Buffer;
  index: number;
  allowed: Set<number>;
  /** Any non-zero error is right (and success is wrong). */
  anyError: boolean;
  chunks: { flags: number; type: number; payload: Buffer }[];
  resolve: (error: number) => void;
  reject: (e: Error) => void;
}

/**
 * The errors the NBD spec allows for a request, from its header and the negotiated export
 * alone (written from proto.md, independently of the server's request-check.ts).
 */
function allowedErrors(req: Request, b: Binding): { allowed: Set<number>; anyError: boolean } {
  const errs = new Set<number>();
  const known = req.type <= BLOCK_STATUS && req.type !== DISC;
  if (!known) return { allowed: new Set([EINVAL]), anyError: false };
  const writes = req.type === WRITE || req.type === WRITE_ZEROES || req.type === TRIM;
  let okFlags = F_FUA;
  if (req.type === READ && b.tflags & T_SEND_DF) okFlags |= F_DF;
  if (req.type === WRITE_ZEROES) okFlags |= F_NO_HOLE | (b.tflags & T_SEND_FAST_ZERO ? F_FAST_ZERO : 0);
  if (req.type === BLOCK_STATUS) okFlags |= F_REQ_ONE;
  if (req.flags & ~okFlags) errs.add(EINVAL);
  if (writes && b.tflags & T_READ_ONLY) errs.add(EPERM);
  const size = BigInt(b.size);
  if (req.type !== FLUSH && (req.offset > size || BigInt(req.length) > size - req.offset)) {
    errs.add(EINVAL);
    if (req.type === WRITE || req.type === WRITE_ZEROES) errs.add(ENOSPC);
  }
  if (req.type === READ && req.length > MAX_PAYLOAD) errs.add(EINVAL);
  if (req.type === BLOCK_STATUS && (!b.structured || b.contexts.size === 0 || req.length === 0)) errs.add(EINVAL);
  if (errs.size > 0) return { allowed: errs, anyError: false };
  // A valid request: success, or the errors the spec names for what it asked.
  const ok = new Set([0]);
  if (req.type === FLUSH && (req.offset !== 0n || req.length !== 0)) ok.add(EINVAL);
  if (req.type === CACHE) ok.add(EINVAL);
  if (req.type === WRITE_ZEROES && req.flags & F_FAST_ZERO) ok.add(ENOTSUP);
  if (b.fleecing) {
    // A trimmed cluster has left the point-in-time view: reading it fails with EINVAL.
    if (req.type === READ || req.type === BLOCK_STATUS) ok.add(EINVAL);
    // The view is not writable: a WRITE or WRITE_ZEROES must fail (with any error) and change nothing.
    if (req.type === WRITE || req.type === WRITE_ZEROES) return req.length > 0 ? { allowed: new Set(), anyError: true } : { allowed: new Set([0, EPERM, EINVAL]), anyError: false };
  }
  return { allowed: ok, anyError: false };
}

function encode(req: Request, magic = REQ_MAGIC): Buffer {
  const h = Buffer.allocUnsafe(28);
  h.writeUInt32BE(magic >>> 0, 0);
  h.writeUInt16BE(req.flags, 4);
  h.writeUInt16BE(req.type, 6);
  h.writeBigUInt64BE(req.cookie, 8);
  h.writeBigUInt64BE(req.offset, 16);
  h.writeUInt32BE(req.length >>> 0, 24);
  return h;
}

/** Checks a finished structured reply against its request; returns the error it carries (0: success). */
function checkChunks(p: Pending, b: Binding): number {
  const { req, chunks } = p;
  let error = 0;
  const covered: [number, number][] = [];
  const seenContexts = new Set<number>();
  const start = Number(req.offset);
  const end = start + req.length;
  for (const c of chunks) {
    const last = c === chunks[chunks.length - 1];
    if (((c.flags & 1) !== 0) !== last) throw new TxViolation('NBD_REPLY_FLAG_DONE not on the last chunk only');
    if (c.type & 0x8000) {
      if (c.type !== 0x8001 && c.type !== 0x8002) throw new TxViolation(`an unknown error chunk type 0x${c.type.toString(16)}`);
      if (c.payload.length < 6) throw new TxViolation('an error chunk shorter than 6 bytes');
      const e = c.payload.readUInt32BE(0);
      const msg = c.payload.readUInt16BE(4);
      if (e === 0) throw new TxViolation('an error chunk with error 0');
      if (msg > c.payload.length - 6 || c.payload.length !== 6 + msg + (c.type === 0x8002 ? 8 : 0)) throw new TxViolation('an error chunk whose message length does not fit');
      error = e;
      continue;
    }
    switch (c.type) {
      case 0:
        if (!last || c.payload.length !== 0) throw new TxViolation('a NONE chunk that is not a lone final chunk');
        break;
      case 1: {
        if (req.type !== READ || c.payload.length < 9) throw new TxViolation(`an OFFSET_DATA chunk for ${NAMES[req.type]} of ${c.payload.length} bytes`);
        const off = Number(c.payload.readBigUInt64BE(0));
        covered.push([off, off + c.payload.length - 8]);
        break;
      }
      case 2: {
        if (req.type !== READ || c.payload.length !== 12) throw new TxViolation('a malformed OFFSET_HOLE chunk');
        const off = Number(c.payload.readBigUInt64BE(0));
        const len = c.payload.readUInt32BE(8);
        if (len === 0) throw new TxViolation('an OFFSET_HOLE of 0 bytes');
        covered.push([off, off + len]);
        break;
      }
      case 5: {
        if (req.type !== BLOCK_STATUS || c.payload.length < 12 || (c.payload.length - 4) % 8 !== 0) throw new TxViolation('a malformed BLOCK_STATUS chunk');
        const id = c.payload.readUInt32BE(0);
        if (!b.contexts.has(id) || seenContexts.has(id)) throw new TxViolation(`a BLOCK_STATUS chunk for context ${id}`);
        seenContexts.add(id);
        const n = (c.payload.length - 4) / 8;
        if (req.flags & F_REQ_ONE && n !== 1) throw new TxViolation(`REQ_ONE answered with ${n} extents`);
        let sum = 0;
        for (let i = 0; i < n; i++) {
          const len = c.payload.readUInt32BE(4 + 8 * i);
          if (len === 0) throw new TxViolation('an extent of 0 bytes');
          if (sum >= req.length) throw new TxViolation('extents past the requested length');
          sum += len;
        }
        break;
      }
      default:
        throw new TxViolation(`an unexpected chunk type ${c.type}`);
    }
  }
  if (error === 0 && req.type === READ) {
    covered.sort((x, y) => x[0] - y[0]);
    let at = start;
    for (const [s, e] of covered) {
      if (s !== at || e > end) throw new TxViolation(`READ chunks do not tile the request (${s}..${e} at ${at})`);
      at = e;
    }
    if (at !== end && req.length > 0) throw new TxViolation(`READ chunks cover ${at - start} of ${req.length} bytes`);
  }
  if (error === 0 && req.type === BLOCK_STATUS && seenContexts.size !== b.contexts.size) throw new TxViolation('BLOCK_STATUS left out a context');
  return error;
}

/** A bound connection: requests go out, a reader matches replies to them by cookie. */
class TxConn {
  readonly c: WireConn;
  readonly b: Binding;
  readonly pending = new Map<bigint, Pending>();
  readonly #ctx: CampaignContext;
  readonly done: Promise<void>;

  constructor(ctx: CampaignContext, c: WireConn, b: Binding) {
    this.#ctx = ctx;
    this.c = c;
    this.b = b;
    this.done = this.#readLoop();
  }

  send(req: Request, index: number, payload?: Buffer, magic?: number): Promise<number> {
    const bytes = encode(req, magic);
    const { allowed, anyError } = allowedErrors(req, this.b);
    return new Promise<number>((resolve, reject) => {
      this.pending.set(req.cookie, { req, bytes, index, allowed, anyError, chunks: [], resolve, reject });
      this.c.write(bytes);
      if (payload) this.c.write(payload);
    });
  }

  check(p: Pending, error: number): void {
    const stats = this.#ctx.stats;
    bump(stats.errors, ERRNO[error] ?? `errno ${error}`);
    if (error === 0) stats.accepted++;
    const right = p.anyError ? error !== 0 : p.allowed.has(error);
    if (!right) {
      const want = p.anyError ? 'an error' : [...p.allowed].map((e) => ERRNO[e] ?? e).join('/');
      this.#ctx.finding({ what: 'violation', detail: `${NAMES[p.req.type] ?? `command ${p.req.type}`} on ${this.b.name}${this.b.structured ? ' (structured)' : ''} got ${ERRNO[error] ?? error} where the spec wants ${want}`, input: p.bytes, index: p.index });
    }
  }

  async #readLoop(): Promise<void> {
    try {
      for (;;) {
        const magic = (await this.c.read(4)).readUInt32BE(0);
        if (magic === SIMPLE_MAGIC) {
          const h = await this.c.read(12);
          const error = h.readUInt32BE(0);
          const p = this.#take(h.readBigUInt64BE(4));
          if (this.b.structured && (p.req.type === READ || p.req.type === BLOCK_STATUS)) throw new TxViolation(`a simple reply to ${NAMES[p.req.type]} after structured replies were negotiated`);
          if (p.req.type === READ && error === 0 && p.req.length > 0) await this.c.read(p.req.length);
          this.pending.delete(p.req.cookie);
          this.check(p, error);
          p.resolve(error);
        } else if (magic === STRUCT_MAGIC) {
          if (!this.b.structured) throw new TxViolation('a structured reply that was not negotiated');
          const h = await this.c.read(16);
          const p = this.#take(h.readBigUInt64BE(4));
          const len = h.readUInt32BE(12);
          if (len > MAX_PAYLOAD + 64) throw new TxViolation(`a chunk of ${len} bytes`);
          p.chunks.push({ flags: h.readUInt16BE(0), type: h.readUInt16BE(2), payload: await this.c.read(len) });
          if (h.readUInt16BE(0) & 1) {
            this.pending.delete(p.req.cookie);
            try {
              this.check(p, checkChunks(p, this.b));
            } catch (err) {
              if (!(err instanceof TxViolation)) throw err;
              // The framing held: the connection reads on.
              this.#ctx.finding({ what: 'violation', detail: `transmission: ${err.message}`, input: p.bytes, index: p.index });
            }
            p.resolve(0);
          }
        } else {
          throw new TxViolation(`a reply with bad magic 0x${magic.toString(16)}`);
        }
      }
    } catch (err) {
      const first = [...this.pending.values()][0];
      for (const p of this.pending.values()) p.reject(err as Error);
      this.pending.clear();
      if (!(err instanceof Eof)) {
        this.#ctx.finding({ what: 'violation', detail: `transmission: ${(err as Error).message}`, input: first?.bytes, index: first?.index });
        this.c.destroy();
      }
    }
  }

  #take(cookie: bigint): Pending {
    const p = this.pending.get(cookie);
    if (!p) throw new TxViolation(`a reply for cookie ${cookie} that no request has`);
    return p;
  }
}

/** Option haggling of a lane: structured replies and contexts as asked, then GO. */
async function bind(ctx: CampaignContext, key: ExportKey, structured: boolean, queries: string[]): Promise<TxConn> {
  const exp = EXPORTS[key];
  const c = await WireConn.open(ctx.env.nbdSock);
  try {
    await within(c.read(18), ctx.hangMs);
    c.write(u32(3));
    const contexts = new Map<number, string>();
    const reply = async (): Promise<{ type: number; data: Buffer }> => {
      const h = await within(c.read(20), ctx.hangMs);
      if (h.readBigUInt64BE(0) !== REP_MAGIC) throw new TxViolation('bad option reply magic');
      return { type: h.readUInt32BE(12), data: await within(c.read(h.readUInt32BE(16)), ctx.hangMs) };
    };
    if (structured) {
      c.write(optionHeader(8, 0));
      if ((await reply()).type !== 1) throw new TxViolation('STRUCTURED_REPLY refused');
      if (queries.length) {
        const p = metaRequest(Buffer.from(exp.name), queries.map((q) => Buffer.from(q)));
        c.write(Buffer.concat([optionHeader(10, p.length), p]));
        for (let r = await reply(); r.type !== 1; r = await reply()) {
          if (r.type !== 4) throw new TxViolation(`SET_META_CONTEXT answered ${r.type.toString(16)}`);
          contexts.set(r.data.readUInt32BE(0), r.data.subarray(4).toString());
        }
      }
    }
    const p = exportRequest(Buffer.from(exp.name), []);
    c.write(Buffer.concat([optionHeader(7, p.length), p]));
    let tflags = -1;
    for (let r = await reply(); r.type !== 1; r = await reply()) {
      if (r.type !== 3) throw new TxViolation(`GO ${exp.name} answered 0x${r.type.toString(16)}`);
      if (r.data.readUInt16BE(0) === 0) tflags = r.data.readUInt16BE(10);
    }
    if (tflags < 0) throw new TxViolation('GO without NBD_INFO_EXPORT');
    return new TxConn(ctx, c, { name: exp.name, size: exp.size, tflags, structured, contexts, fleecing: exp.fleecing });
  } catch (err) {
    c.destroy();
    throw err;
  }
}

class RequestGen {
  readonly #r: Prng;
  readonly #payload: Buffer;
  constructor(r: Prng) {
    this.#r = r;
    this.#payload = r.bytes(1024 * 1024);
  }

  offset(size: number, length: number): bigint {
    const r = this.#r;
    const s = BigInt(size);
    const l = BigInt(length);
    switch (r.int(14)) {
      case 0:
        return 0n;
      case 1:
        return s > l ? s - l : 0n;
      case 2:
        return s;
      case 3:
        return s + 1n;
      case 4:
        return s - 1n;
      case 5:
        return 1n << 63n;
      case 6:
        return U64;
      case 7:
        return (U64 - l + 1n) & U64; // offset + length wraps to 0 in 64 bits
      case 8:
        return (1n << 53n) + 1n;
      case 9:
        return r.u64();
      default:
        return BigInt(r.int(Math.max(1, size - Math.min(length, size))));
    }
  }

  length(size: number): number {
    const r = this.#r;
    switch (r.int(16)) {
      case 0:
        return 0;
      case 1:
        return 1;
      case 2:
        return size;
      case 3:
        return size + 1;
      case 4:
        return 0xffffffff;
      case 5:
        return MAX_PAYLOAD;
      case 6:
        return MAX_PAYLOAD + 1;
      case 7:
        return r.chance(0.1) ? r.range(1, size) : r.range(1, 1024 * 1024);
      default:
        return r.pick([512, 4096, r.range(1, 4096), r.range(1, 65536)]);
    }
  }

  flags(type: number): number {
    const r = this.#r;
    if (r.chance(0.15)) return r.int(65536);
    if (r.chance(0.1)) return r.pick([F_FUA, F_NO_HOLE, F_DF, F_REQ_ONE, F_FAST_ZERO, 32, 1 << 15]);
    switch (type) {
      case READ:
        return r.chance(0.2) ? F_DF : 0;
      case WRITE:
      case TRIM:
        return r.chance(0.2) ? F_FUA : 0;
      case WRITE_ZEROES:
        return r.pick([0, F_NO_HOLE, F_FAST_ZERO, F_FUA | F_NO_HOLE, F_FAST_ZERO | F_NO_HOLE]);
      case BLOCK_STATUS:
        return r.chance(0.3) ? F_REQ_ONE : 0;
      default:
        return 0;
    }
  }

  type(): number {
    const p = this.#r.int(100);
    if (p < 30) return READ;
    if (p < 45) return WRITE;
    if (p < 50) return FLUSH;
    if (p < 60) return TRIM;
    if (p < 70) return WRITE_ZEROES;
    if (p < 85) return BLOCK_STATUS;
    if (p < 90) return CACHE;
    return this.#r.range(8, 65535);
  }

  /** A payload for a WRITE of `length` bytes (shared bytes: the content does not matter). */
  payload(length: number): Buffer {
    if (length <= this.#payload.length) return this.#payload.subarray(0, length);
    return Buffer.concat(Array.from({ length: Math.ceil(length / this.#payload.length) }, () => this.#payload)).subarray(0, length);
  }
}

const LANES: { key: ExportKey; structured: boolean; queries: string[] }[] = [
  { key: 'live', structured: true, queries: ['base:allocation', 'qemu:allocation-depth'] },
  { key: 'ro', structured: false, queries: [] },
  { key: 'pull', structured: true, queries: ['base:allocation', 'qemu:dirty-bitmap:b0'] },
  { key: 'live', structured: false, queries: [] },
  { key: 'ro', structured: true, queries: [] },
  { key: 'pull', structured: true, queries: ['qemu:dirty-bitmap:b0'] },
];
export const TRANSMISSION_LANES = LANES.length;

/** Transmission inputs on one lane (an export and a reply style), reconnecting after every hang-up. */
export async function transmissionLane(ctx: CampaignContext, rng: Prng, lane: number, budget: number): Promise<void> {
  const { key, structured, queries } = LANES[lane % LANES.length]!;
  const gen = new RequestGen(rng);
  let left = budget;
  let cookie = BigInt(lane) << 56n;
  while (left > 0 && !ctx.stopped) {
    let t: TxConn;
    const bindStarted = Date.now();
    try {
      t = await bind(ctx, key, structured, queries);
    } catch (err) {
      // The server ends a handshake that takes over its 10 s limit; a starved lane can meet it.
      if (err instanceof Eof && Date.now() - bindStarted >= HANDSHAKE_LIMIT_MS) continue;
      if (err instanceof TxViolation) ctx.finding({ what: 'violation', detail: `transmission setup: ${err.message}` });
      else if (err instanceof Timeout) await ctx.hangFound(undefined, undefined, `transmission setup on ${key}: ${err.message}`);
      else await ctx.connectFailed(`binding ${key}`, err);
      continue;
    }
    ctx.stats.connections++;
    const inFlight = new Set<Promise<void>>();
    const track = (req: Request, index: number, p: Promise<number>): void => {
      ctx.stats.inputs++;
      const q = within(p, ctx.hangMs).then(
        () => {},
        async (err) => {
          if (err instanceof Timeout) {
            await ctx.hangFound(encode(req), index, `no reply to ${NAMES[req.type] ?? req.type} on ${key}`);
            t.c.destroy();
          } else if (!(err instanceof Eof) && !(err instanceof TxViolation)) throw err;
        },
      );
      inFlight.add(q);
      void q.finally(() => inFlight.delete(q));
    };
    let perConn = rng.chance(0.2) ? rng.range(1, 30) : rng.range(500, 20000);
    let ending: 'none' | 'close' | 'half' = 'none';
    while (left > 0 && perConn-- > 0 && !t.c.eof && !ctx.stopped) {
      const index = ctx.nextIndex();
      left--;
      const p = rng.int(1000);
      cookie++;
      if (p < 6) {
        // Terminal inputs: the connection ends after them.
        const type = rng.pick([DISC, WRITE, -1, -2, -3]);
        if (type === DISC) {
          // Everything sent before DISC must still be answered.
          const req = { flags: rng.chance(0.3) ? rng.int(65536) : 0, type: DISC, cookie, offset: rng.chance(0.3) ? rng.u64() : 0n, length: rng.chance(0.3) ? rng.u32() : 0 };
          t.c.write(encode(req));
          bump(ctx.stats.byKind, 'disc');
          ending = 'close';
        } else if (type === WRITE) {
          // Over the maximum payload: refused with EINVAL, then the connection closes.
          const req = { flags: 0, type: WRITE, cookie, offset: 0n, length: rng.range(MAX_PAYLOAD + 1, 0xffffffff) };
          track(req, index, t.send(req, index));
          bump(ctx.stats.byKind, 'write-oversize');
          ending = 'close';
        } else if (type === -1) {
          const req = { flags: 0, type: READ, cookie, offset: 0n, length: 512 };
          t.c.write(encode(req, rng.chance(0.5) ? rng.u32() : REQ_MAGIC ^ (1 << rng.int(32))));
          bump(ctx.stats.byKind, 'bad-magic');
          ending = 'close';
        } else if (type === -2) {
          // A WRITE whose payload stops short, then the client hangs up.
          const len = rng.range(2, 65536);
          t.c.write(encode({ flags: 0, type: WRITE, cookie, offset: 0n, length: len }));
          t.c.write(gen.payload(rng.int(len)));
          bump(ctx.stats.byKind, 'short-payload');
          ending = 'half';
        } else {
          t.c.write(encode({ flags: 0, type: READ, cookie, offset: 0n, length: 512 }).subarray(0, rng.range(1, 27)));
          bump(ctx.stats.byKind, 'truncated-header');
          ending = 'half';
        }
        if (type !== WRITE) ctx.stats.inputs++;
        break;
      }
      if (p < 9) {
        // A hang-up with requests in flight.
        bump(ctx.stats.byKind, 'interrupt');
        ctx.stats.inputs++;
        ending = 'none';
        t.c.destroy();
        break;
      }
      const type = gen.type();
      let length = gen.length(EXPORTS[key].size);
      // WRITE payloads are sent whole (the server reads them before it checks bounds): keep them small.
      if (type === WRITE && length > 256 * 1024) length = rng.chance(0.05) ? rng.range(0, 256 * 1024) : rng.range(0, 4096);
      const req: Request = { flags: gen.flags(type), type, cookie, offset: gen.offset(EXPORTS[key].size, length), length };
      bump(ctx.stats.byKind, NAMES[type] ?? 'unknown-command');
      track(req, index, t.send(req, index, type === WRITE ? gen.payload(length) : undefined));
      if (inFlight.size >= WINDOW) await Promise.race(inFlight);
    }
    if (ending === 'half') t.c.socket.end();
    if (ending !== 'none') {
      // The server must answer what it read, then close.
      await Promise.all(inFlight);
      if (!(await t.c.waitClose(ctx.hangMs))) await ctx.hangFound(undefined, undefined, `the server did not close ${key} after a terminal input`);
      else ctx.stats.expectedCloses++;
    } else if (!t.c.eof) {
      t.c.socket.end();
      await Promise.allSettled(inFlight);
    }
    t.c.destroy();
    await t.done;
    // Replies lost to our own hang-up count nowhere; the rest were counted as they came.
    await Promise.allSettled(inFlight);
  }
}

/** After a successful GO or EXPORT_NAME in the handshake lane: one READ, then DISC or a hang-up. */
export async function bindAndProbe(ctx: CampaignContext, rng: Prng, c: WireConn, name: string, structured: boolean): Promise<void> {
  const key = (Object.keys(EXPORTS) as ExportKey[]).find((k) => EXPORTS[k].name === name);
  if (key === undefined) {
    // An export a QMP input added (the empty name): its size is not ours to know, so just leave.
    c.destroy();
    return;
  }
  const t = new TxConn(ctx, c, { name, size: EXPORTS[key].size, tflags: 0, structured, contexts: new Map(), fleecing: EXPORTS[key].fleecing });
  const req: Request = { flags: 0, type: READ, cookie: rng.u64(), offset: BigInt(rng.int(EXPORTS[key].size - 512)), length: 512 };
  try {
    ctx.stats.inputs++;
    bump(ctx.stats.byKind, 'read-after-bind');
    await within(t.send(req, ctx.nextIndex()), ctx.hangMs);
  } catch (err) {
    if (err instanceof Timeout) await ctx.hangFound(encode(req), undefined, `no reply to a READ right after binding ${name}`);
    else if (!(err instanceof Eof) && !(err instanceof TxViolation)) throw err;
  }
  if (rng.chance(0.6)) {
    c.write(encode({ flags: 0, type: DISC, cookie: 0n, offset: 0n, length: 0 }));
    if (!(await c.waitClose(ctx.hangMs))) await ctx.hangFound(undefined, undefined, `the server did not close ${name} after DISC`);
  }
  c.destroy();
  await t.done;
}
