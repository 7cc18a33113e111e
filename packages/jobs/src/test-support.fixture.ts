// Helpers shared by the backup job tests (excluded from the build, as every *.fixture.ts).
import { randomBytes } from 'node:crypto';
import { ShearError } from '@shear/base';
import { BlockGraph, MemoryDriver, PERM_ALL, PERM_CONSISTENT_READ, PERM_WRITE, filterChildPerms, type BlockIO, type BlockStatusExtent } from '@shear/block';
import { BackupJob, type BackupParams } from './backup-job.js';
import { JobManager } from './job-manager.js';
import type { JobTxn } from './job-txn.js';

export const C = 64 * 1024;
export const CLUSTERS = 64;
export const SIZE = CLUSTERS * C;
export const INFO = { name: 'memory', childPerms: filterChildPerms };

export type Errno = 'EIO' | 'ENOSPC';

/** Fail the nth read (or write) counted from when the fault is armed; `persistent`: and every later one. */
export interface Fault {
  op: 'read' | 'write';
  nth: number;
  persistent: boolean;
  errno: Errno;
}

/**
 * A memory disk whose reads and writes can be made to fail (by a fault schedule, or every
 * write after `failAfter`, EIO) or to wait at a gate. The errors are shaped as a real driver's
 * (file, blkdebug): ERR_IO or ERR_NO_SPACE with context.op and context.errno.
 */
export class FaultyDisk implements BlockIO {
  failAfter = Infinity;
  writes = 0;
  reads = 0;
  /** Clusters that some write reached successfully. */
  readonly written = new Set<number>();
  gate: Promise<void> | undefined;
  /** Reads and writes under way, to check that nothing is left running. */
  inFlight = 0;
  readonly injected: { op: 'read' | 'write'; errno: Errno; offset: number }[] = [];
  #fault: Fault | undefined;
  #armedAt = 0;
  readonly mem: MemoryDriver;
  readonly length: number;

  constructor(length = SIZE) {
    this.length = length;
    this.mem = new MemoryDriver({ length });
  }

  /** Arms `fault` (counting its nth from now) or, with undefined, clears it. */
  setFault(fault: Fault | undefined): void {
    this.#fault = fault;
    this.#armedAt = fault?.op === 'read' ? this.reads : this.writes;
  }

  get fault(): Fault | undefined {
    return this.#fault;
  }

  #check(op: 'read' | 'write', count: number, offset: number, bytes: number): void {
    if (op === 'write' && count > this.failAfter) throw new ShearError('ERR_IO', 'Cannot write: injected', { errno: 'EIO', op, offset, bytes });
    const f = this.#fault;
    if (!f || f.op !== op) return;
    const n = count - this.#armedAt;
    if (n < f.nth || (n > f.nth && !f.persistent)) return;
    this.injected.push({ op, errno: f.errno, offset });
    throw new ShearError(f.errno === 'ENOSPC' ? 'ERR_NO_SPACE' : 'ERR_IO', `Cannot ${op} (${offset}, ${bytes}): injected ${f.errno}`, { errno: f.errno, op, offset, bytes });
  }

  async #io<T>(fn: () => Promise<T>): Promise<T> {
    this.inFlight++;
    try {
      return await fn();
    } finally {
      this.inFlight--;
    }
  }

  read(o: number, b: Uint8Array) {
    return this.#io(async () => {
      await this.gate;
      this.#check('read', ++this.reads, o, b.length);
      await this.mem.read(o, b);
    });
  }

  write(o: number, b: Uint8Array) {
    return this.#io(async () => {
      await this.gate;
      this.#check('write', ++this.writes, o, b.length);
      await this.mem.write(o, b);
      for (let c = Math.floor(o / C); c * C < o + b.length; c++) this.written.add(c);
    });
  }

  writeZeroes(o: number, n: number) {
    return this.#io(async () => {
      await this.gate;
      this.#check('write', ++this.writes, o, n);
      await this.mem.writeZeroes(o, n);
      for (let c = Math.floor(o / C); c * C < o + n; c++) this.written.add(c);
    });
  }

  discard(o: number, n: number) { return this.mem.discard(o, n); }
  flush() { return Promise.resolve(); }
  blockStatus(o: number, n: number): Promise<BlockStatusExtent[]> { return this.mem.blockStatus(o, n); }
  async close() {}
}

export interface SetupOptions {
  targets?: number;
  /** Sees every event synchronously, as an operator watching QMP would (and may act on it). */
  onEvent?: (event: string, data: Record<string, unknown>) => void;
}

/** A graph with a source disk "disk" full of random data, a guest writing to it, and targets tgt0... */
export async function setup(opts: number | SetupOptions = {}) {
  const o: SetupOptions = typeof opts === 'number' ? { targets: opts } : opts;
  const events: { event: string; data: Record<string, unknown> }[] = [];
  const jobs = new JobManager((event, data) => {
    events.push({ event, data });
    o.onEvent?.(event, data);
  });
  const g = new BlockGraph();
  const content = randomBytes(SIZE);
  const disk = new FaultyDisk();
  const src = await g.addNode({ name: 'disk', info: INFO, open: async () => disk });
  const guest = g.attachUser({ kind: 'user', name: 'guest' }, src, PERM_WRITE | PERM_CONSISTENT_READ, PERM_ALL);
  await guest.write(0, content);
  const targets: FaultyDisk[] = [];
  for (let i = 0; i < (o.targets ?? 1); i++) {
    const tg = new FaultyDisk();
    targets.push(tg);
    await g.addNode({ name: `tgt${i}`, info: INFO, open: async () => tg });
  }
  return { events, jobs, g, src, disk, guest, content, targets };
}

export type Setup = Awaited<ReturnType<typeof setup>>;

export async function startBackup(s: Setup, id: string, p: Omit<Partial<BackupParams>, 'target'> & { target?: string }, opts: { autoFinalize?: boolean; txn?: JobTxn } = {}) {
  // As the daemon does: the job id is checked before anything is built.
  s.jobs.checkNewId(id);
  const { target, ...rest } = p;
  const driver = await BackupJob.create(s.g, undefined, { source: s.src, target: s.g.get(target ?? 'tgt0'), sync: 'full', ...rest });
  const job = s.jobs.create(id, driver, { autoFinalize: opts.autoFinalize ?? true }, opts.txn);
  return { job, driver };
}

export function eventsOf(s: Setup, id: string) {
  return s.events.filter((e) => e.data['id'] === id || e.data['device'] === id).map((e) => (e.event === 'JOB_STATUS_CHANGE' ? `status:${e.data['status']}` : e.event));
}

export async function targetContent(tg: FaultyDisk) {
  const b = Buffer.alloc(tg.length);
  await tg.mem.read(0, b);
  return b;
}
