// A guest stand-in: python3-libnbd doing fixed-size writes at a fixed rate to a writable NBD
// export, timing each write. Started, then told "go" and "stop" over stdin, so its window is
// exactly the window being measured. Offsets come from a seeded xorshift32 that writerOffsets()
// reproduces here, so the bench can put the written clusters back afterwards.
import { spawn, type ChildProcess } from 'node:child_process';

export const PYTHON = '/usr/bin/python3';

// Rate schedule: write i is due at t0 + i * interval (no catch-up burst limit: a writer that fell
// behind issues the missed writes back to back, as a guest with queued I/O would).
const SCRIPT = String.raw`
import nbd, sys, os, time, json, threading
uri, rate, block, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
h = nbd.NBD()
h.connect_uri(uri)
clusters = h.get_size() // block
buf = os.urandom(block)
stop = threading.Event()
print("ready", flush=True)
if sys.stdin.readline().strip() != "go":
    sys.exit(3)
def watch():
    sys.stdin.readline()
    stop.set()
threading.Thread(target=watch, daemon=True).start()
interval = block / rate
lat = []
late = 0
x = seed & 0xffffffff or 1
err = None
attempted = 0
t0 = time.monotonic()
while not stop.is_set():
    due = t0 + attempted * interval
    now = time.monotonic()
    if due > now:
        time.sleep(due - now)
    elif now - due > interval:
        late += 1
    x ^= (x << 13) & 0xffffffff
    x ^= x >> 17
    x ^= (x << 5) & 0xffffffff
    attempted += 1
    w0 = time.perf_counter()
    try:
        h.pwrite(buf, (x % clusters) * block)
    except Exception as e:
        err = str(e)
        break
    lat.append(time.perf_counter() - w0)
seconds = time.monotonic() - t0
try:
    h.shutdown()
except Exception:
    pass
lat.sort()
def pct(p):
    return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000 if lat else None
print(json.dumps({"writes": len(lat), "attempted": attempted, "seconds": seconds,
    "mbps": len(lat) * block / 1e6 / seconds if seconds > 0 else 0, "late": late,
    "p50Ms": pct(50), "p90Ms": pct(90), "p99Ms": pct(99), "p999Ms": pct(99.9),
    "maxMs": lat[-1] * 1000 if lat else None, "meanMs": sum(lat) / len(lat) * 1000 if lat else None,
    "error": err}), flush=True)
`;

export interface WriterStats {
  /** Writes that completed. */
  writes: number;
  /** Writes started (one more than `writes` when the last one failed). */
  attempted: number;
  seconds: number;
  /** Achieved rate, 10^6 bytes/s. */
  mbps: number;
  /** Writes issued more than one interval after they were due (the writer fell behind). */
  late: number;
  p50Ms: number | null;
  p90Ms: number | null;
  p99Ms: number | null;
  p999Ms: number | null;
  maxMs: number | null;
  meanMs: number | null;
  error: string | null;
}

export interface WriterOptions {
  uri: string;
  /** 10^6 bytes/s. */
  mbps: number;
  blockBytes: number;
  seed: number;
}

/** The offsets the writer with this seed writes first, in order (xorshift32, as in the script). */
export function writerOffsets(seed: number, imageBytes: number, blockBytes: number, count: number): number[] {
  const clusters = Math.floor(imageBytes / blockBytes);
  let x = seed >>> 0 || 1;
  const out: number[] = [];
  for (let i = 0; i < count; i++) {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    out.push((x % clusters) * blockBytes);
  }
  return out;
}

/** One writer process; owns it until stop() or kill(). */
export class NbdWriter {
  private stdout = '';
  private stderr = '';
  private readonly exited: Promise<number | null>;

  private constructor(private readonly proc: ChildProcess, readonly options: WriterOptions) {
    proc.stdout!.setEncoding('utf8').on('data', (d: string) => { this.stdout += d; });
    proc.stderr!.setEncoding('utf8').on('data', (d: string) => { this.stderr += d; });
    this.exited = new Promise((resolve) => {
      proc.once('close', (code) => resolve(code));
      proc.once('error', () => resolve(null));
    });
  }

  /** Spawns the writer and resolves once it is connected and waiting for go(). */
  static async start(o: WriterOptions): Promise<NbdWriter> {
    const proc = spawn(PYTHON, ['-c', SCRIPT, o.uri, String(o.mbps * 1e6), String(o.blockBytes), String(o.seed)], { stdio: ['pipe', 'pipe', 'pipe'] });
    const w = new NbdWriter(proc, o);
    const ready = await Promise.race([
      new Promise<boolean>((resolve) => {
        const check = () => { if (w.stdout.includes('ready\n')) { proc.stdout!.off('data', check); resolve(true); } };
        proc.stdout!.on('data', check);
        check();
      }),
      w.exited.then(() => false),
      new Promise<boolean>((resolve) => setTimeout(() => resolve(false), 15_000)),
    ]);
    if (!ready) {
      await w.kill();
      throw new Error(`NBD writer did not connect to ${o.uri}: ${w.stderr.trim() || w.stdout.trim() || 'no output'}`);
    }
    return w;
  }

  go(): void {
    this.proc.stdin!.write('go\n');
  }

  /** Ends the write loop and returns the writer's figures. */
  async stop(): Promise<WriterStats> {
    this.proc.stdin!.end('stop\n');
    const timer = setTimeout(() => this.proc.kill('SIGKILL'), 15_000);
    const code = await this.exited;
    clearTimeout(timer);
    const line = this.stdout.trim().split('\n').pop() ?? '';
    if (code !== 0 || !line.startsWith('{')) throw new Error(`NBD writer exited with ${code}: ${this.stderr.trim() || this.stdout.trim()}`);
    return JSON.parse(line) as WriterStats;
  }

  async kill(): Promise<void> {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill('SIGKILL');
    await this.exited;
  }
}
