import t, { type Test } from 'tap';
import path from 'node:path';
import { startDaemon, jobEnd, type DaemonHandle } from '../lib/daemon.js';
import { makeRawImage } from '../lib/images.js';

const MiB = 2 ** 20;

/**
 * A source whose first read of the copy fails once (blkdebug, `once`), as in iotest 257's
 * intermediate failure but on raw: the error must reach on-source-error unless the job opted
 * into retries with x-shear-retries, and a retried error is counted and logged.
 */
async function setup(t: Test): Promise<DaemonHandle> {
  const dir = t.testdir();
  const disk = path.join(dir, 'disk.raw');
  const tgt = path.join(dir, 'tgt.raw');
  makeRawImage(disk, 4 * MiB, 7);
  makeRawImage(tgt, 4 * MiB, 8);
  const d = await startDaemon(dir, [], { env: { SHEAR_TEST_LOG: 'warn' } });
  t.teardown(() => d.stop());
  await d.cmd('blockdev-add', {
    driver: 'blkdebug',
    'node-name': 'src',
    image: { driver: 'file', filename: disk },
    'inject-error': [{ event: 'read_aio', errno: 5, once: true }],
  });
  await d.cmd('blockdev-add', { driver: 'file', 'node-name': 'tgt', filename: tgt });
  return d;
}

const jobEvents = (d: DaemonHandle) => d.events.filter((e) => e.event.startsWith('BLOCK_JOB_')).map((e) => ({ event: e.event, data: e.data }));

t.test('without x-shear-retries a failed read reaches on-source-error=report: the job fails', async (t) => {
  const d = await setup(t);
  await d.cmd('blockdev-backup', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', 'on-source-error': 'report', 'x-perf': { 'max-workers': 1 } });
  const end = await jobEnd(d, 'j');
  t.same(jobEvents(d), [
    { event: 'BLOCK_JOB_ERROR', data: { device: 'j', operation: 'read', action: 'report' } },
    { event: 'BLOCK_JOB_COMPLETED', data: { device: 'j', type: 'backup', len: 4 * MiB, offset: 0, speed: 0, error: 'Input/output error' } },
  ]);
  t.equal(end.data?.['error'], 'Input/output error');
});

t.test('with x-shear-retries the once-fault is retried, counted in query-jobs and logged', async (t) => {
  const d = await setup(t);
  await d.cmd('blockdev-backup', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', 'auto-dismiss': false, 'x-shear-retries': 2, 'x-perf': { 'max-workers': 1 } });
  const end = await jobEnd(d, 'j');
  t.notOk(end.data?.['error'], 'the retry copied the range');
  t.notOk(d.events.some((e) => e.event === 'BLOCK_JOB_ERROR'), 'a retried error is not a job error');
  const jobs = await d.cmd<Record<string, unknown>[]>('query-jobs');
  t.equal(jobs[0]?.['x-shear-retried'], 1, 'query-jobs counts the retried error');
  t.equal(jobs[0]?.['status'], 'concluded');
  t.match(d.stderr(), /"evt":"job.retry".*"job":"j".*"node":"src"/, 'the retry is logged with job and node');
  await d.cmd('job-dismiss', { id: 'j' });
});

t.test('a bad x-shear-retries is a GenericError and starts nothing', async (t) => {
  const d = await setup(t);
  for (const bad of [-1, 1.5, 'three', 11]) {
    await t.rejects(d.cmd('blockdev-backup', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', 'x-shear-retries': bad }), { qmpClass: 'GenericError', desc: /x-shear-retries/ }, `x-shear-retries ${JSON.stringify(bad)}`);
  }
  t.same(await d.cmd('query-jobs'), [], 'no job was created');
  const nodes = await d.cmd<{ 'node-name': string; drv: string }[]>('query-named-block-nodes');
  t.notOk(nodes.some((n) => n.drv === 'copy-before-write'), 'no filter was left behind');
});
