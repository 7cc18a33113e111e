import { parseArgs } from 'node:util';
import { ShearError } from '@shear/base';
import type { JobInfo } from '@shear/jobs';
import { QmpClient, type QmpEvent } from '@shear/qmp';
import { EXIT } from '../exit-codes.js';
import { formatBytes } from '../progress-bar.js';
import { parseQmpAddress } from './daemon.js';

export const JOBS_USAGE = `usage: shear jobs --qmp unix:PATH|tcp:HOST:PORT [--watch] [--job ID] [--interval MS]

Shows the jobs of a running shear daemon: status, progress and, for a job that fills or
drains a fleecing cache, the cache's state and occupancy (RAM and spill file), spills,
drained chunks and guest writes waiting for space.

options:
  --qmp ADDRESS     the daemon's QMP socket
  --watch           keep showing progress, with the daemon's events, until the job ends;
                    exit status 0 if it completed, 1 if it failed or was cancelled
  --job ID          the job to show or watch (default: all; --watch needs it when
                    several jobs run)
  --interval MS     refresh interval for --watch (default 500)
  --log-level LEVEL pino log level on stderr for the command's own records (default: warn)`;

/** query-jobs as Shear answers it: QEMU's JobInfo plus `x-shear-cache`. */
export type JobRow = JobInfo & { 'x-shear-cache'?: CacheRow };

interface CacheRow {
  node: string;
  state: string;
  'ram-bytes': number;
  'ram-used': number;
  'file-bytes': number;
  'file-used': number;
  spills: number;
  drained: number;
  waits: number;
  failures: number;
  waiting: number;
}

/** One line per job: what a person watching a backup wants at a glance. */
export function formatJob(j: JobRow): string {
  const pct = j['total-progress'] > 0 ? (100 * j['current-progress']) / j['total-progress'] : j.status === 'concluded' && !j.error ? 100 : 0;
  let line = `${j.id}  ${j.type}  ${j.status}  ${pct.toFixed(1)}%  ${formatBytes(j['current-progress'])} / ${formatBytes(j['total-progress'])}`;
  const c = j['x-shear-cache'];
  if (c) {
    line += `  cache ${c.node} ${c.state}: RAM ${formatBytes(c['ram-used'])}/${formatBytes(c['ram-bytes'])}`;
    if (c['file-bytes'] > 0) line += `, file ${formatBytes(c['file-used'])}/${formatBytes(c['file-bytes'])}`;
    line += `, ${c.spills} spilled, ${c.drained} drained`;
    if (c.waiting > 0 || c.waits > 0) line += `, ${c.waiting} writes waiting (${c.waits} waited)`;
    if (c.failures > 0) line += `, ${c.failures} writes refused`;
  }
  if (j.error) line += `  error: ${j.error}`;
  return line;
}

function formatEvent(e: QmpEvent): string | undefined {
  const d = e.data ?? {};
  switch (e.event) {
    case 'X_SHEAR_CACHE_STATE':
      return `cache ${d['node']}: ${d['previous']} -> ${d['state']} (RAM ${formatBytes(Number(d['ram-used']))}, file ${formatBytes(Number(d['file-used']))}, ${d['waiting']} writes waiting)`;
    case 'X_SHEAR_CACHE_WRITE_FAILED':
      return `cache ${d['node']}: full, a preserving write was refused at ${d['offset']}${d['waited'] ? ' after waiting for space' : ''}`;
    case 'X_SHEAR_CBW_ERROR':
      return `copy-before-write ${d['node']}: ${d['action']} at (${d['offset']}, ${d['bytes']}): ${d['reason']}`;
    case 'BLOCK_JOB_ERROR':
      return `job ${d['device']}: ${d['operation']} error, action ${d['action']}`;
    case 'BLOCK_JOB_COMPLETED':
      return `job ${d['device']}: completed${d['error'] ? ` with error: ${d['error']}` : ''}`;
    case 'BLOCK_JOB_CANCELLED':
      return `job ${d['device']}: cancelled`;
    default:
      return undefined;
  }
}

export async function runJobs(argv: string[], signal: AbortSignal, out: NodeJS.WriteStream = process.stdout): Promise<number> {
  let values;
  try {
    ({ values } = parseArgs({ args: argv, options: { qmp: { type: 'string' }, watch: { type: 'boolean' }, job: { type: 'string' }, interval: { type: 'string' }, 'log-level': { type: 'string' } } }));
  } catch (err) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `${(err as Error).message}\n\n${JOBS_USAGE}`);
  }
  if (!values.qmp) throw new ShearError('ERR_INVALID_ARGUMENT', `--qmp is required\n\n${JOBS_USAGE}`);
  const interval = values.interval === undefined ? 500 : Number(values.interval);
  if (!Number.isInteger(interval) || interval < 10) throw new ShearError('ERR_INVALID_ARGUMENT', `Invalid --interval "${values.interval}": expected milliseconds, at least 10`);
  const addr = parseQmpAddress(values.qmp);
  const qmp = await QmpClient.connect(addr.path !== undefined ? { path: addr.path } : { host: addr.tcp!.host, port: addr.tcp!.port });
  try {
    const query = async () => (await qmp.execute<JobRow[]>('query-jobs')).filter((j) => values.job === undefined || j.id === values.job);
    let jobs = await query();
    if (values.job !== undefined && jobs.length === 0) throw new ShearError('ERR_JOB_NOT_FOUND', `No job "${values.job}" on ${values.qmp}`);
    if (!values.watch) {
      out.write(jobs.length === 0 ? 'no jobs\n' : jobs.map((j) => formatJob(j) + '\n').join(''));
      return EXIT.OK;
    }
    if (jobs.length !== 1) throw new ShearError('ERR_INVALID_ARGUMENT', `--watch follows one job: ${jobs.length === 0 ? 'there is none' : 'name it with --job'} (${jobs.map((j) => j.id).join(', ')})`);
    const id = jobs[0]!.id;
    return await watch(qmp, id, query, interval, signal, out);
  } finally {
    await qmp.close();
  }
}

/**
 * Redraws the job's line (in place on a terminal; a new line on change otherwise) and prints
 * the daemon's events about it, until the job concludes or disappears.
 */
async function watch(qmp: QmpClient, id: string, query: () => Promise<JobRow[]>, interval: number, signal: AbortSignal, out: NodeJS.WriteStream): Promise<number> {
  const tty = out.isTTY === true;
  let drawn = '';
  let ended: { error?: string; cancelled?: boolean } | undefined;
  const print = (text: string) => {
    out.write(tty && drawn ? `\r${' '.repeat(Math.min(drawn.length, 200))}\r${text}\n` : `${text}\n`);
    if (tty) drawn = '';
  };
  const onEvent = (e: QmpEvent) => {
    const d = e.data ?? {};
    const mine = d['device'] === id || d['id'] === id || e.event.startsWith('X_SHEAR_');
    if (!mine) return;
    const text = formatEvent(e);
    if (text) print(text);
    if (e.event === 'BLOCK_JOB_COMPLETED' && d['device'] === id) ended = typeof d['error'] === 'string' ? { error: d['error'] } : {};
    if (e.event === 'BLOCK_JOB_CANCELLED' && d['device'] === id) ended = { cancelled: true };
  };
  qmp.on('event', onEvent);
  try {
    for (;;) {
      const job = (await query()).find((j) => j.id === id);
      if (job) {
        const line = formatJob(job);
        if (tty) {
          out.write(`\r${line.slice(0, 200).padEnd(Math.min(drawn.length, 200))}`);
          drawn = line;
        } else if (line !== drawn) {
          out.write(line + '\n');
          drawn = line;
        }
        if (job.status === 'concluded' && !ended) ended = job.error ? { error: job.error } : {};
      } else if (!ended) {
        ended = {};
      }
      if (ended || signal.aborted) break;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(done, interval);
        function done() {
          clearTimeout(timer);
          signal.removeEventListener('abort', done);
          resolve();
        }
        signal.addEventListener('abort', done, { once: true });
      });
    }
  } finally {
    qmp.off('event', onEvent);
    if (tty && drawn) out.write('\n');
  }
  if (signal.aborted && !ended) return EXIT.INTERRUPTED;
  return ended?.error !== undefined || ended?.cancelled ? EXIT.FAILED : EXIT.OK;
}
