// npm run bench -- cbw-latency
// The latency a guest write sees while a backup copies in the background at full speed: 64 KiB
// writes at a fixed rate through the copy-before-write filter, with no backup (baseline), with a
// backup whose copy-before-write tasks go ahead of background tasks (Shear's lanes), and with
// the lanes turned off (copy-before-write queued behind background work, as a FIFO would).
import { mkdirSync, rmSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';
import { BlockGraph, FileDriver, PERM_ALL, PERM_CONSISTENT_READ, PERM_WRITE, filterChildPerms } from '@shear/block';
import { CopyWorkerPool } from '@shear/block-copy';
import { BackupJob, JobManager } from '@shear/jobs';
import { randomImage, sparseFile } from './lib/images.js';
import { machineFacts, printMachineFacts } from './lib/machine.js';
import { LatencyRuns } from './lib/measure.js';
import { printTable, writeResults, type Row } from './lib/report.js';

const MiB = 2 ** 20;
const IMAGE_BYTES = Number(process.env['BENCH_IMAGE_MIB'] ?? 1024) * MiB;
const WRITE_BYTES = 64 * 1024;
const WRITES_PER_SEC = Number(process.env['BENCH_WRITE_RATE'] ?? 200);
const RUNS = Number(process.env['BENCH_RUNS'] ?? 3);
const workDir = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '.work', 'cbw-latency');

type Mode = 'no backup' | 'backup, copy-before-write lane' | 'backup, no lanes (FIFO)';

async function run(mode: Mode, pool: CopyWorkerPool): Promise<{ latencies: number[]; backupMiBps: number }> {
  const src = path.join(workDir, 'src.raw');
  const dst = path.join(workDir, 'dst.raw');
  sparseFile(dst, IMAGE_BYTES);
  const g = new BlockGraph();
  const info = { name: 'file', childPerms: filterChildPerms };
  const source = await g.addNode({ name: 'src', info, open: () => FileDriver.open(src) });
  const target = await g.addNode({ name: 'dst', info, open: () => FileDriver.open(dst) });
  const guest = g.attachUser({ kind: 'user', name: 'guest' }, source, PERM_WRITE | PERM_CONSISTENT_READ, PERM_ALL);
  const jobs = new JobManager(() => {});
  let job;
  let t0 = 0;
  let backupDone = 0;
  if (mode !== 'no backup') {
    const driver = await BackupJob.create(g, pool, { source, target, sync: 'full' });
    if (mode === 'backup, no lanes (FIFO)') {
      // Copy-before-write tasks wait behind every background task already queued.
      const copy = driver.copyBeforeWrite.copy as unknown as { copyRange: (o: number, b: number) => Promise<void> };
      const bg = driver.copyBeforeWrite.copy;
      copy.copyRange = async (o, b) => {
        while (bg.inFlightTasks > 0 && bg.copyBitmap.nextDirtyArea(o, Math.min(IMAGE_BYTES, o + b))) await new Promise((r) => setTimeout(r, 1));
        return Object.getPrototypeOf(bg).copyRange.call(bg, o, b);
      };
    }
    job = jobs.create('bench', driver);
    t0 = performance.now();
    job.start();
    void job.concluded.then(() => (backupDone = performance.now()));
  }
  const latencies: number[] = [];
  const data = Buffer.alloc(WRITE_BYTES, 0xab);
  const interval = 1000 / WRITES_PER_SEC;
  const start = performance.now();
  const deadline = start + 4000;
  let x = 12345;
  for (let i = 0; performance.now() < deadline && (!job || !backupDone); i++) {
    const due = start + i * interval;
    const wait = due - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    const offset = (x % (IMAGE_BYTES / WRITE_BYTES)) * WRITE_BYTES;
    const w0 = performance.now();
    await guest.write(offset, data);
    latencies.push(performance.now() - w0);
  }
  let backupMiBps = 0;
  if (job) {
    await job.concluded;
    backupMiBps = IMAGE_BYTES / MiB / ((backupDone - t0) / 1000);
  }
  g.detachUser(guest);
  await g.removeNode('src');
  await g.removeNode('dst');
  return { latencies, backupMiBps };
}

async function main() {
  const facts = machineFacts(workDir.replace(/cbw-latency$/, ''));
  printMachineFacts(facts);
  mkdirSync(workDir, { recursive: true });
  console.log(`image ${IMAGE_BYTES / MiB} MiB random data; guest: ${WRITE_BYTES / 1024} KiB writes at ${WRITES_PER_SEC}/s (${(WRITES_PER_SEC * WRITE_BYTES) / MiB} MiB/s); ${RUNS} runs each, medians\n`);
  randomImage(path.join(workDir, 'src.raw'), IMAGE_BYTES);
  const pool = new CopyWorkerPool();
  const rows: Row[] = [];
  try {
    const modes: Mode[] = ['no backup', 'backup, copy-before-write lane', 'backup, no lanes (FIFO)'];
    const results = new LatencyRuns<Mode>();
    for (let r = 0; r < RUNS; r++) {
      for (const m of modes) {
        const { latencies, backupMiBps } = await run(m, pool);
        results.add(m, latencies, backupMiBps);
      }
    }
    for (const m of modes) {
      const a = results.summary(m);
      rows.push({
        ...results.row(m, 'no backup'),
        'backup MiB/s': m === 'no backup' ? '-' : a.extra,
      });
    }
  } finally {
    await pool.destroy();
    rmSync(workDir, { recursive: true, force: true });
  }
  printTable(rows);
  console.log(`\nresults: ${writeResults('cbw-latency', { machine: facts, imageBytes: IMAGE_BYTES, writeBytes: WRITE_BYTES, writesPerSec: WRITES_PER_SEC, runs: RUNS, rows })}`);
}

await main();
