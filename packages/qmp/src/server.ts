import { readFileSync } from 'node:fs';
import net from 'node:net';
import { ShearError, silentLogger, type Logger } from '@shear/base';
import { registerBuiltins, type QmpVersionInfo } from './builtins.js';
import type { JsonStreamLimits } from './json-stream.js';
import { toQmpJson } from './json-writer.js';
import { CommandRegistry } from './registry.js';
import { QmpSession, type SessionHost } from './session.js';
import { listenUnix, type UnixListener } from './unix-socket.js';

/** QEMU release whose QMP behaviour Shear reproduces, reported in the greeting. */
export const QEMU_COMPAT_VERSION = { micro: 0, minor: 2, major: 7 } as const;
export const DEFAULT_MAX_OUTPUT_BYTES = 16 * 1024 * 1024;
/** How long closing waits for running commands (cancelled through their signal) to settle. */
export const DEFAULT_CLOSE_TIMEOUT_MS = 10_000;
/** How long closing waits for a connection's last output to reach the kernel (a client that reads nothing). */
export const OUTPUT_FLUSH_TIMEOUT_MS = 1000;

const SHEAR_VERSION: string = (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version;

export interface QmpServerOptions {
  /** UNIX socket to listen on (created 0600; a stale socket there is replaced, anything else refused). */
  path?: string;
  /** Also listen on TCP; only loopback hosts are accepted. Port 0 picks a free port. */
  tcp?: { port: number; host?: string };
  /** Commands to serve; the built-ins are added to it. Default: a new registry. */
  registry?: CommandRegistry;
  log?: Logger;
  /** Default `{ qemu: 7.2.0, package: "Shear <version>" }`. */
  version?: QmpVersionInfo;
  /** Runs after `quit` replied. Default: close this server. */
  onQuit?: () => void | Promise<void>;
  /** Input limits per message (bytes, tokens, nesting depth). */
  limits?: Partial<JsonStreamLimits>;
  /** A client that lets this much unread output pile up is disconnected. */
  maxOutputBytes?: number;
  /** How long quiesce() and close() wait for running commands to settle after cancelling them. */
  closeTimeoutMs?: number;
}

export interface QmpEventTimestamp {
  seconds: number;
  microseconds: number;
}

/** Wall-clock offset of the monotonic clock; follows steps of the wall clock (NTP, manual). */
let wallOffsetMs = performance.timeOrigin;

/**
 * Wall-clock time with microseconds, as QMP event timestamps carry it: Date.now() has only
 * milliseconds, so the sub-millisecond part comes from the monotonic clock.
 */
export function qmpTimestamp(): QmpEventTimestamp {
  const mono = performance.now();
  const wall = Date.now();
  if (Math.abs(mono + wallOffsetMs - wall) > 1) wallOffsetMs = wall - mono;
  const us = Math.floor((mono + wallOffsetMs) * 1000);
  return { seconds: Math.floor(us / 1_000_000), microseconds: us % 1_000_000 };
}

function isLoopbackHost(host: string): boolean {
  if (host === 'localhost' || host === '::1') return true;
  return net.isIPv4(host) && host.startsWith('127.');
}

/**
 * A QMP-compatible control server. Each connection gets the greeting, must negotiate with
 * `qmp_capabilities`, then runs commands from `registry` one after another. Different
 * connections run concurrently. `emit` broadcasts events to negotiated connections.
 *
 * Ownership: the server owns its listeners and every session; close() releases all of them.
 */
export class QmpServer {
  readonly registry: CommandRegistry;
  readonly version: QmpVersionInfo;

  readonly #opts: QmpServerOptions;
  readonly #log: Logger;
  readonly #host: SessionHost;
  readonly #sessions = new Set<QmpSession>();
  #nextSessionId = 1;
  #unix: UnixListener | undefined;
  #tcp: net.Server | undefined;
  #listening = false;
  #quiescing: Promise<void> | undefined;
  #closing: Promise<void> | undefined;
  #listenersClosed: Promise<void> = Promise.resolve();

  constructor(opts: QmpServerOptions = {}) {
    if (opts.path === undefined && opts.tcp === undefined) {
      throw new ShearError('ERR_INVALID_ARGUMENT', 'Cannot create QMP server: neither a socket path nor a TCP port was given');
    }
    if (opts.tcp && !isLoopbackHost(opts.tcp.host ?? '127.0.0.1')) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot create QMP server on "${opts.tcp.host}": only loopback addresses are allowed`);
    }
    this.#opts = opts;
    this.registry = opts.registry ?? new CommandRegistry();
    this.#log = (opts.log ?? silentLogger).child({ component: 'qmp' });
    this.version = opts.version ?? { qemu: { ...QEMU_COMPAT_VERSION }, package: `Shear ${SHEAR_VERSION}` };
    const capabilities: string[] = [];
    this.#host = {
      registry: this.registry,
      greetingLine: toQmpJson({ QMP: { version: this.version, capabilities } }),
      limits: opts.limits ?? {},
      maxOutputBytes: opts.maxOutputBytes ?? DEFAULT_MAX_OUTPUT_BYTES,
      log: this.#log,
      sessionEnded: (session) => this.#sessionEnded(session),
    };
    registerBuiltins(this.registry, {
      version: this.version,
      capabilities,
      quit: () => {
        const hook = this.#opts.onQuit ?? (() => this.close());
        Promise.resolve()
          .then(hook)
          .catch((err: unknown) => this.#log.error({ err }, 'qmp quit hook failed'));
      },
    });
  }

  /** Starts listening. @throws ERR_QMP_SOCKET_IN_USE, or a system error from bind */
  async listen(): Promise<void> {
    if (this.#listening || this.#quiescing) {
      throw new ShearError('ERR_INVALID_ARGUMENT', 'Cannot start QMP server: it was started already');
    }
    this.#listening = true;
    try {
      // The socket is visible before listenUnix returns: a client may connect and quit (close
      // this server) meanwhile. close() only sees listeners already stored, so a listener that
      // arrives after it began is closed here; otherwise it would keep the process alive.
      if (this.#opts.path !== undefined) {
        const unix = await listenUnix(this.#opts.path, (socket) => this.#accept(socket, 'unix'));
        if (this.#quiescing) {
          await unix.close();
          return;
        }
        this.#unix = unix;
        this.#log.info({ path: unix.path }, 'qmp listening');
      }
      if (this.#opts.tcp) {
        const server = net.createServer((socket) => {
          socket.setNoDelay(true);
          this.#accept(socket, `tcp:${socket.remoteAddress}:${socket.remotePort}`);
        });
        await new Promise<void>((done, fail) => {
          server.once('error', fail);
          server.listen(this.#opts.tcp?.port, this.#opts.tcp?.host ?? '127.0.0.1', () => {
            server.off('error', fail);
            done();
          });
        });
        if (this.#quiescing) {
          await new Promise<void>((done) => server.close(() => done()));
          return;
        }
        this.#tcp = server;
        this.#log.info({ address: server.address() }, 'qmp listening');
      }
    } catch (err) {
      await this.close();
      throw err;
    }
  }

  /** The UNIX socket path (absolute) once listening. */
  get path(): string | undefined {
    return this.#unix?.path;
  }

  /** The TCP address once listening. */
  get tcpAddress(): net.AddressInfo | undefined {
    const a = this.#tcp?.address();
    return a && typeof a === 'object' ? a : undefined;
  }

  get sessionCount(): number {
    return this.#sessions.size;
  }

  /**
   * Broadcasts an event to every negotiated session (sessions still negotiating get nothing,
   * as in QEMU, and nothing is queued for them). Returns how many sessions it was sent to.
   */
  emit(event: string, data?: Record<string, unknown>): number {
    if (typeof event !== 'string' || event.length === 0) {
      throw new ShearError('ERR_INVALID_ARGUMENT', 'Cannot emit QMP event: the name is empty');
    }
    const message = data === undefined
      ? { timestamp: qmpTimestamp(), event }
      : { timestamp: qmpTimestamp(), event, data };
    const line = toQmpJson(message);
    let sent = 0;
    for (const s of this.#sessions) if (s.sendEvent(line)) sent++;
    return sent;
  }

  /**
   * First half of close(): stops accepting connections and reading commands, cancels running
   * commands through their AbortSignal and waits for them to settle (at most closeTimeoutMs).
   * Connections stay open and still get events: a daemon quitting cancels its jobs after this,
   * and their events must reach the clients. Idempotent.
   */
  quiesce(): Promise<void> {
    this.#quiescing ??= this.#quiesce();
    return this.#quiescing;
  }

  /**
   * Quiesces, then hands each connection's output to the kernel and closes it without waiting
   * for the client to hang up (at most OUTPUT_FLUSH_TIMEOUT_MS for a client that reads nothing),
   * and removes the socket file. Idempotent.
   */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  async #quiesce(): Promise<void> {
    const unix = this.#unix;
    const tcp = this.#tcp;
    this.#listenersClosed = Promise.all([unix?.close(), tcp ? new Promise<void>((done) => tcp.close(() => done())) : undefined]).then(() => {});
    const reason = new ShearError('ERR_ABORTED', 'Cannot finish QMP command: the server is closing');
    await withDeadline(this.#opts.closeTimeoutMs ?? DEFAULT_CLOSE_TIMEOUT_MS, (deadline) =>
      Promise.all([...this.#sessions].map((s) => Promise.race([s.quiesce(reason), deadline]))).then(() => {}),
    );
  }

  async #close(): Promise<void> {
    await this.quiesce();
    await withDeadline(OUTPUT_FLUSH_TIMEOUT_MS, (deadline) => Promise.all([...this.#sessions].map((s) => s.close(deadline))).then(() => {}));
    await this.#listenersClosed;
    this.#log.info({}, 'qmp server closed');
  }

  #accept(socket: net.Socket, peer: string): void {
    if (this.#quiescing) {
      socket.destroy();
      return;
    }
    const session = new QmpSession(this.#host, socket, this.#nextSessionId++, peer);
    this.#sessions.add(session);
    session.start();
  }

  #sessionEnded(session: QmpSession): void {
    this.#sessions.delete(session);
  }
}

/** Runs `fn` with a promise that resolves after `ms`; the timer never outlives the call. */
async function withDeadline(ms: number, fn: (deadline: Promise<void>) => Promise<void>): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<void>((done) => (timer = setTimeout(done, ms)));
  try {
    await Promise.race([fn(deadline), deadline]);
  } finally {
    clearTimeout(timer);
  }
}
