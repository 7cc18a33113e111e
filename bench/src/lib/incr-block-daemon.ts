// A block daemon for a benchmark: Shear's (`shear daemon`) or QEMU's (qemu-storage-daemon),
// started the same way: one file node "disk0" on an image, a QMP socket, and a writable NBD
// export "live" of disk0 on a UNIX socket (for filling a dirty bitmap through the daemon).
// Plus one backup job run to completion and timed by its QMP events.
import { readFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { CopyFailure } from './copy-runner.js';
import { DaemonProcess, type DaemonKind } from './daemon-process.js';
import type { QmpClient } from './qmp-client.js';

export type { DaemonKind };

export interface DaemonOptions {
  kind: DaemonKind;
  /** The image disk0 opens (read-write). */
  image: string;
  /** Where the sockets go (kept short: UNIX socket paths are limited to 107 bytes). */
  workDir: string;
  /** Path of Shear's CLI (packages/cli/dist/main.js); needed for kind 'shear'. */
  shearCli?: string;
  /** Extra daemon arguments, e.g. ['--workers', '1'] for Shear. */
  extraArgs?: string[];
}

export const DISK_NODE = 'disk0';
/** USER_HZ: Linux reports process times in 1/100 s on every architecture Node runs on. */
const CLOCK_TICKS_PER_SEC = 100;
export const EXPORT_NAME = 'live';

/** One running daemon; close() stops it on every path (quit, then SIGKILL after a grace time). */
export class BlockDaemon {
  private constructor(private readonly proc: DaemonProcess) {}

  static async start(o: DaemonOptions): Promise<BlockDaemon> {
    const proc = await DaemonProcess.launch({
      kind: o.kind,
      socketDir: o.workDir,
      shearCli: o.shearCli,
      args: (nbdSocket) => [
        '--blockdev', `driver=file,node-name=${DISK_NODE},filename=${o.image}`,
        '--nbd-server', `addr.type=unix,addr.path=${nbdSocket}`,
        '--export', `type=nbd,id=${EXPORT_NAME},node-name=${DISK_NODE},name=${EXPORT_NAME},writable=on`,
        ...(o.extraArgs ?? []),
      ],
    });
    return new BlockDaemon(proc);
  }

  get kind(): DaemonKind { return this.proc.kind; }
  get qmp(): QmpClient { return this.proc.qmp; }
  get nbdSocket(): string { return this.proc.nbdSocket; }
  get command(): string { return this.proc.command; }
  get stderr(): string { return this.proc.stderr; }
  /** The daemon's process id (for attaching tracers). */
  get pid(): number | undefined { return this.proc.pid; }

  /**
   * CPU seconds (user + system, all threads, live and exited) the daemon has used so far, from
   * /proc/PID/stat in clock ticks (10 ms on Linux); NaN when it cannot be read.
   */
  cpuSeconds(): number {
    try {
      const stat = readFileSync(`/proc/${this.proc.pid}/stat`, 'utf8');
      // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      return (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS_PER_SEC;
    } catch {
      return NaN;
    }
  }

  /** Sends quit and waits for the exit; kills the daemon if it has not gone within 10 s. */
  /** Stops the daemon; returns its peak RSS before quit, when known. */
  async close(): Promise<number | undefined> {
    return this.proc.close(10_000);
  }
}

export interface JobResult {
  /** performance.now() just before blockdev-backup was sent. */
  startedAt: number;
  /** performance.now() when BLOCK_JOB_COMPLETED arrived. */
  endedAt: number;
  /** The job's len (bytes it had to copy) and offset (bytes it did) from the event. */
  len: number;
  offset: number;
}

/**
 * Runs blockdev-backup with `args` (job-id "bench0" is set here) and waits for it to complete.
 * Fails unless the job completes without error and its offset reaches its len.
 */
export async function runBackupJob(d: BlockDaemon, args: Record<string, unknown>): Promise<JobResult> {
  const jobArgs = { 'job-id': 'bench0', ...args };
  const startedAt = performance.now();
  try {
    await d.qmp.execute('blockdev-backup', jobArgs);
    const done = await d.qmp.waitEvent(['BLOCK_JOB_COMPLETED', 'BLOCK_JOB_CANCELLED'], (e) => e.data['device'] === 'bench0');
    if (done.event !== 'BLOCK_JOB_COMPLETED' || done.data['error'] !== undefined || done.data['offset'] !== done.data['len']) {
      throw new CopyFailure(`The ${d.kind} backup job ended badly: ${done.event} ${JSON.stringify(done.data)}`);
    }
    return { startedAt, endedAt: done.receivedAt, len: Number(done.data['len']), offset: Number(done.data['offset']) };
  } catch (err) {
    if (err instanceof CopyFailure) throw err;
    throw new CopyFailure(`The ${d.kind} backup job failed: ${(err as Error).message}${d.stderr ? `\n${d.kind} daemon: ${d.stderr.trim()}` : ''}`);
  }
}
