import t, { type Test } from 'tap';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { requireTools } from '@shear/testkit';
import type { QmpEvent } from '@shear/qmp';
import { jobEnd, startDaemon, type DaemonHandle } from '../lib/daemon.js';
import { imageBytes } from '../lib/consistency.js';
import { makeRawImage, qemuImg, qemuImgCheck } from '../lib/images.js';

// A randomised campaign over every on-source-error / on-target-error policy through a real
// daemon: blkdebug injects a read error on the source or a write error on the target at a random
// place, the copy runs on worker threads into raw or qcow2 targets, and an operator reacts to
// each BLOCK_JOB_ERROR as the model says. (packages/jobs/src/error-policy-campaign.test.ts runs
// many more scenarios in memory; this one proves the same rules hold end to end.)
// SHEAR_FAULT_SEED / SHEAR_FAULT_RUNS change the seed and the number of runs.

const MiB = 2 ** 20;
const SIZE = 8 * MiB;
const POLICIES = ['report', 'ignore', 'stop', 'enospc', 'auto'] as const;
type Policy = (typeof POLICIES)[number];
const EIO = 5;
const ENOSPC = 28;

let x = Number(process.env['SHEAR_FAULT_SEED'] ?? 20261122) >>> 0;
const rand = (n: number) => {
  x = (Math.imul(x, 1103515245) + 12345) >>> 0;
  return (x >>> 8) % n;
};
const pick = <T>(a: readonly T[]): T => a[rand(a.length)]!;

interface Scenario {
  side: 'source' | 'target';
  errno: number;
  once: boolean;
  /** The sector the fault is bound to (a random point of the copy). */
  sector: number;
  onSource: Policy;
  onTarget: Policy;
  format: 'raw' | 'qcow2';
  workers: number;
  chunk: number;
}

/**
 * Retries a job opts into (x-shear-retries): every other sector, so both paths are covered
 * without drawing from the seeded sequence (which would change every scenario).
 */
const retriesOf = (s: Scenario) => (s.sector % 2 === 0 ? 3 : 0);

/**
 * What the job does with the error, as QEMU's block_job_error_action says: `auto` means `enospc`
 * for block jobs, `enospc` stops on ENOSPC and reports anything else. A single EIO reaches the
 * policy unless the job opted into retries (x-shear-retries): then the retry succeeds.
 */
function expectedAction(s: Scenario): 'none' | 'report' | 'ignore' | 'stop' {
  if (s.once && s.errno === EIO && retriesOf(s) > 0) return 'none';
  return policyAction(s.side === 'source' ? s.onSource : s.onTarget, s.errno);
}

function policyAction(policy: Policy, errno: number): 'report' | 'ignore' | 'stop' {
  if (policy === 'enospc' || policy === 'auto') return errno === ENOSPC ? 'stop' : 'report';
  return policy;
}

/**
 * The disk has holes and zero runs, which the copy skips: a fault there would never fire. So the
 * fault goes into a cluster with data (the source reads it, a raw target gets it written), or,
 * for a qcow2 target, into its file between 512 KiB and 2 MiB: past the header, tables and first
 * refcount block (which a backup may never rewrite), where data clusters go as they are allocated.
 */
function scenario(content: Buffer): Scenario {
  const side = pick(['source', 'target'] as const);
  const format = pick(['raw', 'qcow2'] as const);
  const dataClusters: number[] = [];
  for (let o = 0; o < SIZE; o += 65536) if (content.subarray(o, o + 65536).some((b) => b !== 0)) dataClusters.push(o);
  const sector = side === 'target' && format === 'qcow2' ? (MiB / 2 + rand((3 * MiB) / 2)) / 512 : (pick(dataClusters) + rand(65536)) / 512;
  return {
    side,
    errno: pick([EIO, ENOSPC]),
    once: rand(2) === 0,
    sector: Math.floor(sector),
    onSource: pick(POLICIES),
    onTarget: pick(POLICIES),
    format,
    workers: 1 + rand(4),
    chunk: pick([65536, 262144, 1048576]),
  };
}

const RUNS = Number(process.env['SHEAR_FAULT_RUNS'] ?? 24);
const totals = { runs: 0, completed: 0, failed: 0, cancelled: 0, events: 0 };

t.test(`${RUNS} backups with a fault at a random place, under every error policy, through a daemon`, async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const disk = path.join(dir, 'disk.raw');
  const content = makeRawImage(disk, SIZE, 31);
  const d = await startDaemon(dir, []);
  t.teardown(() => d.stop());
  for (let run = 0; run < RUNS; run++) {
    const s = scenario(content);
    await t.test(`run ${run}: ${JSON.stringify(s)}`, (t) => oneRun(t, d, dir, disk, run, s));
  }
  const r = await d.assertReleased();
  t.same(r.nodes, [], 'every node of every run was released');
  t.comment(`fault campaign: ${totals.runs} runs, ${totals.completed} completed, ${totals.failed} failed, ${totals.cancelled} cancelled, ${totals.events} BLOCK_JOB_ERROR events`);
});

async function oneRun(t: Test, d: DaemonHandle, dir: string, disk: string, run: number, s: Scenario): Promise<void> {
  const fault = { event: s.side === 'source' ? 'read_aio' : 'write_aio', errno: s.errno, sector: s.sector, once: s.once };
  const file = { driver: 'file', filename: disk };
  await d.cmd('blockdev-add', s.side === 'source' ? { driver: 'blkdebug', 'node-name': 'src', 'inject-error': [fault], image: file } : { ...file, 'node-name': 'src' });
  const tgtFile = path.join(dir, `t${run}.${s.format}`);
  qemuImg('create', '-q', '-f', s.format, tgtFile, String(SIZE));
  const proto = { driver: 'file', filename: tgtFile };
  const protoOrFault = s.side === 'target' ? { driver: 'blkdebug', 'inject-error': [fault], image: proto } : proto;
  await d.cmd('blockdev-add', s.format === 'raw' ? { ...protoOrFault, 'node-name': 'tgt' } : { driver: 'qcow2', 'node-name': 'tgt', file: protoOrFault });
  const id = `job${run}`;
  const errors: string[] = [];
  const action = expectedAction(s);
  // The operator: resume a stopped job once; a fault that stays makes it stop again, and then
  // (as after a few ignored errors) the operator gives up and cancels.
  const onEvent = (e: QmpEvent) => {
    if (e.event !== 'BLOCK_JOB_ERROR' || e.data?.['device'] !== id) return;
    errors.push(`${e.data['operation']}:${e.data['action']}`);
    const giveUp = errors.length >= (e.data['action'] === 'stop' ? 2 : 3);
    if (e.data['action'] === 'stop') {
      void d.qmp.waitEvent('JOB_STATUS_CHANGE', (x) => x['id'] === id && x['status'] === 'paused', { timeoutMs: 30_000 })
        .then(() => d.cmd(giveUp ? 'job-cancel' : 'job-resume', { id }))
        .catch(() => {});
    } else if (e.data['action'] === 'ignore' && giveUp) {
      void d.cmd('job-cancel', { id }).catch(() => {});
    }
  };
  d.qmp.on('event', onEvent);
  let completed = false;
  try {
    await d.cmd('blockdev-backup', {
      'job-id': id, device: 'src', target: 'tgt', sync: 'full',
      'on-source-error': s.onSource, 'on-target-error': s.onTarget,
      'x-perf': { 'max-workers': s.workers, 'max-chunk': s.chunk },
      'x-shear-retries': retriesOf(s),
    });
    const end = await jobEnd(d, id, 60_000);
    completed = end.event === 'BLOCK_JOB_COMPLETED' && !end.data?.['error'];
    totals.runs++;
    totals.events += errors.length;
    const op = s.side === 'source' ? 'read' : 'write';
    const late = action === 'none' && s.side === 'target' && s.format === 'qcow2' && errors.length > 0;
    if (action === 'none' && !late) {
      t.same(errors, [], 'a single EIO is absorbed by the retries the job asked for: no error event');
      t.ok(completed, 'and the job completes', { end: end.data });
    } else if (late) {
      // The EIO hit a qcow2 metadata write made by the final flush. A flush is never retried
      // (after a failed fsync a retry can succeed with the data lost): the policy decides.
      const a = policyAction(s.onTarget, EIO);
      t.same(errors, [`write:${a}`], `the EIO came at the final flush: one error, ${a}`);
      if (a === 'report') t.match(end.data?.['error'], /Input\/output|EIO|I\/O/i, 'the job fails with it');
      else t.ok(completed, 'the retry flushes the metadata again and the job completes', { end: end.data });
    } else if (action === 'report') {
      t.same(errors, [`${op}:report`], 'one error, reported, on the faulty side');
      t.equal(end.event, 'BLOCK_JOB_COMPLETED', { end: end.data });
      t.match(end.data?.['error'], s.errno === ENOSPC ? /space|ENOSPC/i : /Input\/output|EIO|I\/O/i, 'the job fails with that error');
    } else if (s.once) {
      t.same(errors, [`${op}:${action}`], `one error, ${action}, then the retry succeeds`);
      t.ok(completed, 'and the job completes');
    } else {
      t.ok(errors.length >= (action === 'stop' ? 2 : 3) && errors.every((e) => e === `${op}:${action}`), `the fault stays: ${action} again and again (${errors.join(' ')})`);
      t.equal(end.event, 'BLOCK_JOB_CANCELLED', 'until the operator cancels');
    }
    if (completed) totals.completed++;
    else if (end.event === 'BLOCK_JOB_CANCELLED') totals.cancelled++;
    else totals.failed++;
  } finally {
    d.qmp.off('event', onEvent);
  }
  await d.cmd('blockdev-del', { 'node-name': 'tgt' });
  await d.cmd('blockdev-del', { 'node-name': 'src' });
  if (s.format === 'qcow2') {
    const check = qemuImgCheck(tgtFile);
    t.equal(check['check-errors'], 0, 'the qcow2 target passes qemu-img check');
    t.notOk(check.corruptions, 'without corruption');
  }
  if (t.passing() && completed) {
    const copy = await imageBytes(tgtFile, s.format, path.join(dir, `t${run}.flat`));
    t.ok(copy.equals(readFileSync(disk)), 'the completed backup equals the disk');
  }
  const left = await d.resources();
  t.same(left.files.filter((f) => f.startsWith(dir)), [], 'the daemon holds no file of the run', { nodes: left.nodes });
}
