import { EventEmitter } from 'node:events';
import net from 'node:net';
import { ShearError } from '@shear/base';
import { JsonMessageStream } from './json-stream.js';
import { toQmpJson } from './json-writer.js';

/** A UNIX socket path, or a TCP endpoint. */
export type QmpTarget = string | { path: string } | { host?: string; port: number };

export interface QmpGreeting {
  QMP: { version: { qemu: { micro: number; minor: number; major: number }; package: string }; capabilities: string[] };
}

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

export interface QmpClientOptions {
  /** Send qmp_capabilities right after the greeting (default true). */
  negotiate?: boolean;
  /** Limit for connecting and reading the greeting (default 10 s). */
  timeoutMs?: number;
}

/** An error reply: `qmpClass` and `desc` are the reply's `class` and `desc`. */
export class QmpCommandError extends ShearError {
  /** One of QMP_ERROR_CLASSES from a conforming server; kept as sent otherwise. */
  readonly qmpClass: string;
  readonly desc: string;
  readonly command: string;

  constructor(command: string, qmpClass: string, desc: string) {
    super('ERR_QMP_ERROR_REPLY', `Cannot execute QMP command '${command}': ${desc}`);
    this.name = 'QmpCommandError';
    this.command = command;
    this.qmpClass = qmpClass;
    this.desc = desc;
  }
}

interface Pending {
  command: string;
  resolve(value: unknown): void;
  reject(err: unknown): void;
}

const CLIENT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;

function disconnected(): ShearError {
  return new ShearError('ERR_QMP_DISCONNECTED', 'Cannot execute QMP command: the connection is closed');
}

/**
 * A QMP client for tests and tools. Commands may be pipelined: each gets its own id and
 * replies are matched by id. Events arrive as 'event' emissions, through events(), or through
 * waitEvent(). Other emissions: 'unmatched' (a reply without a known id, e.g. the error for
 * malformed input sent with sendRaw), 'protocol-error' (the server sent something that is not
 * JSON), 'close'.
 *
 * Ownership: the client owns its socket; close() ends it and rejects pending commands.
 */
export class QmpClient extends EventEmitter {
  readonly #socket: net.Socket;
  readonly #stream = new JsonMessageStream({ maxMessageBytes: CLIENT_MAX_MESSAGE_BYTES, maxTokens: CLIENT_MAX_MESSAGE_BYTES });
  readonly #pending = new Map<number, Pending>();
  #nextId = 1;
  #greeting: QmpGreeting | undefined;
  #onGreeting: ((g: QmpGreeting | Error) => void) | undefined;
  #closed = false;
  readonly #closedPromise: Promise<void>;

  private constructor(socket: net.Socket) {
    super();
    this.#socket = socket;
    this.#closedPromise = new Promise((done) => socket.once('close', () => done()));
    socket.on('data', (chunk: Buffer) => this.#onData(chunk));
    socket.on('error', () => {
      // 'close' follows and rejects what is pending.
    });
    socket.on('close', () => this.#onClose());
  }

  /** Connects, reads the greeting and (unless negotiate is false) negotiates capabilities. */
  static async connect(target: QmpTarget, opts: QmpClientOptions = {}): Promise<QmpClient> {
    const socket =
      typeof target === 'string' ? net.connect(target)
      : 'path' in target ? net.connect(target.path)
      : net.connect(target.port, target.host ?? '127.0.0.1');
    const client = new QmpClient(socket);
    let timer: NodeJS.Timeout | undefined;
    try {
      await new Promise<void>((resolve, reject) => {
        timer = setTimeout(
          () => reject(new ShearError('ERR_TIMEOUT', 'Cannot connect to QMP server: no greeting in time')),
          opts.timeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS,
        );
        socket.once('error', (err) => reject(new ShearError('ERR_QMP_DISCONNECTED', `Cannot connect to QMP server: ${err.message}`, {}, { cause: err })));
        client.#onGreeting = (g) => (g instanceof Error ? reject(g) : resolve());
      });
    } catch (err) {
      socket.destroy();
      throw err;
    } finally {
      clearTimeout(timer);
    }
    if (opts.negotiate ?? true) {
      try {
        await client.execute('qmp_capabilities');
      } catch (err) {
        socket.destroy();
        throw err;
      }
    }
    return client;
  }

  get greeting(): QmpGreeting {
    return this.#greeting as QmpGreeting;
  }

  get isClosed(): boolean {
    return this.#closed;
  }

  /**
   * Runs a command; resolves with its `return` value.
   *
   * @throws QmpCommandError for an error reply, ERR_QMP_DISCONNECTED when the connection closes
   *   first, ERR_ABORTED when `signal` fires first (the reply is then ignored)
   */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: { signal?: AbortSignal } = {}): Promise<T> {
    if (this.#closed) return Promise.reject(disconnected());
    const id = this.#nextId++;
    return new Promise<T>((resolve, reject) => {
      const signal = opts.signal;
      const onAbort = (): void => {
        this.#pending.delete(id);
        reject(new ShearError('ERR_ABORTED', `Cannot wait for QMP command '${command}': it was cancelled`, {}, { cause: signal?.reason }));
      };
      if (signal?.aborted) return onAbort();
      signal?.addEventListener('abort', onAbort, { once: true });
      this.#pending.set(id, {
        command,
        resolve: (v) => {
          signal?.removeEventListener('abort', onAbort);
          resolve(v as T);
        },
        reject: (e) => {
          signal?.removeEventListener('abort', onAbort);
          reject(e);
        },
      });
      const msg = args === undefined ? { execute: command, id } : { execute: command, arguments: args, id };
      this.#socket.write(toQmpJson(msg));
    });
  }

  /** Writes bytes as they are (for protocol tests); replies to them arrive as 'unmatched'. */
  sendRaw(data: string | Uint8Array): void {
    this.#socket.write(data);
  }

  /**
   * Resolves with the next event called `name` whose data satisfies `predicate`. Only events
   * arriving after the call count: start waiting before running the command that causes it.
   *
   * @throws ERR_TIMEOUT after timeoutMs, ERR_QMP_DISCONNECTED, ERR_ABORTED
   */
  waitEvent(
    name: string,
    predicate: (data: Record<string, unknown>) => boolean = () => true,
    opts: { timeoutMs?: number; signal?: AbortSignal } = {},
  ): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const cleanup = (): void => {
        clearTimeout(timer);
        this.off('event', onEvent);
        this.off('close', onClose);
        opts.signal?.removeEventListener('abort', onAbort);
      };
      const onEvent = (ev: QmpEvent): void => {
        if (ev.event !== name) return;
        let ok: boolean;
        try {
          ok = predicate(ev.data ?? {});
        } catch (err) {
          cleanup();
          reject(err);
          return;
        }
        if (!ok) return;
        cleanup();
        resolve(ev);
      };
      const onClose = (): void => {
        cleanup();
        reject(new ShearError('ERR_QMP_DISCONNECTED', `Cannot wait for QMP event ${name}: the connection is closed`));
      };
      const onAbort = (): void => {
        cleanup();
        reject(new ShearError('ERR_ABORTED', `Cannot wait for QMP event ${name}: it was cancelled`, {}, { cause: opts.signal?.reason }));
      };
      if (this.#closed) return onClose();
      if (opts.signal?.aborted) return onAbort();
      this.on('event', onEvent);
      this.on('close', onClose);
      opts.signal?.addEventListener('abort', onAbort, { once: true });
      if (opts.timeoutMs !== undefined) {
        timer = setTimeout(() => {
          cleanup();
          reject(new ShearError('ERR_TIMEOUT', `Cannot wait for QMP event ${name}: none within ${opts.timeoutMs} ms`));
        }, opts.timeoutMs);
      }
    });
  }

  /** Events from now on, in order, until the connection closes or the iteration is left. */
  events(): AsyncIterableIterator<QmpEvent> {
    const buffered: QmpEvent[] = [];
    let wake: (() => void) | undefined;
    let done = this.#closed;
    const onEvent = (ev: QmpEvent): void => {
      buffered.push(ev);
      wake?.();
    };
    const onClose = (): void => {
      done = true;
      wake?.();
    };
    const stop = (): void => {
      done = true;
      this.off('event', onEvent);
      this.off('close', onClose);
      wake?.();
    };
    this.on('event', onEvent);
    this.on('close', onClose);
    const iterator: AsyncIterableIterator<QmpEvent> = {
      next: async () => {
        while (buffered.length === 0 && !done) await new Promise<void>((r) => (wake = r));
        wake = undefined;
        const ev = buffered.shift();
        if (ev) return { value: ev, done: false };
        stop();
        return { value: undefined, done: true };
      },
      return: async () => {
        stop();
        return { value: undefined, done: true };
      },
      [Symbol.asyncIterator]: () => iterator,
    };
    return iterator;
  }

  /** Closes the connection; pending commands reject with ERR_QMP_DISCONNECTED. */
  async close(): Promise<void> {
    if (!this.#socket.destroyed) this.#socket.end();
    const timer = setTimeout(() => this.#socket.destroy(), 1000);
    await this.#closedPromise;
    clearTimeout(timer);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  #onData(chunk: Buffer): void {
    for (const item of this.#stream.feed(chunk)) {
      if (item.kind !== 'value') {
        this.emit('protocol-error', new ShearError('ERR_QMP_PROTOCOL', `Cannot read QMP reply: ${item.message}`));
        if (item.kind === 'fatal') this.#socket.destroy();
        continue;
      }
      this.#message(item.value);
    }
  }

  #message(value: unknown): void {
    if (typeof value !== 'object' || value === null || Array.isArray(value)) {
      this.emit('protocol-error', new ShearError('ERR_QMP_PROTOCOL', 'Cannot read QMP reply: it is not a JSON object'));
      return;
    }
    const msg = value as Record<string, unknown>;
    if (this.#greeting === undefined) {
      if (typeof msg['QMP'] === 'object' && msg['QMP'] !== null) {
        this.#greeting = msg as unknown as QmpGreeting;
        this.#onGreeting?.(this.#greeting);
      } else {
        this.#onGreeting?.(new ShearError('ERR_QMP_PROTOCOL', 'Cannot connect to QMP server: the first message is not a greeting'));
      }
      this.#onGreeting = undefined;
      return;
    }
    if (typeof msg['event'] === 'string') {
      this.emit('event', msg as unknown as QmpEvent);
      return;
    }
    const id = msg['id'];
    const pending = typeof id === 'number' ? this.#pending.get(id) : undefined;
    if (!pending) {
      this.emit('unmatched', msg);
      return;
    }
    this.#pending.delete(id as number);
    if (Object.hasOwn(msg, 'return')) {
      pending.resolve(msg['return']);
      return;
    }
    const error = msg['error'] as { class?: unknown; desc?: unknown } | undefined;
    pending.reject(new QmpCommandError(pending.command, String(error?.class ?? 'GenericError'), String(error?.desc ?? '')));
  }

  #onClose(): void {
    this.#closed = true;
    this.#onGreeting?.(new ShearError('ERR_QMP_DISCONNECTED', 'Cannot connect to QMP server: it closed the connection'));
    this.#onGreeting = undefined;
    const err = disconnected();
    for (const p of this.#pending.values()) p.reject(err);
    this.#pending.clear();
    this.emit('close');
  }
}
