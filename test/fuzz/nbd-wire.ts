import { connect, type Socket } from 'node:net';
import { once } from 'node:events';

/**
 * The campaign's own NBD byte pipe: sends exactly what it is given and reads exact lengths back.
 * It parses with its own code (not @shear/nbd's codec), so a bug shared by the server's encoder
 * and the package's decoder cannot hide.
 */

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const REP_MAGIC = 0x3e889045565a9n;
export const REQ_MAGIC = 0x25609513;
export const SIMPLE_MAGIC = 0x67446698;
export const STRUCT_MAGIC = 0x668e33ef;

export class Eof extends Error {
  constructor() {
    super('the server closed the connection');
  }
}

export class WireConn {
  readonly socket: Socket;
  #chunks: Buffer[] = [];
  #have = 0;
  #waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  #eof = false;
  readonly closed: Promise<void>;

  private constructor(socket: Socket) {
    this.socket = socket;
    socket.on('error', () => {});
    socket.on('data', (c: Buffer) => {
      this.#chunks.push(c);
      this.#have += c.length;
      this.#serve();
    });
    const end = () => {
      this.#eof = true;
      this.#serve();
    };
    socket.on('end', end);
    this.closed = new Promise((resolve) => socket.once('close', () => {
      end();
      resolve();
    }));
  }

  static async open(path: string): Promise<WireConn> {
    const s = connect({ path });
    const c = new WireConn(s);
    await Promise.race([once(s, 'connect'), c.closed.then(() => Promise.reject(new Eof()))]);
    return c;
  }

  get eof(): boolean {
    return this.#eof;
  }

  get buffered(): number {
    return this.#have;
  }

  write(b: Uint8Array): void {
    if (!this.socket.destroyed) this.socket.write(b);
  }

  /** Exactly n bytes; rejects with Eof when the server closes first. */
  read(n: number): Promise<Buffer> {
    if (this.#waiter) throw new Error('one read at a time');
    return new Promise((resolve, reject) => {
      this.#waiter = { n, resolve, reject };
      this.#serve();
    });
  }

  /** Resolves true once the server has closed, false if it has not within ms (bytes it sends meanwhile are dropped). */
  async waitClose(ms: number): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const t = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), ms)));
    const r = await Promise.race([this.closed.then(() => true), t]);
    clearTimeout(timer);
    return r;
  }

  destroy(): void {
    this.socket.destroy();
  }

  #take(n: number): Buffer {
    if (this.#chunks[0]!.length >= n) {
      const first = this.#chunks[0]!;
      const out = first.subarray(0, n);
      if (first.length === n) this.#chunks.shift();
      else this.#chunks[0] = first.subarray(n);
      this.#have -= n;
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let at = 0;
    while (at < n) {
      const c = this.#chunks[0]!;
      const k = Math.min(c.length, n - at);
      c.copy(out, at, 0, k);
      at += k;
      if (k === c.length) this.#chunks.shift();
      else this.#chunks[0] = c.subarray(k);
    }
    this.#have -= n;
    return out;
  }

  #serve(): void {
    const w = this.#waiter;
    if (!w) return;
    if (this.#have >= w.n) {
      this.#waiter = null;
      w.resolve(w.n === 0 ? Buffer.alloc(0) : this.#take(w.n));
    } else if (this.#eof) {
      this.#waiter = null;
      w.reject(new Eof());
    }
  }
}

export class Timeout extends Error {}

/**
 * Rejects with a Timeout after ms. When the timer fires, the reply may already wait in the
 * socket (this process was starved, not the daemon): the verdict waits one turn of the event
 * loop so pending reads run first.
 */
export async function within<T>(p: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  let settled = false;
  const tracked = p.finally(() => (settled = true));
  try {
    return await Promise.race([
      tracked,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => setImmediate(() => setImmediate(() => settled || reject(new Timeout(`no answer within ${ms} ms`)))), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

export function optionHeader(option: number, length: number, magic = IHAVEOPT): Buffer {
  const h = Buffer.alloc(16);
  h.writeBigUInt64BE(magic, 0);
  h.writeUInt32BE(option >>> 0, 8);
  h.writeUInt32BE(length >>> 0, 12);
  return h;
}

export function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}

export function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v & 0xffff);
  return b;
}

/** An INFO/GO payload: name length, name, number of info requests, the requests. */
export function exportRequest(name: Buffer, infos: number[]): Buffer {
  return Buffer.concat([u32(name.length), name, u16(infos.length), ...infos.map(u16)]);
}

/** A LIST/SET_META_CONTEXT payload: name length, name, number of queries, each length + query. */
export function metaRequest(name: Buffer, queries: Buffer[]): Buffer {
  return Buffer.concat([u32(name.length), name, u32(queries.length), ...queries.flatMap((q) => [u32(q.length), q])]);
}
