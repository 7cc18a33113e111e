import type { CampaignContext } from './context.js';
import { EXPORTS } from './env.js';
import { bump } from './findings.js';
import { Eof, exportRequest, IHAVEOPT, metaRequest, NBDMAGIC, optionHeader, REP_MAGIC, Timeout, u32, within, WireConn } from './nbd-wire.js';
import { bindAndProbe } from './nbd-transmission.js';
import type { Prng } from './prng.js';

const ACK = 1;
const SERVER = 2;
const INFO = 3;
const META = 4;
const ERR = 0x80000000;
const ERR_UNSUP = ERR + 1;
const ERR_POLICY = ERR + 2;
const ERR_INVALID = ERR + 3;
const ERR_UNKNOWN = ERR + 6;
const ERR_TOO_BIG = ERR + 9;
const REPLY_NAMES: Record<number, string> = { [ERR_UNSUP]: 'ERR_UNSUP', [ERR_POLICY]: 'ERR_POLICY', [ERR_INVALID]: 'ERR_INVALID', [ERR + 4]: 'ERR_PLATFORM', [ERR + 5]: 'ERR_TLS_REQD', [ERR_UNKNOWN]: 'ERR_UNKNOWN', [ERR + 7]: 'ERR_SHUTDOWN', [ERR + 8]: 'ERR_BLOCK_SIZE_REQD', [ERR_TOO_BIG]: 'ERR_TOO_BIG' };

const OPT_EXPORT_NAME = 1;
const OPT_ABORT = 2;
const OPT_LIST = 3;
const OPT_STARTTLS = 5;
const OPT_INFO = 6;
const OPT_GO = 7;
const OPT_STRUCTURED_REPLY = 8;
const OPT_LIST_META = 9;
const OPT_SET_META = 10;
/** Options the spec names that Shear does not implement, and a few that no one does. */
const UNSUPPORTED = [4, 11, 12, 13, 0, 0x7fffffff, 0x80000000, 0xffffffff];
const MAX_OPTION_BYTES = 1024 * 1024;
/** The daemon's handshake deadline (DEFAULT_HANDSHAKE_TIMEOUT_MS). */
const HANDSHAKE_LIMIT_MS = 10_000;
const MAX_STRING = 4096;

/**
 * An export or meta-context request (`good`: name length, name, then a count and its items)
 * broken by `shape`: 6 truncated, 7 with bytes appended, 8 a wrong name length, otherwise a
 * wrong item count (written by `badCount`). Draws from `r` in the same order for both options.
 */
function malformed(r: Prng, good: Buffer, shape: number, nameLength: number, badCount: (b: Buffer) => void): Buffer {
  if (shape === 6) return good.subarray(0, r.int(good.length));
  if (shape === 7) return Buffer.concat([good, r.bytes(r.range(1, 9))]);
  const b = Buffer.from(good);
  if (shape === 8) b.writeUInt32BE(r.chance(0.5) ? 0xffffffff : nameLength + r.range(1, 40), 0);
  else badCount(b);
  return b;
}
const NAMES = Object.values(EXPORTS).map((e) => e.name as string);

/** What the spec lets the server answer to one option. */
type Expect =
  | { kind: 'close' }
  /** Replies ending in ACK (success) or in one of these errors. */
  | { kind: 'reply'; ok: boolean; errors: number[]; bind?: string }
  /** The EXPORT_NAME reply, then transmission. */
  | { kind: 'export-name'; name: string }
  /** The input stops part-way and the client hangs up: nothing to check but the server's health. */
  | { kind: 'abort' };

interface Step {
  kind: string;
  option: number;
  bytes: Buffer;
  expect: Expect;
}

interface State {
  fixed: boolean;
  noZeroes: boolean;
  structured: boolean;
}

function validUtf8(b: Buffer): boolean {
  try {
    new TextDecoder('utf-8', { fatal: true }).decode(b);
    return true;
  } catch {
    return false;
  }
}

/**
 * The server's expected answer to a name: known, unknown, or not a valid name at all. The
 * empty name may exist or not: accepted QMP inputs can add an export named "" (QEMU allows it).
 */
function nameOutcome(name: Buffer): { known: string | undefined; maybe?: boolean; errors: number[] } {
  const s = name.toString('utf8');
  if (s === '') return { known: undefined, maybe: true, errors: [ERR_UNKNOWN] };
  if (!validUtf8(name) || name.length > MAX_STRING || name.includes(0)) return { known: undefined, errors: [ERR_INVALID, ERR_UNKNOWN, ERR_TOO_BIG] };
  return NAMES.includes(s) ? { known: s, errors: [] } : { known: undefined, errors: [ERR_UNKNOWN] };
}

class StepGen {
  readonly #r: Prng;
  constructor(r: Prng) {
    this.#r = r;
  }

  name(): Buffer {
    const r = this.#r;
    switch (r.int(10)) {
      case 0:
        return Buffer.from('');
      case 1:
        return Buffer.from('nope');
      case 2:
        return Buffer.from('x'.repeat(r.range(4000, 5000)));
      case 3:
        return Buffer.of(0xc3, 0x28, 0x6c);
      case 4:
        return Buffer.from(r.pick(NAMES) + '\0');
      default:
        return Buffer.from(r.pick(NAMES));
    }
  }

  query(): Buffer {
    const r = this.#r;
    return Buffer.from(
      r.pick<string | Buffer>([
        'base:allocation', 'base:allocation', 'qemu:dirty-bitmap:b0', 'qemu:dirty-bitmap:b0', 'qemu:dirty-bitmap:', 'qemu:dirty-bitmap:nope', 'qemu:', 'base:', 'qemu:allocation-depth',
        'unknown:x', '', 'base:allocation\0', 'x'.repeat(r.range(4090, 4200)), Buffer.of(0x62, 0x61, 0xff), 'QEMU:dirty-bitmap:b0', 'base:allocation:extra',
      ]),
    );
  }

  /** One option, well-formed or not, and what the server must answer in state s. */
  next(s: State): Step {
    const r = this.#r;
    const p = r.int(100);
    let option: number;
    let payload: Buffer;
    let expect: Expect;
    let kind: string;
    if (p < 8) {
      option = OPT_LIST;
      kind = 'list';
      payload = r.chance(0.8) ? Buffer.alloc(0) : r.bytes(r.range(1, 16));
      expect = { kind: 'reply', ok: payload.length === 0, errors: payload.length === 0 ? [] : [ERR_INVALID] };
    } else if (p < 20) {
      option = OPT_STRUCTURED_REPLY;
      kind = 'structured-reply';
      payload = r.chance(0.85) ? Buffer.alloc(0) : r.bytes(r.range(1, 8));
      expect = payload.length ? { kind: 'reply', ok: false, errors: [ERR_INVALID] } : { kind: 'reply', ok: true, errors: s.structured ? [ERR_INVALID] : [] };
    } else if (p < 45) {
      option = r.chance(0.5) ? OPT_INFO : OPT_GO;
      kind = option === OPT_GO ? 'go' : 'info';
      const name = this.name();
      const infos = Array.from({ length: r.int(5) }, () => (r.chance(0.8) ? r.int(4) : r.int(65536)));
      const shape = r.int(10);
      if (shape < 6) {
        payload = exportRequest(name, infos);
        const o = nameOutcome(name);
        expect = { kind: 'reply', ok: o.known !== undefined || o.maybe === true, errors: o.errors, bind: option === OPT_GO ? (o.known ?? (o.maybe ? '' : undefined)) : undefined };
      } else {
        // Malformed: the lengths inside disagree with the option's length.
        payload = malformed(r, exportRequest(name, infos), shape, name.length, (b) => b.writeUInt16BE((infos.length + r.range(1, 5)) & 0xffff, 4 + name.length));
        // A longer name length can, rarely, still frame a valid request for another name.
        expect = { kind: 'reply', ok: false, errors: shape === 8 ? [ERR_INVALID, ERR_UNKNOWN] : [ERR_INVALID] };
      }
    } else if (p < 70) {
      option = r.chance(0.5) ? OPT_SET_META : OPT_LIST_META;
      kind = option === OPT_SET_META ? 'set-meta-context' : 'list-meta-context';
      const name = this.name();
      const queries = Array.from({ length: r.int(4) }, () => this.query());
      const good = metaRequest(name, queries);
      const shape = r.int(10);
      const o = nameOutcome(name);
      const badQuery = queries.some((q) => !validUtf8(q) || q.length > MAX_STRING || q.includes(0));
      if (shape < 6) {
        payload = good;
        if (!s.structured) expect = { kind: 'reply', ok: false, errors: [ERR_INVALID] };
        else if (o.known === undefined) expect = { kind: 'reply', ok: o.maybe === true, errors: badQuery ? [...o.errors, ERR_INVALID, ERR_TOO_BIG] : o.errors };
        else expect = { kind: 'reply', ok: true, errors: badQuery ? [ERR_INVALID, ERR_TOO_BIG] : [] };
      } else {
        payload = malformed(r, good, shape, name.length, (b) => b.writeUInt32BE(queries.length + r.range(1, 1000), 4 + name.length));
        expect = { kind: 'reply', ok: false, errors: shape === 8 ? [ERR_INVALID, ERR_UNKNOWN] : [ERR_INVALID] };
      }
    } else if (p < 76) {
      option = OPT_STARTTLS;
      kind = 'starttls';
      payload = r.chance(0.8) ? Buffer.alloc(0) : r.bytes(4);
      expect = { kind: 'reply', ok: false, errors: payload.length ? [ERR_INVALID] : [ERR_POLICY, ERR_UNSUP] };
    } else if (p < 86) {
      option = r.pick(UNSUPPORTED);
      if (r.chance(0.5)) option = r.u32();
      kind = 'unknown-option';
      payload = r.bytes(r.int(64));
      const known = [OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META];
      if (known.includes(option)) option = 0xfffffff0;
      expect = { kind: 'reply', ok: false, errors: [ERR_UNSUP] };
    } else if (p < 89) {
      option = OPT_ABORT;
      kind = 'abort';
      payload = r.chance(0.9) ? Buffer.alloc(0) : r.bytes(4);
      expect = { kind: 'reply', ok: true, errors: [ERR_INVALID] };
    } else if (p < 92) {
      option = OPT_EXPORT_NAME;
      kind = 'export-name';
      payload = this.name();
      const o = nameOutcome(payload);
      expect = o.known !== undefined ? { kind: 'export-name', name: o.known } : o.maybe ? { kind: 'abort' } : { kind: 'close' };
    } else if (p < 95) {
      // A header that breaks the framing: the server must hang up.
      option = r.pick([OPT_LIST, OPT_GO, OPT_INFO, 99]);
      kind = 'bad-magic';
      const bytes = Buffer.concat([optionHeader(option, 0, r.chance(0.5) ? r.u64() : IHAVEOPT ^ (1n << BigInt(r.int(64))))]);
      return { kind, option, bytes, expect: { kind: 'close' } };
    } else if (p < 97) {
      option = r.pick([OPT_GO, OPT_INFO, OPT_SET_META, OPT_LIST, 77]);
      kind = 'huge-length';
      return { kind, option, bytes: optionHeader(option, r.range(MAX_OPTION_BYTES + 1, 0xffffffff)), expect: { kind: 'close' } };
    } else {
      // The option's length and its payload disagree: the client gives up part-way.
      option = r.pick([OPT_GO, OPT_INFO, OPT_SET_META, OPT_LIST]);
      kind = 'wrong-length';
      const payloadLen = r.int(40);
      return { kind, option, bytes: Buffer.concat([optionHeader(option, payloadLen + r.range(1, 1000)), r.bytes(payloadLen)]), expect: { kind: 'abort' } };
    }
    // Without fixed newstyle, anything but EXPORT_NAME ends the connection.
    if (!s.fixed && option !== OPT_EXPORT_NAME) expect = { kind: 'close' };
    return { kind, option, bytes: Buffer.concat([optionHeader(option, payload.length), payload]), expect };
  }
}

/** Reads option replies up to the terminal one (ACK or an error); returns its type, or throws. */
async function readReplies(ctx: CampaignContext, c: WireConn, step: Step, st: State): Promise<number> {
  for (let n = 0; n < 1000; n++) {
    const h = await within(c.read(20), ctx.hangMs);
    if (h.readBigUInt64BE(0) !== REP_MAGIC) throw new Violation(`an option reply with bad magic 0x${h.readBigUInt64BE(0).toString(16)}`);
    const option = h.readUInt32BE(8);
    const type = h.readUInt32BE(12);
    const len = h.readUInt32BE(16);
    if (option !== step.option >>> 0) throw new Violation(`an option reply for option ${option} to option ${step.option}`);
    if (len > 64 * 1024) throw new Violation(`an option reply of ${len} bytes`);
    const data = await within(c.read(len), ctx.hangMs);
    if (type === ACK) {
      if (len !== 0) throw new Violation('an ACK with a payload');
      return type;
    }
    if (type & ERR) {
      if (!REPLY_NAMES[type]) throw new Violation(`an unknown error reply 0x${type.toString(16)}`);
      if (!validUtf8(data)) throw new Violation('an error message that is not UTF-8');
      return type;
    }
    if (type === SERVER) {
      if (step.option !== OPT_LIST || len < 4 || data.readUInt32BE(0) > len - 4) throw new Violation('a malformed NBD_REP_SERVER');
    } else if (type === INFO) {
      if (step.option !== OPT_INFO && step.option !== OPT_GO) throw new Violation('NBD_REP_INFO to another option');
      const info = len >= 2 ? data.readUInt16BE(0) : -1;
      const okLen = info === 0 ? len === 12 : info === 3 ? len === 14 : info === 1 || info === 2 ? len >= 2 : false;
      if (!okLen) throw new Violation(`a malformed NBD_REP_INFO (type ${info}, ${len} bytes)`);
      if (info === 0 && (data.readUInt16BE(10) & 1) === 0) throw new Violation('NBD_INFO_EXPORT without NBD_FLAG_HAS_FLAGS');
    } else if (type === META) {
      if ((step.option !== OPT_SET_META && step.option !== OPT_LIST_META) || len < 5 || !st.structured) throw new Violation('a malformed NBD_REP_META_CONTEXT');
      // Any id goes for SET (QEMU gives base:allocation 0); LIST's replies carry none.
      if (step.option === OPT_LIST_META && data.readUInt32BE(0) !== 0) throw new Violation('LIST_META_CONTEXT gave a context id');
    } else {
      throw new Violation(`an unknown option reply type ${type}`);
    }
  }
  throw new Violation('over 1000 replies to one option');
}

export class Violation extends Error {}

/**
 * Handshake inputs: one connection per sequence of options, each option checked against what
 * the spec lets the server answer, a hang-up anywhere, and a bound export probed with a READ.
 */
export async function handshakeLane(ctx: CampaignContext, rng: Prng, budget: number): Promise<void> {
  const gen = new StepGen(rng);
  let left = budget;
  while (left > 0 && !ctx.stopped) {
    let c: WireConn;
    // Before connect(): the server's handshake clock starts at accept, which is after this.
    const connectedAt = Date.now();
    try {
      c = await WireConn.open(ctx.env.nbdSock);
    } catch (err) {
      await ctx.connectFailed('an NBD connect', err);
      continue;
    }
    ctx.stats.connections++;
    const index = ctx.nextIndex();
    let current: Step | undefined;
    try {
      const g = await within(c.read(18), ctx.hangMs);
      if (g.readBigUInt64BE(0) !== NBDMAGIC || g.readBigUInt64BE(8) !== IHAVEOPT || (g.readUInt16BE(16) & 3) !== 3) throw new Violation('a bad greeting');
      const flagsChoice = rng.int(100);
      // A hang-up before or inside the client flags.
      if (flagsChoice < 2) {
        c.write(u32(3).subarray(0, rng.int(4)));
        left--;
        ctx.stats.inputs++;
        bump(ctx.stats.byKind, 'abort-in-flags');
        c.destroy();
        continue;
      }
      const flags = flagsChoice < 90 ? 3 : flagsChoice < 94 ? 1 : flagsChoice < 97 ? 0 : (rng.u32() | 4) >>> 0;
      c.write(u32(flags));
      const st: State = { fixed: (flags & 1) !== 0, noZeroes: (flags & 2) !== 0, structured: false };
      if (flags & ~3) {
        current = { kind: 'unknown-client-flags', option: 0, bytes: u32(flags), expect: { kind: 'close' } };
        left--;
        ctx.stats.inputs++;
        bump(ctx.stats.byKind, current.kind);
        if (!(await c.waitClose(ctx.hangMs))) throw new Violation('the server kept a connection with unknown client flags');
        ctx.stats.expectedCloses++;
        continue;
      }
      let steps = rng.range(1, 12);
      while (steps-- > 0 && left > 0) {
        const step = gen.next(st);
        current = step;
        left--;
        // A hang-up part-way through any option.
        if (rng.chance(0.04)) {
          c.write(step.bytes.subarray(0, rng.int(step.bytes.length)));
          ctx.stats.inputs++;
          bump(ctx.stats.byKind, 'abort-in-option');
          break;
        }
        c.write(step.bytes);
        ctx.stats.inputs++;
        bump(ctx.stats.byKind, step.kind);
        const e = step.expect;
        if (e.kind === 'abort') break;
        if (e.kind === 'close') {
          if (!(await c.waitClose(ctx.hangMs))) throw new Violation(`the server kept the connection after ${step.kind}`);
          ctx.stats.expectedCloses++;
          break;
        }
        if (e.kind === 'export-name') {
          const size = EXPORTS[Object.keys(EXPORTS).find((k) => EXPORTS[k as keyof typeof EXPORTS].name === e.name) as keyof typeof EXPORTS].size;
          const rep = await within(c.read(st.noZeroes ? 10 : 134), ctx.hangMs);
          if (rep.readBigUInt64BE(0) !== BigInt(size)) throw new Violation(`EXPORT_NAME told size ${rep.readBigUInt64BE(0)}`);
          ctx.stats.accepted++;
          await bindAndProbe(ctx, rng, c, e.name, st.structured);
          break;
        }
        const type = await readReplies(ctx, c, step, st);
        bump(ctx.stats.errors, type === ACK ? 'ACK' : REPLY_NAMES[type]!);
        if (type === ACK) {
          if (!e.ok) throw new Violation(`ACK where the spec wants ${e.errors.map((x) => REPLY_NAMES[x]).join('/')} (${step.kind})`);
          ctx.stats.accepted++;
          if (step.option === OPT_STRUCTURED_REPLY) st.structured = true;
          if (step.option === OPT_ABORT) {
            if (!(await c.waitClose(ctx.hangMs))) throw new Violation('the server kept the connection after ABORT');
            ctx.stats.expectedCloses++;
            break;
          }
          if (e.bind !== undefined) {
            await bindAndProbe(ctx, rng, c, e.bind, st.structured);
            break;
          }
        } else if (!e.errors.includes(type)) {
          throw new Violation(`${REPLY_NAMES[type]} where the spec wants ${e.ok ? 'ACK' : ''}${e.errors.map((x) => '/' + REPLY_NAMES[x]).join('')} (${step.kind})`);
        }
      }
    } catch (err) {
      const input = current?.bytes;
      if (err instanceof Violation) ctx.finding({ what: 'violation', detail: `handshake: ${err.message}`, input, index });
      else if (err instanceof Timeout) await ctx.hangFound(input, index, `handshake: no answer to ${current?.kind ?? 'the greeting'}`);
      else if (err instanceof Eof) {
        // The server ends handshakes that take longer than its limit (10 s, as QEMU): on a loaded
        // machine a slow lane can meet it. That is the limit working, not a fault.
        if (Date.now() - connectedAt >= HANDSHAKE_LIMIT_MS) ctx.stats.expectedCloses++;
        else if (await ctx.checkAlive('NBD connection closed')) ctx.finding({ what: 'violation', detail: `handshake: the server closed the connection after ${current?.kind ?? 'the greeting'}`, input, index });
      } else throw err;
    } finally {
      c.destroy();
    }
  }
}
