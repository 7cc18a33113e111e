import { connect, type Socket } from 'node:net';
import { once } from 'node:events';
import { SocketReader } from './socket-reader.js';
import type { NbdBoundAddress } from './address.js';

/**
 * A deliberately dumb NBD client for tests: it sends exactly the bytes it is told to (bad ones
 * included) and parses replies with its own code, not the package's codec, so a bug shared by
 * encoder and decoder cannot hide. Every wait has a deadline that fails the test instead of
 * hanging it.
 */

export const IHAVEOPT = 0x49484156454f5054n;
export const REP_MAGIC = 0x3e889045565a9n;
const REQ_MAGIC = 0x25609513;
const SIMPLE = 0x67446698;
const STRUCT = 0x668e33ef;
const WAIT_MS = 5000;

export interface OptReply {
  option: number;
  type: number;
  data: Buffer;
}

export type TxReply =
  | { kind: 'simple'; cookie: bigint; error: number; data?: Buffer }
  | { kind: 'chunks'; cookie: bigint; chunks: Chunk[] };

export interface Chunk {
  flags: number;
  type: number;
  payload: Buffer;
}

export class RawClient {
  readonly socket: Socket;
  readonly reader: SocketReader;
  closedPromise: Promise<void>;
  size = 0;
  tflags = 0;
  contexts = new Map<string, number>();
  structured = false;

  private constructor(socket: Socket) {
    this.socket = socket;
    socket.on('error', () => {});
    this.reader = new SocketReader(socket);
    this.closedPromise = new Promise<void>((resolve) => socket.once('close', () => resolve()));
  }

  static async connect(addr: NbdBoundAddress): Promise<RawClient> {
    const s = addr.type === 'unix' ? connect({ path: addr.path }) : connect({ host: addr.host, port: addr.port });
    const c = new RawClient(s);
    await deadline(once(s, 'connect'), 'connect');
    return c;
  }

  async read(n: number): Promise<Buffer> {
    return deadline(this.reader.read(n), `read ${n} bytes`);
  }

  async greet(clientFlags = 3): Promise<number> {
    const g = await this.read(18);
    this.socket.write(u32(clientFlags));
    return g.readUInt16BE(16);
  }

  sendOpt(option: number, data: Buffer = Buffer.alloc(0), opts: { magic?: bigint; length?: number } = {}): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(opts.magic ?? IHAVEOPT, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(opts.length ?? data.length, 12);
    this.socket.write(Buffer.concat([h, data]));
  }

  async optReply(): Promise<OptReply> {
    const h = await this.read(20);
    if (h.readBigUInt64BE(0) !== REP_MAGIC) throw new Error('bad option reply magic');
    const len = h.readUInt32BE(16);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: len ? await this.read(len) : Buffer.alloc(0) };
  }

  /** Replies up to and including the final one (ACK or an error). */
  async optReplies(): Promise<OptReply[]> {
    const out: OptReply[] = [];
    for (;;) {
      const r = await this.optReply();
      out.push(r);
      if (r.type === 1 || r.type >= 0x80000000) return out;
    }
  }

  async opt(option: number, data?: Buffer): Promise<OptReply[]> {
    this.sendOpt(option, data);
    return this.optReplies();
  }

  /** Greets (if asked), negotiates structured replies and contexts, and GOes. */
  async go(name: string, opts: { structured?: boolean; meta?: string[]; infos?: number[]; greet?: boolean } = {}): Promise<OptReply[]> {
    if (opts.greet !== false) await this.greet();
    if (opts.structured !== false) {
      const r = await this.opt(8);
      this.structured = r[r.length - 1]!.type === 1;
    }
    if (opts.meta) {
      for (const r of await this.opt(10, nameQueries(name, opts.meta))) {
        if (r.type === 4) this.contexts.set(r.data.subarray(4).toString(), r.data.readUInt32BE(0));
      }
    }
    const replies = await this.opt(7, goData(name, opts.infos ?? [3]));
    for (const r of replies) {
      if (r.type === 3 && r.data.readUInt16BE(0) === 0) {
        this.size = Number(r.data.readBigUInt64BE(2));
        this.tflags = r.data.readUInt16BE(10);
      }
    }
    if (replies[replies.length - 1]!.type !== 1) throw new Error(`GO failed: ${replies.map((r) => r.type.toString(16)).join(',')} ${replies[replies.length - 1]!.data}`);
    return replies;
  }

  sendReq(type: number, opts: { flags?: number; cookie?: bigint; offset?: bigint | number; length?: number; payload?: Buffer; magic?: number } = {}): void {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(opts.magic ?? REQ_MAGIC, 0);
    h.writeUInt16BE(opts.flags ?? 0, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(opts.cookie ?? 1n, 8);
    h.writeBigUInt64BE(BigInt(opts.offset ?? 0), 16);
    h.writeUInt32BE(opts.length ?? opts.payload?.length ?? 0, 24);
    this.socket.write(opts.payload ? Buffer.concat([h, opts.payload]) : h);
  }

  /** One whole reply; `readBytes` is the data length a successful simple READ reply carries. */
  async reply(readBytes = 0): Promise<TxReply> {
    const magic = (await this.read(4)).readUInt32BE(0);
    if (magic === SIMPLE) {
      const h = await this.read(12);
      const error = h.readUInt32BE(0);
      const cookie = h.readBigUInt64BE(4);
      if (error === 0 && readBytes > 0) return { kind: 'simple', cookie, error, data: await this.read(readBytes) };
      return { kind: 'simple', cookie, error };
    }
    if (magic !== STRUCT) throw new Error(`bad reply magic 0x${magic.toString(16)}`);
    const chunks: Chunk[] = [];
    let cookie = 0n;
    for (let first = true; ; first = false) {
      if (!first) {
        const m = (await this.read(4)).readUInt32BE(0);
        if (m !== STRUCT) throw new Error(`bad chunk magic 0x${m.toString(16)}`);
      }
      const h = await this.read(16);
      cookie = h.readBigUInt64BE(4);
      const len = h.readUInt32BE(12);
      const chunk = { flags: h.readUInt16BE(0), type: h.readUInt16BE(2), payload: len ? await this.read(len) : Buffer.alloc(0) };
      chunks.push(chunk);
      if (chunk.flags & 1) return { kind: 'chunks', cookie, chunks };
    }
  }

  /** Resolves when the server has closed the connection (fails the caller after a deadline). */
  async closedByServer(): Promise<void> {
    await deadline(this.closedPromise, 'server to close the connection');
  }

  close(): void {
    this.socket.destroy();
  }
}

export function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0, 0);
  return b;
}

export function goData(name: string, infos: number[]): Buffer {
  const n = Buffer.from(name);
  const tail = Buffer.alloc(2 + 2 * infos.length);
  tail.writeUInt16BE(infos.length, 0);
  infos.forEach((x, i) => tail.writeUInt16BE(x, 2 + 2 * i));
  return Buffer.concat([u32(n.length), n, tail]);
}

export function nameQueries(name: string, queries: string[]): Buffer {
  const n = Buffer.from(name);
  return Buffer.concat([u32(n.length), n, u32(queries.length), ...queries.flatMap((q) => [u32(Buffer.byteLength(q)), Buffer.from(q)])]);
}

/** The error value and message of a reply (0 and '' for success). */
export function replyError(r: TxReply): { error: number; message: string } {
  if (r.kind === 'simple') return { error: r.error, message: '' };
  const e = r.chunks.find((c) => c.type >= 0x8000);
  if (!e) return { error: 0, message: '' };
  const len = e.payload.readUInt16BE(4);
  return { error: e.payload.readUInt32BE(0), message: e.payload.subarray(6, 6 + len).toString() };
}

/** Reassembles READ data from a structured reply (holes as zeroes), checking the chunks tile the range. */
export function readData(r: TxReply, offset: number, length: number): Buffer {
  if (r.kind === 'simple') {
    if (r.error) throw new Error(`read failed: ${r.error}`);
    return r.data ?? Buffer.alloc(0);
  }
  const out = Buffer.alloc(length);
  const covered = new Uint8Array(length);
  for (const c of r.chunks) {
    if (c.type === 0) continue;
    if (c.type === 1 || c.type === 2) {
      const off = Number(c.payload.readBigUInt64BE(0)) - offset;
      const len = c.type === 1 ? c.payload.length - 8 : c.payload.readUInt32BE(8);
      if (off < 0 || off + len > length) throw new Error('chunk outside the request');
      for (let i = off; i < off + len; i++) {
        if (covered[i]) throw new Error('overlapping chunks');
        covered[i] = 1;
      }
      if (c.type === 1) c.payload.copy(out, off, 8);
      continue;
    }
    throw new Error(`unexpected chunk type ${c.type}: ${replyError(r).message}`);
  }
  if (covered.includes(0)) throw new Error('chunks do not cover the request');
  return out;
}

/** Block status extents per context id. */
export function statusExtents(r: TxReply): Map<number, [number, number][]> {
  const out = new Map<number, [number, number][]>();
  if (r.kind !== 'chunks') throw new Error('block status needs a structured reply');
  for (const c of r.chunks) {
    if (c.type !== 5) throw new Error(`unexpected chunk type ${c.type}: ${replyError(r).message}`);
    const ext: [number, number][] = [];
    for (let at = 4; at < c.payload.length; at += 8) ext.push([c.payload.readUInt32BE(at), c.payload.readUInt32BE(at + 4)]);
    out.set(c.payload.readUInt32BE(0), ext);
  }
  return out;
}

export async function deadline<T>(p: Promise<T>, what: string, ms = WAIT_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}
