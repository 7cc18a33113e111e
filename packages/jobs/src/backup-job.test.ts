import t from 'tap';
import { randomBytes } from 'node:crypto';
import { ShearError } from '@shear/base';
import { MemoryDriver } from '@shear/block';
import { checkBackupArgs, errorAction, failedOperation, type BackupJob, type BlockdevOnError } from './backup-job.js';
import { JobTxn } from './job-txn.js';
import { JOB_TRANSITIONS } from './job-states.js';
import { C, INFO, SIZE, type FaultyDisk as Target, eventsOf, setup, startBackup, targetContent } from './test-support.fixture.js';

t.test('the transition and verb tables are QEMU\'s', async (t) => {
  t.same(JOB_TRANSITIONS.running, ['paused', 'ready', 'waiting', 'aborting']);
  t.same(JOB_TRANSITIONS.pending, ['aborting', 'concluded']);
  t.throws(() => checkBackupArgs({ sync: 'bitmap' }), { message: "must provide a valid bitmap name for 'bitmap' sync mode" });
  t.throws(() => checkBackupArgs({ sync: 'incremental', bitmap: 'b', bitmapMode: 'always' }), { message: "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'" });
  t.throws(() => checkBackupArgs({ sync: 'full', bitmap: 'b' }), { message: 'Bitmap sync mode must be given when providing a bitmap' });
  t.throws(() => checkBackupArgs({ sync: 'none', bitmap: 'b', bitmapMode: 'always' }), { message: "sync mode 'none' does not produce meaningful bitmap outputs" });
  t.throws(() => checkBackupArgs({ sync: 'full', bitmap: 'b', bitmapMode: 'never' }), { message: "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'full'" });
  t.throws(() => checkBackupArgs({ sync: 'full', bitmapMode: 'always' }), { message: 'Cannot specify bitmap sync mode without a bitmap' });
  t.same(checkBackupArgs({ sync: 'incremental', bitmap: 'b' }), { sync: 'bitmap', bitmapMode: 'on-success' });
});

t.test('a full backup copies the disk as it was at the start, while the guest writes; events in QEMU order', async (t) => {
  const s = await setup();
  const gate = { open: () => {} };
  s.targets[0]!.gate = new Promise<void>((r) => (gate.open = r));
  const { job } = await startBackup(s, 'job0', {});
  t.equal(s.guest.child.name, job.driver && (job.driver as BackupJob).filterNode.name, 'the guest now writes through the filter');
  job.start();
  // The guest overwrites clusters while the copy is held at the gate.
  const news = randomBytes(3 * C);
  const write = s.guest.write(10 * C, news);
  gate.open();
  await write;
  await job.concluded;
  t.ok((await targetContent(s.targets[0]!)).equals(s.content), 'the target holds the disk as it was at the start');
  const now = Buffer.alloc(3 * C);
  await s.guest.read(10 * C, now);
  t.ok(now.equals(news), 'the guest write reached the disk');
  t.same(eventsOf(s, 'job0'), ['status:created', 'status:running', 'status:waiting', 'status:pending', 'BLOCK_JOB_COMPLETED', 'status:concluded', 'status:null']);
  const completed = s.events.find((e) => e.event === 'BLOCK_JOB_COMPLETED')!.data;
  t.same(completed, { type: 'backup', device: 'job0', len: SIZE, offset: SIZE, speed: 0 });
  t.equal(s.guest.child.name, 'disk', 'the filter is gone again');
  t.equal(s.g.nodes().length, 2);
  t.throws(() => s.jobs.get('job0'), { message: 'Job not found' }, 'dismissed automatically');
});

/** Runs an incremental backup that fails after `copyClusters` clusters were written, or is cancelled. */
async function failedIncremental(mode: 'on-success' | 'never' | 'always', how: 'fail' | 'cancel') {
  const s = await setup();
  const bm = s.src.bitmaps.add({ name: 'b0', granularity: C });
  const dirty = [3, 4, 5, 10, 11, 20, 30, 31, 40, 50];
  for (const c of dirty) await s.guest.write(c * C, randomBytes(100));
  const tg = s.targets[0]!;
  if (how === 'fail') tg.failAfter = 4;
  const gate = { open: () => {} };
  if (how === 'cancel') tg.gate = new Promise<void>((r) => (gate.open = r));
  const { job } = await startBackup(s, 'inc', { sync: 'bitmap', bitmap: 'b0', bitmapMode: mode });
  const during = s.src.bitmaps.info();
  job.start();
  await s.guest.write(60 * C, randomBytes(10)); // a write while the job runs
  if (how === 'cancel') {
    job.cancel();
    gate.open();
  }
  await job.concluded;
  const after = [...s.src.bitmaps.get('b0').bits.dirtyExtents()].flatMap((e) => Array.from({ length: e.bytes / C }, (_, i) => e.offset / C + i));
  return { s, bm, dirty, during, after, tg, job };
}

t.test('bitmap sync modes under failure and cancel leave the bitmap the model says', async (t) => {
  for (const how of ['fail', 'cancel'] as const) {
    for (const mode of ['on-success', 'never', 'always'] as const) {
      const r = await failedIncremental(mode, how);
      // What reached the target was copied, whatever the timing; the rest must be dirty.
      const copied = [...r.tg.written];
      const expected = mode === 'always' ? [...r.dirty.filter((c) => !copied.includes(c)), 60] : [...r.dirty, 60];
      t.same(r.after, expected.sort((a, b) => a - b), `${mode} after ${how}`);
      t.match(r.during, [{ name: 'b0', busy: true, recording: true }, { recording: true, busy: false }], 'frozen (recording through its successor, as QEMU reports it) with an anonymous recording successor while running');
      t.same(r.s.src.bitmaps.info().map((b) => b.busy), [false], 'free again afterwards, no successor left');
      const last = r.s.events.filter((e) => e.event.startsWith('BLOCK_JOB_')).at(-1)!;
      t.equal(last.event, how === 'cancel' ? 'BLOCK_JOB_CANCELLED' : 'BLOCK_JOB_COMPLETED', `${mode}/${how}: final event`);
      if (how === 'fail') t.match(last.data, { error: 'Input/output error' });
    }
  }
});

t.test('a successful incremental leaves only the writes made during the job; never keeps everything', async (t) => {
  for (const mode of ['on-success', 'always', 'never'] as const) {
    const s = await setup();
    s.src.bitmaps.add({ name: 'b0', granularity: C });
    for (const c of [1, 2, 7]) await s.guest.write(c * C, randomBytes(10));
    const { job } = await startBackup(s, 'inc', { sync: 'incremental' === 'incremental' && mode === 'on-success' ? 'incremental' : 'bitmap', bitmap: 'b0', ...(mode === 'on-success' ? {} : { bitmapMode: mode }) });
    job.start();
    await s.guest.write(33 * C, randomBytes(10));
    await job.concluded;
    const left = s.src.bitmaps.get('b0').bits.countBits();
    t.equal(left, mode === 'never' ? 4 : 1, mode);
    const completed = s.events.find((e) => e.event === 'BLOCK_JOB_COMPLETED')!.data;
    t.match(completed, { len: 3 * C, offset: 3 * C }, 'progress counts the dirty clusters, as QEMU reports it');
  }
});

t.test('grouped completion: one failing job cancels the other, and both bitmaps keep their old point in time', async (t) => {
  const s = await setup(2);
  s.src.bitmaps.add({ name: 'a', granularity: C });
  s.src.bitmaps.add({ name: 'b', granularity: C });
  for (const c of [1, 2, 3, 4, 5, 6]) await s.guest.write(c * C, randomBytes(10));
  s.targets[1]!.failAfter = 0;
  const gate = { open: () => {} };
  s.targets[0]!.gate = new Promise<void>((r) => (gate.open = r));
  const txn = new JobTxn();
  const a = await startBackup(s, 'ja', { sync: 'bitmap', bitmap: 'a', bitmapMode: 'on-success', target: 'tgt0' }, { txn });
  const b = await startBackup(s, 'jb', { sync: 'bitmap', bitmap: 'b', bitmapMode: 'on-success', target: 'tgt1' }, { txn });
  a.job.start();
  b.job.start();
  // B fails while A is held at the gate; the transaction then cancels A.
  while (!b.job.bodyDone) await new Promise((r) => setImmediate(r));
  t.equal(b.job.status, 'running', 'B waits for A before the transaction aborts');
  gate.open();
  await Promise.all([a.job.concluded, b.job.concluded]);
  t.equal(s.src.bitmaps.get('a').bits.countBits(), 6);
  t.equal(s.src.bitmaps.get('b').bits.countBits(), 6);
  t.ok(s.events.some((e) => e.event === 'BLOCK_JOB_CANCELLED' && e.data['device'] === 'ja'), 'the healthy job was cancelled');
  t.ok(s.events.some((e) => e.event === 'BLOCK_JOB_COMPLETED' && e.data['device'] === 'jb' && e.data['error']), 'the failing job reports its error');
  t.equal(s.g.nodes().length, 3, 'both filters are gone');
});

t.test('auto-finalize=false waits in pending; cancelling a pending job counts as a failure for its bitmap', async (t) => {
  const s = await setup();
  s.src.bitmaps.add({ name: 'b0', granularity: C });
  await s.guest.write(5 * C, randomBytes(10));
  const { job } = await startBackup(s, 'p', { sync: 'bitmap', bitmap: 'b0', bitmapMode: 'on-success' }, { autoFinalize: false });
  job.start();
  while (job.status !== 'pending') await new Promise((r) => setImmediate(r));
  t.throws(() => job.dismiss(), { message: "Job 'p' in state 'pending' cannot accept command verb 'dismiss'" });
  t.throws(() => job.pause(), { code: 'ERR_JOB_VERB_NOT_ALLOWED' });
  job.cancel();
  await job.concluded;
  t.equal(s.src.bitmaps.get('b0').bits.countBits(), 1, 'the bitmap kept its clusters');
  // And a pending job finalized by hand succeeds.
  const { job: j2 } = await startBackup(s, 'p2', { sync: 'bitmap', bitmap: 'b0', bitmapMode: 'on-success' }, { autoFinalize: false });
  j2.start();
  while (j2.status !== 'pending') await new Promise((r) => setImmediate(r));
  await j2.finalize();
  t.equal(s.src.bitmaps.get('b0').bits.countBits(), 0);
});

t.test('pause, resume, set-speed; on-target-error=stop pauses and a resume retries', async (t) => {
  const s = await setup();
  const tg = s.targets[0]!;
  tg.failAfter = 3;
  const { job } = await startBackup(s, 'st', { onTargetError: 'stop' });
  job.start();
  while (job.status !== 'paused') await new Promise((r) => setImmediate(r));
  t.match(s.events.find((e) => e.event === 'BLOCK_JOB_ERROR')?.data, { device: 'st', operation: 'write', action: 'stop' });
  t.throws(() => job.pause(), { message: 'Job is already paused' });
  tg.failAfter = Infinity;
  job.setSpeed(1 << 30);
  t.equal(job.speed, 1 << 30);
  job.resume();
  t.throws(() => job.resume(), { message: "Can't resume a job that was not paused" });
  await job.concluded;
  t.ok((await targetContent(tg)).equals(s.content), 'the retried backup is complete');
  t.equal(s.events.filter((e) => e.event === 'BLOCK_JOB_COMPLETED').length, 1);
});

t.test('refusals leave nothing behind: busy bitmap, size mismatch, duplicate job id', async (t) => {
  const s = await setup();
  const bm = s.src.bitmaps.add({ name: 'b0', granularity: C });
  bm.setBusy(true);
  await t.rejects(startBackup(s, 'x', { sync: 'bitmap', bitmap: 'b0', bitmapMode: 'always' }), { code: 'ERR_BITMAP_BUSY' });
  bm.setBusy(false);
  const small = await s.g.addNode({ name: 'small', info: INFO, open: async () => new MemoryDriver({ length: C }) });
  await t.rejects(startBackup(s, 'x', { target: small.name }), { message: 'Source and target image have different sizes' });
  t.equal(s.g.nodes().length, 3, 'no filter node was left');
  t.equal(s.guest.child.name, 'disk');
  const { job } = await startBackup(s, 'dup', {});
  await t.rejects(startBackup(s, 'dup', {}), { code: 'ERR_JOB_ID', message: "Job ID 'dup' already in use" });
  job.start();
  await job.concluded;
});

t.test('on-target-error=ignore reports each error and retries without pausing, losing no cluster; enospc reports an EIO', async (t) => {
  const s = await setup(2);
  const [tg, tg2] = s.targets as [Target, Target];
  tg.failAfter = 3;
  const { job } = await startBackup(s, 'ig', { onTargetError: 'ignore' });
  const statuses: string[] = [];
  job.start();
  while (!s.events.some((e) => e.event === 'BLOCK_JOB_ERROR' && e.data['device'] === 'ig')) {
    statuses.push(job.status);
    await new Promise((r) => setImmediate(r));
  }
  t.match(s.events.find((e) => e.event === 'BLOCK_JOB_ERROR')?.data, { device: 'ig', operation: 'write', action: 'ignore' });
  // Still failing: ignore keeps retrying (another error event after the back-off), never pauses.
  while (s.events.filter((e) => e.event === 'BLOCK_JOB_ERROR').length < 2) {
    statuses.push(job.status);
    await new Promise((r) => setTimeout(r, 10));
  }
  tg.failAfter = Infinity;
  await job.concluded;
  t.notOk(statuses.includes('paused'), 'ignore never pauses the job');
  t.ok((await targetContent(tg)).equals(s.content), 'every cluster reached the target once it healed');
  t.equal(s.events.filter((e) => e.event === 'BLOCK_JOB_COMPLETED' && e.data['device'] === 'ig').length, 1);
  t.notOk(s.events.find((e) => e.event === 'BLOCK_JOB_COMPLETED')?.data['error'], 'completed without an error');

  // enospc stops only for no-space errors; an EIO is reported and fails the job.
  tg2.failAfter = 0;
  const { job: j2 } = await startBackup(s, 'en', { onTargetError: 'enospc', target: 'tgt1' });
  j2.start();
  await j2.concluded;
  t.match(s.events.find((e) => e.event === 'BLOCK_JOB_ERROR' && e.data['device'] === 'en')?.data, { operation: 'write', action: 'report' });
  t.match(s.events.find((e) => e.event === 'BLOCK_JOB_COMPLETED' && e.data['device'] === 'en')?.data, { error: /./ });
});

// Regressions found by error-policy-campaign.test.ts.

t.test('error actions as QEMU decides them: auto is enospc for jobs; a source out of space is judged by on-source-error', async (t) => {
  const noSpace = new ShearError('ERR_NO_SPACE', 'full', { op: 'read', errno: 'ENOSPC' });
  const eio = new ShearError('ERR_COPY_READ_FAILED', 'eio', { op: 'read', errno: 'EIO' });
  t.same(['report', 'ignore', 'stop', 'enospc', 'auto'].map((p) => errorAction(p as BlockdevOnError, noSpace)), ['report', 'ignore', 'stop', 'stop', 'stop']);
  t.same(['report', 'ignore', 'stop', 'enospc', 'auto'].map((p) => errorAction(p as BlockdevOnError, eio)), ['report', 'ignore', 'stop', 'report', 'report']);
  t.equal(failedOperation(noSpace), 'read');
  t.equal(failedOperation(new ShearError('ERR_NO_SPACE', 'full', { op: 'write', errno: 'ENOSPC' })), 'write');
  t.equal(failedOperation(new ShearError('ERR_COPY_WRITE_FAILED', 'eio', { op: 'read' })), 'write', 'the copy engine\'s own codes decide first');

  // End to end: ENOSPC while reading the source, on-source-error=auto, on-target-error=report.
  const s = await setup();
  s.disk.setFault({ op: 'read', nth: 2, persistent: false, errno: 'ENOSPC' });
  const { job } = await startBackup(s, 'src', { onSourceError: 'auto', onTargetError: 'report' });
  job.start();
  while (job.status === 'running') await new Promise((r) => setImmediate(r));
  t.match(s.events.find((e) => e.event === 'BLOCK_JOB_ERROR')?.data, { device: 'src', operation: 'read', action: 'stop' });
  t.equal(job.status, 'paused');
  if (job.status === 'paused') job.resume();
  await job.concluded;
  t.ok((await targetContent(s.targets[0]!)).equals(s.content), 'resumed, the backup is complete');
});

t.test('cancelling a job that an error stopped ends it as cancelled, not with the old error', async (t) => {
  const s = await setup();
  s.targets[0]!.setFault({ op: 'write', nth: 2, persistent: true, errno: 'ENOSPC' });
  const { job } = await startBackup(s, 'c', { onTargetError: 'enospc' });
  job.start();
  while (job.status === 'running') await new Promise((r) => setImmediate(r));
  t.equal(job.status, 'paused');
  if (job.status === 'paused') job.cancel();
  await job.concluded;
  t.same(eventsOf(s, 'c').filter((e) => e.startsWith('BLOCK_JOB_')), ['BLOCK_JOB_ERROR', 'BLOCK_JOB_CANCELLED']);
  t.equal(job.error?.code, 'ERR_ABORTED');
});

t.test("a failed 'always' backup keeps the clusters a guest write's copy still held when the job ended", async (t) => {
  const s = await setup();
  const tg = s.targets[0]!;
  s.src.bitmaps.add({ name: 'b0', granularity: C });
  await s.guest.write(3 * C, randomBytes(10));
  let open1!: () => void;
  let open2!: () => void;
  tg.gate = new Promise<void>((r) => (open1 = r));
  tg.setFault({ op: 'write', nth: 1, persistent: true, errno: 'ENOSPC' });
  const { job } = await startBackup(s, 'a', { sync: 'bitmap', bitmap: 'b0', bitmapMode: 'always', maxChunk: C });
  job.start();
  while (tg.inFlight === 0) await new Promise((r) => setImmediate(r)); // the copy of cluster 3 waits at the gate
  // The guest writes cluster 3: its copy-before-write waits for the background copy...
  const write = s.guest.write(3 * C, randomBytes(10)).then(() => 'ok', (e: ShearError) => e.code);
  await new Promise((r) => setImmediate(r));
  // ...which fails (the target is full); the guest's copy takes cluster 3 over and waits in turn.
  tg.gate = new Promise<void>((r) => (open2 = r));
  open1();
  while (job.status === 'running') await new Promise((r) => setImmediate(r));
  open2();
  await job.concluded;
  t.equal(await write, 'ERR_CBW_FAILED', 'the guest write failed with its copy');
  t.same(s.src.bitmaps.get('b0').bits.countBits(), 1, 'cluster 3 was never copied nor written: it is still dirty');
});
