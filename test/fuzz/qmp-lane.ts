import { connect, type Socket } from 'node:net';
import { once } from 'node:events';
import type { CampaignContext } from './context.js';
import { bump } from './findings.js';
import { QmpInputs, type QmpInput } from './qmp-inputs.js';
import type { Prng } from './prng.js';

const ERROR_CLASSES = new Set(['GenericError', 'CommandNotFound', 'DeviceNotActive', 'DeviceNotFound', 'KVMMissingCap']);
/** A lexical error resets QEMU's (and Shear's) JSON streamer: every input starts from a clean state. */
const RESET = Buffer.from('\xff\n', 'latin1');
/** Batches in flight per connection. */
const WINDOW = 6;

type Outcome = 'answered' | 'closed' | 'lost' | 'hung';

interface Pending {
  sentinel: string;
  /** The last input of the batch (the one a finding names; the batch is in `batch`). */
  input: QmpInput;
  batch: Buffer;
  index: number;
  sentAt: number;
  resolve: (o: Outcome) => void;
}

/**
 * One QMP connection: each input is followed by the reset bytes and a query-version with an id
 * of ours (the sentinel), so every reply line between two sentinels belongs to one input, and
 * the sentinel's answer shows the connection still serves after it.
 */
class QmpConn {
  readonly socket: Socket;
  readonly #ctx: CampaignContext;
  #pending: Pending[] = [];
  #partial = '';
  #greeted = false;
  #negotiated = false;
  #seq = 0;
  closed = false;
  readonly #onGreeting: Promise<void>;
  #greetingResolve!: () => void;

  constructor(ctx: CampaignContext, socket: Socket) {
    this.#ctx = ctx;
    this.socket = socket;
    this.#onGreeting = new Promise((resolve) => (this.#greetingResolve = resolve));
    socket.setEncoding('latin1');
    socket.on('data', (s: string) => this.#onData(s));
    socket.on('error', () => {});
    socket.on('close', () => {
      this.closed = true;
      this.#greetingResolve();
      const [first, ...rest] = this.#pending.splice(0);
      first?.resolve('closed');
      for (const p of rest) p.resolve('lost');
    });
  }

  static async open(ctx: CampaignContext, negotiate: boolean): Promise<QmpConn> {
    const s = connect({ path: ctx.env.d.socket });
    s.on('error', () => {});
    await once(s, 'connect');
    const c = new QmpConn(ctx, s);
    await c.#onGreeting;
    if (negotiate && !c.closed) {
      s.write('{"execute":"qmp_capabilities"}\n');
      c.#negotiated = true;
    }
    return c;
  }

  get inFlight(): number {
    return this.#pending.length;
  }

  get oldest(): Pending | undefined {
    return this.#pending[0];
  }

  /** Sends a batch of inputs, each followed by the reset bytes, then the sentinel. */
  send(inputs: QmpInput[], index: number): Promise<Outcome> {
    const sentinel = `~fz${++this.#seq}`;
    return new Promise<Outcome>((resolve) => {
      if (this.closed) return resolve('lost');
      const batch = Buffer.concat([...inputs.flatMap((i) => [i.bytes, RESET]), Buffer.from(`{"execute":"query-version","id":"${sentinel}"}\n`)]);
      this.#pending.push({ sentinel, input: inputs[inputs.length - 1]!, batch, index, sentAt: Date.now(), resolve });
      this.socket.write(batch);
    });
  }

  /** Gives up on the oldest input (no answer in time): the connection is dropped. */
  hang(): void {
    const p = this.#pending.shift();
    p?.resolve('hung');
    this.socket.destroy();
  }

  #onData(s: string): void {
    const text = this.#partial + s;
    let start = 0;
    for (let nl = text.indexOf('\n'); nl >= 0; nl = text.indexOf('\n', start)) {
      this.#line(text.slice(start, nl));
      start = nl + 1;
    }
    this.#partial = text.slice(start);
    if (this.#partial.length > 64 * 1024 * 1024) this.#violation('a reply line longer than 64 MiB');
  }

  #violation(detail: string, p = this.#pending[0]): void {
    this.#ctx.finding({ what: 'violation', detail, input: p?.batch, index: p?.index });
  }

  #line(raw: string): void {
    const line = raw.endsWith('\r') ? raw.slice(0, -1) : raw;
    if (line === '') return;
    let o: Record<string, unknown>;
    try {
      // The replies are UTF-8; latin1 above keeps line splitting byte-exact, so decode here.
      o = JSON.parse(Buffer.from(line, 'latin1').toString('utf8')) as Record<string, unknown>;
    } catch {
      return this.#violation(`a reply line that is not JSON: ${line.slice(0, 120)}`);
    }
    if (typeof o !== 'object' || o === null || Array.isArray(o)) return this.#violation(`a reply that is not an object: ${line.slice(0, 120)}`);
    if (!this.#greeted) {
      this.#greeted = true;
      if (!o['QMP']) this.#violation(`no greeting: ${line.slice(0, 120)}`);
      this.#greetingResolve();
      return;
    }
    if ('event' in o) {
      if (typeof o['event'] !== 'string' || typeof o['timestamp'] !== 'object') this.#violation(`a malformed event: ${line.slice(0, 120)}`);
      return;
    }
    const p = this.#pending[0];
    if (p && o['id'] === p.sentinel) {
      this.#pending.shift();
      const ret = o['return'] as { qemu?: { major?: number } } | undefined;
      const err = o['error'] as { class?: string } | undefined;
      if (!(ret?.qemu?.major !== undefined || (!this.#negotiated && err?.class === 'CommandNotFound'))) this.#violation(`the connection no longer answers query-version: ${line.slice(0, 160)}`, p);
      p.resolve('answered');
      return;
    }
    const keys = Object.keys(o);
    const stats = this.#ctx.stats;
    if ('return' in o && keys.every((k) => k === 'return' || k === 'id')) {
      stats.accepted++;
      return;
    }
    const e = o['error'] as { class?: unknown; desc?: unknown } | undefined;
    const wellFormed =
      e !== undefined && typeof e === 'object' && e !== null && keys.every((k) => k === 'error' || k === 'id') &&
      typeof e.class === 'string' && ERROR_CLASSES.has(e.class) && typeof e.desc === 'string' && e.desc.length > 0 &&
      Object.keys(e).every((k) => k === 'class' || k === 'desc');
    if (!wellFormed) return this.#violation(`a malformed reply: ${line.slice(0, 160)}`);
    bump(stats.errors, e.class as string);
    if (/internal error/i.test(e.desc as string)) this.#violation(`an internal error: ${(e.desc as string).slice(0, 160)}`);
  }
}

/** Drives QMP inputs over a series of connections until the context's budget for this lane is spent. */
export async function qmpLane(ctx: CampaignContext, rng: Prng, commands: string[], budget: number): Promise<void> {
  const gen = new QmpInputs(rng, commands);
  let left = budget;
  while (left > 0 && !ctx.stopped) {
    const negotiate = rng.chance(0.97);
    let conn: QmpConn;
    try {
      conn = await QmpConn.open(ctx, negotiate);
    } catch (err) {
      await ctx.connectFailed('a QMP connect', err);
      continue;
    }
    ctx.stats.connections++;
    // Connections come and go: some live for a few inputs, some for thousands.
    let perConn = rng.chance(0.3) ? rng.range(1, 20) : rng.range(200, 5000);
    const inFlight = new Set<Promise<void>>();
    const hangTimer = setInterval(() => {
      const p = conn.oldest;
      if (p && Date.now() - p.sentAt > ctx.hangMs) {
        // Pending reads first: a starved harness must not pass for a hung daemon.
        setImmediate(() =>
          setImmediate(() => {
            if (conn.oldest !== p) return;
            void ctx.hangFound(p.batch, p.index, 'no QMP reply within the deadline');
            conn.hang();
          }),
        );
      }
    }, 1000);
    while (left > 0 && perConn > 0 && !conn.closed && !ctx.stopped) {
      // A batch of inputs shares one sentinel; an input that may close the connection goes alone.
      const batch: QmpInput[] = [];
      const size = Math.min(left, perConn, rng.range(1, 24));
      let alone = false;
      while (batch.length < size) {
        const input = gen.next();
        if (input.mayClose) {
          if (batch.length > 0) gen.pushBack(input);
          else {
            batch.push(input);
            alone = true;
          }
          break;
        }
        batch.push(input);
      }
      const index = ctx.nextIndex();
      for (let i = 1; i < batch.length; i++) ctx.nextIndex();
      left -= batch.length;
      perConn -= batch.length;
      if (alone) await Promise.all(inFlight);
      const done = conn.send(batch, index).then(async (outcome) => {
        if (outcome === 'lost') {
          left += batch.length;
          return;
        }
        ctx.stats.inputs += batch.length;
        for (const input of batch) bump(ctx.stats.byKind, input.kind);
        if (outcome === 'closed') {
          if (alone) ctx.stats.expectedCloses++;
          else if (await ctx.checkAlive('QMP connection closed')) ctx.finding({ what: 'violation', detail: 'the daemon closed a QMP connection after inputs it must answer', input: Buffer.concat(batch.map((b) => b.bytes)), index });
        }
      });
      inFlight.add(done);
      void done.finally(() => inFlight.delete(done));
      if (alone) await done;
      if (inFlight.size >= WINDOW) await Promise.race(inFlight);
    }
    await Promise.all(inFlight);
    clearInterval(hangTimer);
    conn.socket.end();
    if (!conn.closed) await once(conn.socket, 'close');
  }
}
