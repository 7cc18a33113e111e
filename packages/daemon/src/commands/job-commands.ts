import { ArgReader, type Transaction } from '@shear/base';
import { parseBitmapSyncMode, type BitmapSyncMode } from '@shear/dirty-bitmap';
import { BackupJob, JobTxn, type BlockdevOnError, type Job, type MirrorSyncMode } from '@shear/jobs';
import type { CommandRegistry } from '@shear/qmp';
import type { DaemonContext } from '../context.js';
import { lookupNode } from './bitmap-actions.js';

const SYNC_MODES = ['full', 'top', 'bitmap', 'incremental', 'none'] as const;
const ON_ERROR = ['report', 'ignore', 'enospc', 'stop', 'auto'] as const;
const BITMAP_MODES = ['on-success', 'conditional', 'never', 'always'] as const;

/**
 * blockdev-backup as a transaction action: everything is checked and the point in time taken
 * in prepare (the job exists, state created); the job starts at commit; an abort removes the
 * filter and gives the bitmap its successor's bits back. `jobTxn` groups jobs for
 * completion-mode=grouped.
 */
export async function backupAction(args: Record<string, unknown>, tx: Transaction, ctx: DaemonContext, jobTxn?: JobTxn): Promise<void> {
  const a = new ArgReader(args);
  const device = a.string('device');
  const jobId = a.string('job-id', device);
  const targetName = a.string('target');
  const sync = a.enumOf('sync', SYNC_MODES)! as MirrorSyncMode;
  const bitmap = a.string('bitmap', undefined);
  const modeArg = a.enumOf('bitmap-mode', BITMAP_MODES);
  const bitmapMode: BitmapSyncMode | undefined = modeArg === undefined ? undefined : parseBitmapSyncMode(modeArg);
  const compress = a.bool('compress', false)!;
  const speed = a.int('speed', { min: 0, fallback: 0 })!;
  const onSourceError = a.enumOf('on-source-error', ON_ERROR, 'report')! as BlockdevOnError;
  const onTargetError = a.enumOf('on-target-error', ON_ERROR, 'report')! as BlockdevOnError;
  const autoFinalize = a.bool('auto-finalize', true)!;
  const autoDismiss = a.bool('auto-dismiss', true)!;
  const filterNodeName = a.string('filter-node-name', undefined);
  const perf = a.object('x-perf', true);
  const maxWorkers = perf?.int('max-workers', { min: 1, max: 65536, optional: true });
  const maxChunk = perf?.int('max-chunk', { min: 0, optional: true });
  perf?.bool('use-copy-range', false);
  perf?.done();
  const discardSource = a.bool('discard-source', false)!;
  // QEMU sets these only on a copy-before-write node of blockdev-add; a backup job's own
  // filter (a fleecing job with sync=none, say) needs them as much.
  const onCbwError = a.enumOf('x-shear-on-cbw-error', ['break-guest-write', 'break-snapshot'] as const, 'break-guest-write')!;
  const cbwTimeoutSec = a.int('x-shear-cbw-timeout', { min: 0, fallback: 0 })!;
  // QEMU hands every I/O error to the error policy; retrying first is Shear's, and opt-in.
  // The bound only keeps the back-off (doubling per attempt) finite.
  const retries = a.int('x-shear-retries', { min: 0, max: 10, fallback: 0 })!;
  a.done();
  ctx.jobs.checkNewId(jobId);
  const source = lookupNode(ctx, device);
  const target = lookupNode(ctx, targetName);
  const driver = await BackupJob.create(ctx.graph, ctx.pool, {
    source,
    target,
    sync,
    bitmap,
    bitmapMode,
    compress,
    onSourceError,
    onTargetError,
    filterNodeName,
    maxWorkers,
    maxChunk,
    speed,
    discardSource,
    onCbwError,
    cbwTimeoutSec,
    retries,
    onRetry: (r) =>
      ctx.log.warn({ evt: 'job.retry', job: jobId, node: device, offset: r.offset, bytes: r.bytes, attempt: r.attempt, of: retries, err: r.error }, 'retrying a failed copy range'),
    emit: (event, data) => ctx.emit(event, data),
  });
  let job: Job;
  try {
    job = ctx.jobs.create(jobId, driver, { autoFinalize, autoDismiss, speed }, jobTxn);
  } catch (err) {
    await driver.discardUnstarted();
    throw err;
  }
  ctx.log.info({ evt: 'job.created', job: jobId, node: device, sync }, 'backup job created');
  tx.add({
    commit: () => job.start(),
    abort: () => {
      ctx.jobs.discard(job);
      void driver.discardUnstarted();
    },
  });
}

export function registerJobCommands(reg: CommandRegistry, ctx: DaemonContext): void {
  const byId = (args: Record<string, unknown>, key = 'id') => {
    const a = new ArgReader(args);
    const id = a.string(key);
    return { a, id };
  };
  const jobVerb = (name: string, fn: (job: Job) => unknown) =>
    reg.register(name, async (args) => {
      const { a, id } = byId(args);
      a.done();
      await fn(ctx.jobs.get(id));
      return {};
    });
  jobVerb('job-pause', (j) => j.pause());
  jobVerb('job-resume', (j) => j.resume());
  jobVerb('job-cancel', (j) => j.cancel());
  jobVerb('job-complete', (j) => j.complete());
  jobVerb('job-finalize', (j) => j.finalize());
  jobVerb('job-dismiss', (j) => j.dismiss());
  reg.register('query-jobs', (args) => {
    new ArgReader(args).done();
    return ctx.jobs.queryJobs();
  });

  // The older block-job-* family names the job `device` (or `id` for finalize/dismiss) and
  // reports a missing job as DeviceNotActive.
  const blockJobVerb = (name: string, key: string, fn: (job: Job, a: ArgReader) => unknown) =>
    reg.register(name, async (args) => {
      const { a, id } = byId(args, key);
      const job = ctx.jobs.getBlockJob(id);
      await fn(job, a);
      return {};
    });
  blockJobVerb('block-job-set-speed', 'device', (j, a) => {
    const speed = a.int('speed', { min: 0 })!;
    a.done();
    j.setSpeed(speed);
  });
  blockJobVerb('block-job-cancel', 'device', (j, a) => {
    a.bool('force', false);
    a.done();
    j.cancel();
  });
  blockJobVerb('block-job-pause', 'device', (j, a) => {
    a.done();
    j.pause();
  });
  blockJobVerb('block-job-resume', 'device', (j, a) => {
    a.done();
    j.resume();
  });
  blockJobVerb('block-job-complete', 'device', (j, a) => {
    a.done();
    j.complete();
  });
  blockJobVerb('block-job-finalize', 'id', (j, a) => {
    a.done();
    return j.finalize();
  });
  blockJobVerb('block-job-dismiss', 'id', (j, a) => {
    a.done();
    j.dismiss();
  });
  reg.register('query-block-jobs', (args) => {
    new ArgReader(args).done();
    return ctx.jobs.queryBlockJobs();
  });
}

