import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { promisify } from 'node:util';
import { jobEnd, type DaemonHandle } from './daemon.js';
import { LIBNBD_PYTHON } from '@shear/testkit';

const run = promisify(execFile);
export const CLUSTER = 65536;

/**
 * A guest that writes random data to random places of an NBD export as fast as it can until
 * stopped: whole clusters, unaligned small writes and zero writes, from one seed.
 */
const WRITER = `
import nbd, sys, random, signal
h = nbd.NBD(); h.connect_uri(sys.argv[1])
rnd = random.Random(int(sys.argv[2])); size = h.get_size(); n = 0; stop = False
def on_term(*_):
    global stop; stop = True
signal.signal(signal.SIGTERM, on_term)
while not stop:
    k = rnd.random()
    try:
        if k < 0.7:
            c = rnd.randrange(size // 65536); h.pwrite(bytes([rnd.randrange(256)]) * 65536, c * 65536)
        elif k < 0.9:
            off = rnd.randrange(size - 5000); h.pwrite(bytes([rnd.randrange(256)]) * rnd.randrange(1, 5000), off)
        else:
            c = rnd.randrange(size // 65536); h.zero(65536, c * 65536)
    except Exception:
        # A stop signal can interrupt a request; anything else is a real failure.
        if stop: break
        raise
    n += 1
h.flush(); h.shutdown(); print(n)
`;

export class Writer {
  readonly #proc: ChildProcess;
  readonly #done: Promise<number>;
  constructor(uri: string, seed: number) {
    this.#proc = spawn(LIBNBD_PYTHON, ['-c', WRITER, uri, String(seed)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    this.#proc.stdout!.on('data', (d) => (out += d));
    this.#proc.stderr!.on('data', (d) => (err += d));
    this.#done = new Promise((resolve, reject) =>
      this.#proc.once('exit', (code) => (code === 0 ? resolve(Number(out.trim())) : reject(new Error(`writer exited ${code}: ${err}`)))),
    );
    // The exit is reported by stop(); a writer that dies first (its daemon killed) must not be
    // an unhandled rejection before the test gets there.
    this.#done.catch(() => {});
  }
  /** Stops the guest between two writes (SIGSTOP), then lets what it had sent land. */
  async pause(): Promise<void> {
    this.#proc.kill('SIGSTOP');
    await new Promise((r) => setTimeout(r, 100));
  }
  resume(): void {
    this.#proc.kill('SIGCONT');
  }
  /** Ends the guest; resolves with the number of writes it made. */
  async stop(): Promise<number> {
    this.#proc.kill('SIGCONT');
    this.#proc.kill('SIGTERM');
    return this.#done;
  }
}

/** SHA-256 of every cluster of a file or buffer: the independent record of a point in time. */
export function clusterHashes(data: Buffer): string[] {
  const out: string[] = [];
  for (let o = 0; o < data.length; o += CLUSTER) out.push(createHash('sha256').update(data.subarray(o, o + CLUSTER)).digest('hex'));
  return out;
}

/** Clusters whose content differs from the recorded hashes. */
export function mismatches(expected: string[], data: Buffer): number[] {
  const got = clusterHashes(data);
  return expected.flatMap((h, i) => (h === got[i] ? [] : [i]));
}

/** The content of an image as raw bytes (qcow2 chains resolved by qemu-img). */
export async function imageBytes(file: string, format: 'raw' | 'qcow2', scratch: string): Promise<Buffer> {
  if (format === 'raw') return readFileSync(file);
  await run('qemu-img', ['convert', '-O', 'raw', file, scratch]);
  return readFileSync(scratch);
}

export async function awaitJob(d: DaemonHandle, id: string): Promise<void> {
  const end = await jobEnd(d, id, 120_000);
  if (end.data?.['error']) throw new Error(`job ${id} failed: ${String(end.data['error'])}`);
}
