import type { Socket } from 'node:net';
import { ShearError, type Logger } from '@shear/base';
import { internalErrorDesc, toQmpError, type QmpErrorBody } from './errors.js';
import { JsonMessageStream, type JsonStreamLimits, type StreamItem } from './json-stream.js';
import { toQmpJson } from './json-writer.js';
import type { CommandRegistry, QmpCommand, QmpCommandContext, QmpSessionInfo } from './registry.js';

/** Parsed requests waiting while a command runs; past this the socket stops being read. */
export const MAX_QUEUED_REQUESTS = 8;
/** Replies wait for the client to read once this much output is buffered. */
const WRITE_HIGH_WATER_BYTES = 64 * 1024;

/** What a session needs from its server. */
export interface SessionHost {
  readonly registry: CommandRegistry;
  readonly greetingLine: string;
  readonly limits: Partial<JsonStreamLimits>;
  /** A client that lets this much output pile up (it reads no events) is disconnected. */
  readonly maxOutputBytes: number;
  readonly log: Logger;
  /** Called once the socket is closed and no command of the session is running. */
  sessionEnded(session: QmpSession): void;
}

/**
 * One QMP connection: greeting, capability negotiation, then commands run one after another in
 * arrival order (QEMU runs a monitor's commands in order; without out-of-band there is no
 * overtaking). Every reply and event is written with one socket write, so they never interleave.
 *
 * Ownership: the session owns its socket and destroys it on every path; the command running in
 * it is tracked until it settles, even after the socket is gone, so a server closing can wait.
 */
export class QmpSession implements QmpSessionInfo {
  readonly id: number;
  readonly peer: string;

  readonly #host: SessionHost;
  readonly #socket: Socket;
  readonly #stream: JsonMessageStream;
  readonly #log: Logger;
  readonly #abort = new AbortController();

  #queue: StreamItem[] = [];
  #negotiated = false;
  #pumping = false;
  #paused = false;
  /** No more input is read (fatal input error, shutdown). */
  #stopped = false;
  #socketClosed = false;
  #running: Promise<void> | undefined;
  #ended = false;
  /** Stopped for a server that is closing: no more commands, events still sent. */
  #quiesced = false;
  /** The socket is being ended: nothing more is written. */
  #outputEnded = false;

  constructor(host: SessionHost, socket: Socket, id: number, peer: string) {
    this.#host = host;
    this.#socket = socket;
    this.id = id;
    this.peer = peer;
    this.#stream = new JsonMessageStream(host.limits);
    this.#log = host.log.child({ session: id });
  }

  get negotiated(): boolean {
    return this.#negotiated;
  }

  /** Whether a command of this session is running. */
  get busy(): boolean {
    return this.#running !== undefined;
  }

  /** Leaves capabilities negotiation mode; only qmp_capabilities calls this. */
  completeNegotiation(): void {
    this.#negotiated = true;
  }

  start(): void {
    const socket = this.#socket;
    socket.on('data', (chunk: Buffer) => this.#onData(chunk));
    socket.on('error', (err) => this.#log.debug({ err }, 'qmp socket error'));
    socket.on('close', () => this.#onClose());
    this.#log.info({ peer: this.peer }, 'qmp client connected');
    this.#write(this.#host.greetingLine);
  }

  /** Sends an event line if this session is negotiated; drops a client that reads nothing. */
  sendEvent(line: string): boolean {
    // A quiesced session takes no more commands but still gets events (a job cancelled on quit).
    if (!this.#negotiated || this.#socketClosed || (this.#stopped && !this.#quiesced) || this.#outputEnded) return false;
    if (this.#socket.writableLength > this.#host.maxOutputBytes) {
      this.#log.warn({ bufferedBytes: this.#socket.writableLength }, 'qmp client does not read its output; disconnecting');
      this.#socket.destroy();
      return false;
    }
    this.#write(line);
    return true;
  }

  /**
   * First half of ending the session: reads nothing more, drops queued requests, cancels the
   * running command through its signal and resolves once it settled. Events still go out.
   */
  quiesce(reason: unknown): Promise<void> {
    this.#stop();
    this.#quiesced = true;
    this.#queue = [];
    this.#abort.abort(reason);
    return this.#running ?? Promise.resolve();
  }

  /**
   * Second half: hands what was written to the kernel, then closes the socket. It does not wait
   * for the client to hang up (QEMU exits right after its reply to quit), only for the output to
   * leave, and at most until `deadline` fires (a client that reads nothing).
   */
  async close(deadline: Promise<void>): Promise<void> {
    this.#outputEnded = true;
    if (!this.#socketClosed) {
      // Input the client sent meanwhile is read and dropped: closing with unread input would
      // reset the connection and could cost the client the replies it has not read yet.
      this.#socket.resume();
      const flushed = new Promise<void>((resolve) => {
        if (this.#socket.writableFinished) resolve();
        this.#socket.once('finish', resolve);
        this.#socket.once('close', resolve);
      });
      this.#socket.end();
      await Promise.race([flushed, deadline]);
    }
    this.#socket.destroy();
  }

  #stop(): void {
    this.#stopped = true;
    this.#socket.pause();
  }

  #onData(chunk: Buffer): void {
    if (this.#stopped) return;
    const items = this.#stream.feed(chunk);
    if (this.#stream.isBroken) this.#stop();
    if (items.length === 0) return;
    this.#queue.push(...items);
    if (this.#queue.length >= MAX_QUEUED_REQUESTS && !this.#paused) {
      this.#paused = true;
      this.#socket.pause();
    }
    void this.#pump();
  }

  #onClose(): void {
    this.#socketClosed = true;
    this.#stopped = true;
    this.#queue = [];
    this.#abort.abort(new ShearError('ERR_QMP_DISCONNECTED', 'Cannot finish QMP command: the client disconnected'));
    this.#log.info({}, 'qmp client disconnected');
    this.#maybeEnded();
  }

  #maybeEnded(): void {
    if (this.#ended || !this.#socketClosed || this.#running) return;
    this.#ended = true;
    this.#host.sessionEnded(this);
  }

  #write(line: string): void {
    if (!this.#socketClosed && !this.#outputEnded) this.#socket.write(`${line}\r\n`);
  }

  async #pump(): Promise<void> {
    if (this.#pumping) return;
    this.#pumping = true;
    try {
      while (this.#queue.length > 0 && !this.#socketClosed) {
        const item = this.#queue.shift() as StreamItem;
        if (item.kind === 'fatal') {
          this.#log.warn({ reason: item.message }, 'qmp client sent oversized input; disconnecting');
          this.#queue = [];
          if (!this.#socketClosed) this.#socket.end(`${toQmpJson({ error: this.#errorBody('GenericError', item.message) })}\r\n`, () => this.#socket.destroy());
          break;
        }
        if (item.kind === 'error') this.#write(toQmpJson({ error: this.#errorBody('GenericError', item.message) }));
        else await this.#request(item.value);
        if (this.#paused && !this.#stopped && this.#queue.length < MAX_QUEUED_REQUESTS) {
          this.#paused = false;
          this.#socket.resume();
        }
        if (this.#socket.writableLength > WRITE_HIGH_WATER_BYTES && !this.#socketClosed) {
          await new Promise<void>((resolve) => {
            const done = (): void => {
              this.#socket.off('drain', done);
              this.#socket.off('close', done);
              resolve();
            };
            this.#socket.on('drain', done);
            this.#socket.on('close', done);
          });
        }
      }
    } catch (err) {
      // A bug in this file, not in a handler (handlers' errors become replies): drop the client.
      this.#log.error({ err }, 'qmp session failed');
      this.#socket.destroy();
    } finally {
      this.#pumping = false;
    }
  }

  #errorBody(cls: QmpErrorBody['class'], desc: string): QmpErrorBody {
    return { class: cls, desc };
  }

  /** One request, checked the way QEMU's qmp_dispatch_check_obj and qmp_dispatch do. */
  async #request(req: unknown): Promise<void> {
    if (typeof req !== 'object' || req === null || Array.isArray(req)) {
      this.#write(toQmpJson({ error: this.#errorBody('GenericError', 'QMP input must be a JSON object') }));
      return;
    }
    const obj = req as Record<string, unknown>;
    const hasId = Object.hasOwn(obj, 'id');
    const id = obj['id'];
    const fail = (cls: QmpErrorBody['class'], desc: string): void => {
      this.#write(toQmpJson(hasId ? { id, error: this.#errorBody(cls, desc) } : { error: this.#errorBody(cls, desc) }));
    };

    // QEMU checks members in hash order; Shear checks them in the order they were sent.
    for (const key of Object.keys(obj)) {
      const value = obj[key];
      if (key === 'execute') {
        if (typeof value !== 'string') return fail('GenericError', "QMP input member 'execute' must be a string");
      } else if (key === 'arguments') {
        if (typeof value !== 'object' || value === null || Array.isArray(value)) {
          return fail('GenericError', "QMP input member 'arguments' must be an object");
        }
      } else if (key !== 'id') {
        return fail('GenericError', `QMP input member '${key}' is unexpected`);
      }
    }
    const name = obj['execute'];
    if (typeof name !== 'string') return fail('GenericError', "QMP input lacks member 'execute'");
    if (!this.#negotiated && name !== 'qmp_capabilities') {
      return fail('CommandNotFound', "Expecting capabilities negotiation with 'qmp_capabilities'");
    }
    const command = this.#host.registry.get(name);
    if (!command) return fail('CommandNotFound', `The command ${name} has not been found`);

    const args = (obj['arguments'] ?? {}) as Record<string, unknown>;
    const after: Array<() => void> = [];
    const log = typeof id === 'string' || typeof id === 'number' ? this.#log.child({ command: name, qmpId: id }) : this.#log.child({ command: name });
    const ctx: QmpCommandContext = {
      session: this,
      id,
      signal: this.#abort.signal,
      log,
      afterReply: (fn) => {
        after.push(fn);
      },
    };

    let settle!: () => void;
    this.#running = new Promise<void>((resolve) => (settle = resolve));
    try {
      this.#write(await this.#run(command, args, ctx, hasId, id, after));
    } finally {
      this.#running = undefined;
      settle();
    }
    for (const fn of after) {
      try {
        fn();
      } catch (err) {
        log.error({ err }, 'qmp after-reply action failed');
      }
    }
    this.#maybeEnded();
  }

  /** Runs a handler and returns the reply line; never throws. */
  async #run(
    command: QmpCommand,
    args: Record<string, unknown>,
    ctx: QmpCommandContext,
    hasId: boolean,
    id: unknown,
    after: Array<() => void>,
  ): Promise<string> {
    const reply = (body: Record<string, unknown>): string => toQmpJson(hasId ? { ...body, id } : body);
    const failure = (cls: QmpErrorBody['class'], desc: string): string =>
      toQmpJson(hasId ? { id, error: this.#errorBody(cls, desc) } : { error: this.#errorBody(cls, desc) });
    let result: unknown;
    try {
      result = await command.handler(args, ctx);
    } catch (err) {
      after.length = 0;
      const e = toQmpError(err, command.name, command);
      if (e.internal) ctx.log.error({ err }, 'qmp command failed unexpectedly');
      else ctx.log.debug({ err }, 'qmp command failed');
      return failure(e.class, e.desc);
    }
    try {
      return reply({ return: result === undefined ? {} : result });
    } catch (err) {
      after.length = 0;
      ctx.log.error({ err }, 'qmp command returned a value that cannot be written as JSON');
      return failure('GenericError', internalErrorDesc(command.name));
    }
  }
}
