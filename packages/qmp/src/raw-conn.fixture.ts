import net from 'node:net';
import { JsonMessageStream } from './json-stream.js';
import type { Logger } from '@shear/base';

/**
 * Test helper: a connection that writes raw bytes and reads whole lines (QMP output is one
 * message per CRLF-terminated line), keeping the raw text too, so tests can check the exact
 * bytes a server sends. Works against Shear and qemu-storage-daemon alike.
 */
export class RawConn {
  readonly socket: net.Socket;
  readonly lines: string[] = [];
  #buf = '';
  #waiters: Array<() => void> = [];
  #closed = false;
  readonly closed: Promise<void>;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.setEncoding('latin1');
    socket.on('data', (s: string) => {
      this.#buf += s;
      let nl: number;
      while ((nl = this.#buf.indexOf('\r\n')) >= 0) {
        this.lines.push(this.#buf.slice(0, nl));
        this.#buf = this.#buf.slice(nl + 2);
      }
      this.#wake();
    });
    socket.on('error', () => {});
    this.closed = new Promise((resolve) =>
      socket.once('close', () => {
        this.#closed = true;
        this.#wake();
        resolve();
      }),
    );
  }

  static connect(target: string | { port: number; host?: string }): Promise<RawConn> {
    const socket = typeof target === 'string' ? net.connect(target) : net.connect(target.port, target.host ?? '127.0.0.1');
    return new Promise((resolve, reject) => {
      socket.once('error', reject);
      socket.once('connect', () => {
        socket.off('error', reject);
        resolve(new RawConn(socket));
      });
    });
  }

  get isClosed(): boolean {
    return this.#closed;
  }

  #wake(): void {
    const w = this.#waiters;
    this.#waiters = [];
    for (const fn of w) fn();
  }

  send(data: string | Uint8Array): void {
    this.socket.write(typeof data === 'string' ? Buffer.from(data, 'latin1') : data);
  }

  /** The next line as raw text; rejects if the connection closes first. */
  async nextLine(): Promise<string> {
    while (this.lines.length === 0) {
      if (this.#closed) throw new Error(`connection closed while waiting for a line (partial: ${JSON.stringify(this.#buf)})`);
      await new Promise<void>((r) => this.#waiters.push(r));
    }
    return this.lines.shift() as string;
  }

  /** The next message, parsed (with big integers kept exact). */
  async next(): Promise<Record<string, unknown>> {
    return parseLine(await this.nextLine());
  }

  /** Messages up to and including the first one for which `last` holds. */
  async until(last: (msg: Record<string, unknown>) => boolean): Promise<Array<Record<string, unknown>>> {
    const out: Array<Record<string, unknown>> = [];
    for (;;) {
      const msg = await this.next();
      out.push(msg);
      if (last(msg)) return out;
    }
  }

  async close(): Promise<void> {
    this.socket.end();
    this.socket.destroySoon();
    await this.closed;
  }
}

export function parseLine(line: string): Record<string, unknown> {
  const items = new JsonMessageStream().feed(Buffer.from(line, 'latin1'));
  const first = items[0];
  if (items.length !== 1 || first?.kind !== 'value') throw new Error(`not one JSON message: ${line}`);
  return first.value as Record<string, unknown>;
}

/** A logger that records what it is given. */
export function recordingLogger(): Logger & { records: Array<{ level: string; obj: object; msg?: string }> } {
  const records: Array<{ level: string; obj: object; msg?: string }> = [];
  const make = (bindings: object): Logger => ({
    debug: (obj, msg) => void records.push({ level: 'debug', obj: { ...bindings, ...obj }, msg }),
    info: (obj, msg) => void records.push({ level: 'info', obj: { ...bindings, ...obj }, msg }),
    warn: (obj, msg) => void records.push({ level: 'warn', obj: { ...bindings, ...obj }, msg }),
    error: (obj, msg) => void records.push({ level: 'error', obj: { ...bindings, ...obj }, msg }),
    child: (more) => make({ ...bindings, ...more }),
  });
  return Object.assign(make({}), { records });
}

/** Resolves once `cond()` holds, checking after each turn of the event loop. */
export async function until(cond: () => boolean): Promise<void> {
  while (!cond()) await new Promise((r) => setImmediate(r));
}

export interface Deferred<T = void> {
  readonly promise: Promise<T>;
  resolve(value: T): void;
}

export function deferred<T = void>(): Deferred<T> {
  let resolve!: (value: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}
