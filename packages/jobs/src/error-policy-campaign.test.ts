import t from 'tap';
import fc from 'fast-check';
import { randomBytes } from 'node:crypto';
import type { BitmapSyncMode } from '@shear/dirty-bitmap';
import type { BackupJob, BlockdevOnError } from './backup-job.js';
import { C, CLUSTERS, SIZE, setup, startBackup, type Errno, type Fault, type FaultyDisk, type Setup } from './test-support.fixture.js';

// One randomised campaign over every error policy of the backup job: read faults on the
// source, write faults on the target, guest writes meanwhile, an operator who clears faults,
// resumes stopped jobs or gives up and cancels; each run is checked against a small model.
// SHEAR_CAMPAIGN_SEED / SHEAR_CAMPAIGN_RUNS replay or lengthen it.

const SEED = Number(process.env['SHEAR_CAMPAIGN_SEED'] ?? 20261122);
const RUNS = Number(process.env['SHEAR_CAMPAIGN_RUNS'] ?? 60);
/** fast-check's counterexample path, printed on failure: replays that one run. */
const PATH = process.env['SHEAR_CAMPAIGN_PATH'];
/** A run that has not concluded by then is cancelled and counted as a defect (it would hang). */
const RUN_DEADLINE_MS = 15_000;

type Op = 'read' | 'write';
type Action = 'report' | 'ignore' | 'stop';
const POLICIES: BlockdevOnError[] = ['report', 'ignore', 'stop', 'enospc', 'auto'];

interface GuestWrite {
  wait: { ticks: number } | { ms: number };
  offset: number;
  bytes: number;
}

interface Scenario {
  sync: 'full' | 'bitmap' | 'incremental';
  bitmapMode: BitmapSyncMode | undefined;
  useBitmap: boolean;
  onSourceError: BlockdevOnError;
  onTargetError: BlockdevOnError;
  faults: { read: Fault | undefined; write: Fault | undefined };
  initialDirty: number[];
  guestWrites: GuestWrite[];
  maxChunk: number;
  /** Under ignore, the operator clears a persistent fault after this many error events... */
  ignoreClearAfter: number;
  /** ...or, under ignore and stop, cancels the job instead of clearing the fault. */
  cancelInstead: boolean;
}

const arbFault = (op: Op): fc.Arbitrary<Fault | undefined> =>
  fc.option(
    fc.record({ op: fc.constant(op), nth: fc.integer({ min: 1, max: 8 }), persistent: fc.boolean(), errno: fc.constantFrom<Errno>('EIO', 'ENOSPC') }),
    { nil: undefined, freq: 4 },
  );

const arbScenario: fc.Arbitrary<Scenario> = fc.record({
  mode: fc.constantFrom(
    { sync: 'full', useBitmap: false, bitmapMode: undefined },
    { sync: 'full', useBitmap: true, bitmapMode: 'on-success' },
    { sync: 'full', useBitmap: true, bitmapMode: 'always' },
    { sync: 'bitmap', useBitmap: true, bitmapMode: 'on-success' },
    { sync: 'bitmap', useBitmap: true, bitmapMode: 'always' },
    { sync: 'bitmap', useBitmap: true, bitmapMode: 'never' },
    { sync: 'incremental', useBitmap: true, bitmapMode: undefined },
  ) as fc.Arbitrary<Pick<Scenario, 'sync' | 'useBitmap' | 'bitmapMode'>>,
  onSourceError: fc.constantFrom(...POLICIES),
  onTargetError: fc.constantFrom(...POLICIES),
  read: arbFault('read'),
  write: arbFault('write'),
  initialDirty: fc.uniqueArray(fc.nat(CLUSTERS - 1), { minLength: 1, maxLength: 24 }),
  guestWrites: fc.array(
    fc.record({
      wait: fc.oneof(fc.record({ ticks: fc.nat(30) }), fc.record({ ms: fc.nat(150) })),
      at: fc.nat(SIZE - 1),
      bytes: fc.integer({ min: 1, max: 2 * C }),
    }),
    { maxLength: 6 },
  ),
  maxChunk: fc.constantFrom(C, 4 * C),
  ignoreClearAfter: fc.integer({ min: 1, max: 2 }),
  cancelInstead: fc.integer({ min: 0, max: 4 }).map((x) => x === 0),
}).map((r) => ({
  ...r.mode,
  onSourceError: r.onSourceError,
  onTargetError: r.onTargetError,
  faults: { read: r.read, write: r.write },
  initialDirty: r.initialDirty,
  guestWrites: r.guestWrites.map((w) => ({ wait: w.wait, bytes: w.bytes, offset: Math.min(w.at, SIZE - w.bytes) })),
  maxChunk: r.maxChunk,
  ignoreClearAfter: r.ignoreClearAfter,
  cancelInstead: r.cancelInstead,
}));

/** QEMU's block_job_error_action: `auto` behaves as `enospc` for block jobs. */
function actionFor(policy: BlockdevOnError, errno: Errno): Action {
  if (policy === 'enospc' || policy === 'auto') return errno === 'ENOSPC' ? 'stop' : 'report';
  return policy;
}

function clustersOf(offset: number, bytes: number): number[] {
  const out: number[] = [];
  for (let c = Math.floor(offset / C); c * C < offset + bytes; c++) out.push(c);
  return out;
}

function bitsOf(s: Setup, name: string): number[] {
  return [...s.src.bitmaps.get(name).bits.dirtyExtents()].flatMap((e) => clustersOf(e.offset, e.bytes));
}

const sorted = (xs: Iterable<number>) => [...new Set(xs)].sort((a, b) => a - b);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const tick = () => new Promise((r) => setImmediate(r));

interface RunResult {
  outcome: 'success' | 'failure' | 'cancel' | 'hung';
  injected: Record<string, number>;
  actions: Action[];
  guestOk: number;
  guestFailed: number;
}

async function runScenario(sc: Scenario): Promise<RunResult> {
  const errors = { read: 0, write: 0 };
  let pendingResume = 0;
  let pendingCancel = false;
  let s!: Setup;
  const sideOf = (op: Op): FaultyDisk => (op === 'read' ? s.disk : s.targets[0]!);
  // The operator reacts to each BLOCK_JOB_ERROR as it is emitted (before the job pauses).
  const onEvent = (event: string, data: Record<string, unknown>) => {
    if (event !== 'BLOCK_JOB_ERROR') return;
    const op = data['operation'] as Op;
    errors[op]++;
    if (data['action'] === 'ignore' && errors[op] >= sc.ignoreClearAfter) {
      if (sc.cancelInstead) pendingCancel = true;
      else sideOf(op).setFault(undefined);
    }
    if (data['action'] === 'stop') {
      if (sc.cancelInstead) pendingCancel = true;
      else {
        sideOf(op).setFault(undefined);
        pendingResume++;
      }
    }
  };
  s = await setup({ onEvent });
  const tg = s.targets[0]!;
  if (sc.useBitmap) s.src.bitmaps.add({ name: 'b0', granularity: C });
  s.src.bitmaps.add({ name: 'track', granularity: C });
  for (const c of sc.initialDirty) await s.guest.write(c * C + (c % 7) * 512, randomBytes(1 + (c % 3) * 4000));
  const snapshot = Buffer.alloc(SIZE);
  await s.disk.mem.read(0, snapshot);
  const bitmapsBefore = s.src.bitmaps.list().length;
  const nodesBefore = s.g.nodes().length;

  const { job, driver } = await startBackup(s, 'j', {
    sync: sc.sync,
    ...(sc.useBitmap ? { bitmap: 'b0' } : {}),
    ...(sc.bitmapMode ? { bitmapMode: sc.bitmapMode } : {}),
    onSourceError: sc.onSourceError,
    onTargetError: sc.onTargetError,
    maxChunk: sc.maxChunk,
  });
  s.disk.setFault(sc.faults.read);
  tg.setFault(sc.faults.write);
  let concluded = false;
  void job.concluded.then(() => (concluded = true));
  job.start();

  // The guest writes in order, at random moments, while the job runs (and after it ends).
  const model = Buffer.from(snapshot);
  const written = new Set<number>();
  let guestOk = 0;
  let guestFailed = 0;
  const guest = (async () => {
    for (const w of sc.guestWrites) {
      if ('ticks' in w.wait) for (let i = 0; i < w.wait.ticks; i++) await tick();
      else await sleep(w.wait.ms);
      const data = randomBytes(w.bytes);
      try {
        await s.guest.write(w.offset, data);
        data.copy(model, w.offset);
        for (const c of clustersOf(w.offset, w.bytes)) written.add(c);
        guestOk++;
      } catch (err) {
        // Only a failed copy-before-write may fail a guest write (on-cbw-error=break-guest-write).
        if ((err as { code?: string }).code !== 'ERR_CBW_FAILED') throw err;
        guestFailed++;
      }
    }
  })();

  let operatorCancelled = false;
  let hung = false;
  const deadline = Date.now() + RUN_DEADLINE_MS;
  while (!concluded) {
    if (pendingCancel || (!hung && Date.now() > deadline)) {
      if (!pendingCancel) hung = true;
      pendingCancel = false;
      try {
        job.cancel();
        operatorCancelled = true;
      } catch {
        // Already failing on its own.
      }
    } else if (pendingResume > 0 && job.status === 'paused') {
      pendingResume--;
      job.resume();
    }
    await sleep(1);
  }
  await guest;
  s.disk.setFault(undefined);
  tg.setFault(undefined);

  // ---- the model ----
  const bad: string[] = [];
  const expect = (ok: boolean, what: string) => {
    if (!ok) bad.push(what);
  };
  const errEvents = s.events.filter((e) => e.event === 'BLOCK_JOB_ERROR');
  const actions = errEvents.map((e) => e.data['action'] as Action);
  const injected: Record<string, number> = {};
  const injectedOn: Record<Op, boolean> = { read: s.disk.injected.length > 0, write: tg.injected.length > 0 };
  for (const i of [...s.disk.injected, ...tg.injected]) {
    const f = sc.faults[i.op]!;
    const k = `${i.op}-${i.errno}-${f.persistent ? 'persistent' : 'once'}`;
    injected[k] = (injected[k] ?? 0) + 1;
  }
  const policyOf = (op: Op) => (op === 'read' ? sc.onSourceError : sc.onTargetError);
  const count = { read: 0, write: 0 };
  for (const e of errEvents) {
    const op = e.data['operation'] as Op;
    const f = sc.faults[op];
    expect(e.data['device'] === 'j', `BLOCK_JOB_ERROR names the job: ${JSON.stringify(e.data)}`);
    expect(f !== undefined && injectedOn[op], `BLOCK_JOB_ERROR for a ${op} while no ${op} fault was injected (${JSON.stringify(e.data)})`);
    if (f) expect(e.data['action'] === actionFor(policyOf(op), f.errno), `${op} ${f.errno} under ${policyOf(op)}: action ${String(e.data['action'])}, want ${actionFor(policyOf(op), f.errno)}`);
    if (op === 'read' || op === 'write') count[op]++;
  }
  const reports = errEvents.filter((e) => e.data['action'] === 'report');
  expect(reports.length <= 1 && (reports.length === 0 || errEvents.at(-1) === reports[0]), 'a report ends the job: at most one, and the last error event');
  for (const op of ['read', 'write'] as const) {
    const f = sc.faults[op];
    if (!f || !injectedOn[op]) continue;
    const other = op === 'read' ? 'write' : 'read';
    const a = actionFor(policyOf(op), f.errno);
    // A job retries nothing unless asked (x-shear-retries): a single EIO surfaces like any fault.
    const want = f.persistent && a === 'ignore' ? sc.ignoreClearAfter : 1;
    // Alone, a fault that surfaces gives exactly its events; after events of the other side
    // (a pause, a back-off, a report) it may surface fewer times, never more.
    if (count[other] === 0 && !operatorCancelled) expect(count[op] === want, `${op} ${f.errno} ${f.persistent ? 'persistent' : 'once'} under ${policyOf(op)}: ${count[op]} error events, want ${want}`);
    else expect(count[op] <= want, `${op}: ${count[op]} error events, at most ${want}`);
  }
  const pauses = s.events.filter((e) => e.event === 'JOB_STATUS_CHANGE' && e.data['status'] === 'paused').length;
  expect(pauses === actions.filter((a) => a === 'stop').length, `each stop pauses the job once, nothing else does (${pauses} pauses, actions ${actions.join(',')})`);

  const last = s.events.filter((e) => e.event === 'BLOCK_JOB_COMPLETED' || e.event === 'BLOCK_JOB_CANCELLED');
  expect(last.length === 1, `one final event (got ${last.map((e) => e.event).join(',')})`);
  let outcome: RunResult['outcome'];
  if (hung) {
    outcome = 'hung';
    bad.push(`the job did not conclude within ${RUN_DEADLINE_MS} ms (status ${job.status})`);
  } else if (reports.length > 0) {
    outcome = 'failure';
    const op = reports[0]!.data['operation'] as Op;
    const errno = sc.faults[op]?.errno;
    const code = errno === 'ENOSPC' ? 'ERR_NO_SPACE' : op === 'read' ? 'ERR_COPY_READ_FAILED' : 'ERR_COPY_WRITE_FAILED';
    expect(last[0]?.event === 'BLOCK_JOB_COMPLETED' && typeof last[0].data['error'] === 'string', 'a reported error completes the job with an error');
    expect(job.error?.code === code, `the job fails with ${code} (got ${job.error?.code})`);
  } else if (operatorCancelled) {
    outcome = 'cancel';
    expect(last[0]?.event === 'BLOCK_JOB_CANCELLED', `a job cancelled by the operator ends with BLOCK_JOB_CANCELLED (got ${last[0]?.event} ${JSON.stringify(last[0]?.data)})`);
  } else {
    outcome = 'success';
    expect(last[0]?.event === 'BLOCK_JOB_COMPLETED' && last[0].data['error'] === undefined, `no error reported, so the job succeeds (got ${JSON.stringify(last[0]?.data)})`);
  }
  // A persistent fault that nobody cleared cannot let the job succeed: its cluster is never
  // copied. (Unless the job ended first, by a report of the other side or a cancel.)
  for (const op of ['read', 'write'] as const) {
    const f = sc.faults[op];
    const endedByOther = operatorCancelled || reports.some((e) => e.data['operation'] !== op);
    if (f?.persistent && injectedOn[op] && !endedByOther) {
      expect(count[op] >= 1, `a persistent ${op} fault surfaces as an error event`);
      if (actionFor(policyOf(op), f.errno) === 'report') expect(outcome === 'failure', `an uncleared persistent ${op} fault under ${policyOf(op)} fails the job`);
    }
  }

  // Bitmaps: the job's by its sync mode and outcome, and a bystander that only records.
  const initial = sorted(sc.initialDirty);
  const copied = tg.written;
  const copySet = sc.sync === 'full' ? Array.from({ length: CLUSTERS }, (_, i) => i) : initial;
  if (sc.useBitmap) {
    const mode = sc.bitmapMode ?? 'on-success';
    const want =
      outcome === 'success'
        ? sorted(mode === 'never' ? [...initial, ...written] : written)
        : sorted(mode === 'always' ? [...copySet.filter((c) => !copied.has(c)), ...written] : [...initial, ...written]);
    const got = bitsOf(s, 'b0');
    expect(JSON.stringify(got) === JSON.stringify(want), `bitmap b0 (${sc.sync}/${mode}, ${outcome}): got [${got}] want [${want}]`);
  }
  const track = bitsOf(s, 'track');
  expect(JSON.stringify(track) === JSON.stringify(sorted([...initial, ...written])), `the recording bitmap holds every write: got [${track}]`);
  expect(s.src.bitmaps.list().length === bitmapsBefore && s.src.bitmaps.info().every((b) => !b.busy), 'no successor left, no bitmap busy');

  // Data: what reached the target is the point in time; all of it on success; the guest's writes are on the disk.
  const target = Buffer.alloc(SIZE);
  await tg.mem.read(0, target);
  if (outcome === 'success') {
    // Exactly the clusters the sync mode asks for reached the target, each as it was at the start.
    expect(JSON.stringify(sorted(copied)) === JSON.stringify(copySet), `the target received exactly the clusters to copy (got [${sorted(copied)}])`);
    if (sc.sync === 'full') expect(target.equals(snapshot), 'the target equals the disk at the start of the job');
  }
  const wrong = [...copied].filter((c) => !target.subarray(c * C, (c + 1) * C).equals(snapshot.subarray(c * C, (c + 1) * C)));
  expect(wrong.length === 0, `clusters copied to the target hold the point in time (wrong: ${wrong})`);
  const disk = Buffer.alloc(SIZE);
  await s.disk.mem.read(0, disk);
  expect(disk.equals(model), 'the disk holds exactly the guest writes that succeeded');

  // Nothing left running.
  expect(s.jobs.list().length === 0, `no job left (${s.jobs.list().map((j) => j.status)})`);
  expect((driver as BackupJob).copyBeforeWrite.copy.inFlightTasks === 0, 'no copy task in flight');
  expect(s.disk.inFlight === 0 && tg.inFlight === 0, 'no I/O in flight');
  expect(s.g.nodes().length === nodesBefore && s.guest.child.name === 'disk', 'the filter is gone');

  if (bad.length > 0) {
    throw new Error(`${bad.join('\n')}\n  actions: [${actions}] injected: ${JSON.stringify(injected)} guest ok/failed: ${guestOk}/${guestFailed}`);
  }
  return { outcome, injected, actions, guestOk, guestFailed };
}

t.test('every error policy, random faults on both sides, guest writes: outcome, events, bitmaps and data follow the model', async (t) => {
  const stats = { runs: 0, outcomes: {} as Record<string, number>, scheduled: {} as Record<string, number>, injected: {} as Record<string, number>, actions: {} as Record<string, number>, policies: {} as Record<string, number>, guestOk: 0, guestFailed: 0 };
  const bump = (m: Record<string, number>, k: string, n = 1) => (m[k] = (m[k] ?? 0) + n);
  const started = Date.now();
  const details = await fc.check(
    fc.asyncProperty(arbScenario, async (sc) => {
      const r = await runScenario(sc);
      stats.runs++;
      bump(stats.outcomes, r.outcome);
      for (const f of [sc.faults.read, sc.faults.write]) if (f) bump(stats.scheduled, `${f.op}-${f.errno}-${f.persistent ? 'persistent' : 'once'}`);
      for (const [k, n] of Object.entries(r.injected)) bump(stats.injected, k, n);
      for (const a of r.actions) bump(stats.actions, a);
      bump(stats.policies, `source:${sc.onSourceError}`);
      bump(stats.policies, `target:${sc.onTargetError}`);
      stats.guestOk += r.guestOk;
      stats.guestFailed += r.guestFailed;
    }),
    { seed: SEED, numRuns: RUNS, endOnFailure: true, ...(PATH ? { path: PATH } : {}) },
  );
  if (details.failed) {
    t.fail(`campaign failed at run ${details.numRuns} (replay: SHEAR_CAMPAIGN_SEED=${SEED} SHEAR_CAMPAIGN_PATH=${details.counterexamplePath})\n${JSON.stringify(details.counterexample, null, 1)}\n${String((details.errorInstance as Error | undefined)?.message ?? details.errorInstance)}`);
  }
  if (!PATH) t.equal(stats.runs, RUNS, `${RUNS} runs, seed ${SEED}`);
  t.comment(`campaign: ${JSON.stringify(stats)} in ${Date.now() - started} ms`);
  // The campaign is only worth something if the faults it schedules happen and every kind of end occurs.
  if (RUNS >= 40 && !PATH) {
    t.ok((stats.outcomes['success'] ?? 0) > 0 && (stats.outcomes['failure'] ?? 0) > 0 && (stats.outcomes['cancel'] ?? 0) > 0, 'successes, failures and cancellations all occurred');
    t.ok(['report', 'ignore', 'stop'].every((a) => (stats.actions[a] ?? 0) > 0), 'every action occurred');
    t.ok(['read-EIO', 'read-ENOSPC', 'write-EIO', 'write-ENOSPC'].every((k) => Object.keys(stats.injected).some((x) => x.startsWith(k))), 'faults of every kind were injected');
  }
});
