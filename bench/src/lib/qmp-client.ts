// A minimal QMP client over a UNIX socket: enough to drive one qemu-storage-daemon block job.
// QMP is line-delimited JSON: a greeting {"QMP": ...}, then replies {"return"|"error", "id"}
// to our commands, interleaved with asynchronous {"event", "data", "timestamp"} messages.
import net from 'node:net';
import { performance } from 'node:perf_hooks';

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  /** performance.now() when the line arrived: the bench times jobs by this, not by when a promise resolved. */
  receivedAt: number;
}

interface Pending {
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
}

interface EventWaiter {
  names: string[];
  match: (e: QmpEvent) => boolean;
  resolve: (e: QmpEvent) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

export class QmpError extends Error {
  constructor(readonly command: string, readonly qmpClass: string, desc: string) {
    super(`QMP command "${command}" failed: ${qmpClass}: ${desc}`);
  }
}

export class QmpClient {
  private buffer = '';
  private nextId = 1;
  private readonly pending = new Map<string, Pending & { command: string }>();
  /** Events not yet claimed by a waiter; a waiter looks here first, so no event is missed. */
  private readonly events: QmpEvent[] = [];
  private readonly waiters = new Set<EventWaiter>();
  private closedError: Error | undefined;
  greeting: unknown;

  private constructor(private readonly socket: net.Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.onData(chunk));
    socket.on('error', (err) => this.fail(err));
    socket.on('close', () => this.fail(new Error('QMP socket closed')));
  }

  /**
   * Connects to a daemon that may still be starting: retries while the socket does not exist
   * or refuses, until `timeoutMs`. Resolves after the greeting and qmp_capabilities.
   */
  static async connect(socketPath: string, timeoutMs = 10_000): Promise<QmpClient> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      try {
        const socket = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.createConnection(socketPath);
          s.once('connect', () => { s.off('error', reject); resolve(s); });
          s.once('error', reject);
        });
        const client = new QmpClient(socket);
        try {
          client.greeting = await client.readGreeting(Math.max(1000, deadline - performance.now()));
          await client.execute('qmp_capabilities');
          return client;
        } catch (err) {
          client.close();
          throw err;
        }
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if ((code !== 'ENOENT' && code !== 'ECONNREFUSED') || performance.now() > deadline) throw err;
        await new Promise((r) => setTimeout(r, 20));
      }
    }
  }

  private greetingWaiter: ((g: unknown) => void) | undefined;

  private readGreeting(timeoutMs: number): Promise<unknown> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('No QMP greeting')), timeoutMs);
      this.greetingWaiter = (g) => { clearTimeout(timer); resolve(g); };
    });
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    for (let nl = this.buffer.indexOf('\n'); nl >= 0; nl = this.buffer.indexOf('\n')) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (line) this.onMessage(JSON.parse(line) as Record<string, unknown>);
    }
  }

  private onMessage(msg: Record<string, unknown>): void {
    if ('QMP' in msg) {
      const w = this.greetingWaiter;
      this.greetingWaiter = undefined;
      w?.(msg['QMP']);
      return;
    }
    if (typeof msg['event'] === 'string') {
      const e: QmpEvent = { event: msg['event'], data: (msg['data'] ?? {}) as Record<string, unknown>, receivedAt: performance.now() };
      for (const w of this.waiters) {
        if (w.names.includes(e.event) && w.match(e)) {
          this.waiters.delete(w);
          clearTimeout(w.timer);
          w.resolve(e);
          return;
        }
      }
      this.events.push(e);
      return;
    }
    const id = String(msg['id']);
    const p = this.pending.get(id);
    if (!p) return;
    this.pending.delete(id);
    if ('error' in msg) {
      const e = msg['error'] as { class?: string; desc?: string };
      p.reject(new QmpError(p.command, e.class ?? 'Error', e.desc ?? JSON.stringify(e)));
    } else {
      p.resolve(msg['return']);
    }
  }

  private fail(err: Error): void {
    if (this.closedError) return;
    this.closedError = err;
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    for (const w of this.waiters) { clearTimeout(w.timer); w.reject(err); }
    this.waiters.clear();
  }

  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = String(this.nextId++);
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject, command });
      this.socket.write(JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id }) + '\n');
    });
  }

  /** Resolves with the first event among `names` that `match` accepts, including ones already received. */
  waitEvent(names: string[], match: (e: QmpEvent) => boolean = () => true, timeoutMs = 600_000): Promise<QmpEvent> {
    const i = this.events.findIndex((e) => names.includes(e.event) && match(e));
    if (i >= 0) return Promise.resolve(this.events.splice(i, 1)[0]!);
    if (this.closedError) return Promise.reject(this.closedError);
    return new Promise((resolve, reject) => {
      const w: EventWaiter = {
        names, match, resolve, reject,
        timer: setTimeout(() => { this.waiters.delete(w); reject(new Error(`No QMP event ${names.join('/')} within ${timeoutMs} ms`)); }, timeoutMs),
      };
      this.waiters.add(w);
    });
  }

  close(): void {
    this.socket.destroy();
  }
}
