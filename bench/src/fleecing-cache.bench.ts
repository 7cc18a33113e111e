// npm run bench -- fleecing-cache
// The write latency a guest sees while its disk is backed up to a slow target (nbdkit with its
// rate filter, a fraction of the disk's speed), three ways:
//   direct      copy-before-write straight to the slow target (a push backup),
//   temp image  QEMU's approach: copy-before-write to a local temporary image, and a backup of
//               the point-in-time view to the slow target (with discard-source),
//   RAM+disk    Shear's fleecing cache: RAM first, then a local spill file, drained the same way,
//   small cache the same with a cache far smaller than what the guest overwrites (BENCH_SMALL_CACHE_KIB,
//               half RAM, half file) and cbw-timeout 30 s: when it is full, writes wait for the
//               drain to free space instead of failing.
// Also the total backup time of each, writes that waited for cache space, writes that failed.
// One table, ratios against `direct`.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';
import { BlockGraph, FileDriver, PERM_ALL, PERM_CONSISTENT_READ, PERM_WRITE, filterChildPerms, type BlockNode } from '@shear/block';
import { CopyWorkerPool } from '@shear/block-copy';
import { FLEECING_CACHE_INFO, FleecingCache, SNAPSHOT_ACCESS_INFO, SnapshotAccess } from '@shear/fleecing';
import { BackupJob, JobManager } from '@shear/jobs';
import { NbdClientDriver } from '@shear/nbd';
import { randomImage, sparseFile } from './lib/images.js';
import { machineFacts, printMachineFacts } from './lib/machine.js';
import { LatencyRuns } from './lib/measure.js';
import { printTable, writeResults, type Row } from './lib/report.js';

const MiB = 2 ** 20;
const IMAGE_BYTES = Number(process.env['BENCH_IMAGE_MIB'] ?? 256) * MiB;
const TARGET_MBIT = Number(process.env['BENCH_TARGET_MBIT'] ?? 160); // about 20 MB/s
const WRITE_BYTES = 64 * 1024;
const WRITES_PER_SEC = Number(process.env['BENCH_WRITE_RATE'] ?? 100);
const CACHE_RAM_BYTES = Number(process.env['BENCH_CACHE_RAM_MIB'] ?? 64) * MiB;
const SMALL_CACHE_BYTES = Number(process.env['BENCH_SMALL_CACHE_KIB'] ?? 1024) * 1024;
const RUNS = Number(process.env['BENCH_RUNS'] ?? 3);
const WRITE_SECONDS = Number(process.env['BENCH_WRITE_SECONDS'] ?? 5);
const workDir = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '.work', 'fleecing-cache');
const INFO = { name: 'file', childPerms: filterChildPerms };

type Mode = 'direct' | 'temp image' | 'RAM+disk cache' | 'small cache, waits';

async function startSlowTarget(sock: string, file: string): Promise<ChildProcess> {
  sparseFile(file, IMAGE_BYTES);
  const p = spawn('nbdkit', ['-f', '-U', sock, '--filter=rate', 'file', file, `rate=${TARGET_MBIT}M`], { stdio: 'ignore' });
  for (let i = 0; i < 100 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 50));
  return p;
}

async function run(mode: Mode, pool: CopyWorkerPool) {
  const sock = path.join(workDir, 'slow.sock');
  rmSync(sock, { force: true });
  const kit = await startSlowTarget(sock, path.join(workDir, 'slow.raw'));
  const g = new BlockGraph();
  const jobs = new JobManager(() => {});
  try {
    const disk = await g.addNode({ name: 'disk', info: INFO, open: () => FileDriver.open(path.join(workDir, 'src.raw')) });
    const slow = await g.addNode({ name: 'slow', info: { name: 'nbd', childPerms: filterChildPerms }, open: () => NbdClientDriver.connect({ address: { type: 'unix', path: sock }, exportName: '' }) });
    const guest = g.attachUser({ kind: 'user', name: 'guest' }, disk, PERM_WRITE | PERM_CONSISTENT_READ, PERM_ALL);
    const t0 = performance.now();
    let backupDone = 0;
    let drain;
    let fleeceDone: Promise<void> = Promise.resolve();
    let cache: FleecingCache | undefined;
    let failed = 0;
    if (mode === 'direct') {
      const job = jobs.create('backup', await BackupJob.create(g, pool, { source: disk, target: slow, sync: 'full' }));
      job.start();
      drain = job;
    } else {
      // Preserve into a local target, export the point in time, back it up to the slow target.
      let local: BlockNode;
      if (mode === 'temp image') {
        sparseFile(path.join(workDir, 'temp.raw'), IMAGE_BYTES);
        local = await g.addNode({ name: 'local', info: INFO, open: () => FileDriver.open(path.join(workDir, 'temp.raw')) });
      } else {
        sparseFile(path.join(workDir, 'spill.raw'), IMAGE_BYTES);
        const spill = await g.addNode({ name: 'spill', info: INFO, open: () => FileDriver.open(path.join(workDir, 'spill.raw')) });
        const sizes = mode === 'small cache, waits' ? { ramBytes: SMALL_CACHE_BYTES / 2, fileBytes: SMALL_CACHE_BYTES / 2 } : { ramBytes: CACHE_RAM_BYTES };
        local = await g.addNode({ name: 'local', info: FLEECING_CACHE_INFO, children: [{ role: 'file', node: spill }], open: async (c) => (cache = new FleecingCache({ length: IMAGE_BYTES, ...sizes, file: c.get('file')! })) });
      }
      const fleece = jobs.create('fleece', await BackupJob.create(g, pool, { source: disk, target: local, sync: 'none', filterNodeName: 'cbw', cbwTimeoutSec: 30 }));
      fleece.start();
      const snap = await g.addNode({ name: 'snap', info: SNAPSHOT_ACCESS_INFO, children: [{ role: 'file', node: g.get('cbw') }], open: async (c) => new SnapshotAccess(c.get('file')!) });
      const job = jobs.create('drain', await BackupJob.create(g, pool, { source: snap, target: slow, sync: 'full', discardSource: true }));
      job.start();
      drain = job;
      fleeceDone = job.concluded.then(async () => {
        fleece.cancel();
        await fleece.concluded;
      });
    }
    void drain.concluded.then(() => (backupDone = performance.now()));
    const latencies: number[] = [];
    const data = Buffer.alloc(WRITE_BYTES, 0xab);
    const interval = 1000 / WRITES_PER_SEC;
    const start = performance.now();
    let x = 4242;
    for (let i = 0; performance.now() - start < WRITE_SECONDS * 1000 && !backupDone; i++) {
      const wait = start + i * interval - performance.now();
      if (wait > 0) await new Promise((r) => setTimeout(r, wait));
      x = (Math.imul(x, 1103515245) + 12345) >>> 0;
      const w0 = performance.now();
      try {
        await guest.write((x % (IMAGE_BYTES / WRITE_BYTES)) * WRITE_BYTES, data);
      } catch {
        failed++;
      }
      latencies.push(performance.now() - w0);
    }
    await drain.concluded;
    await fleeceDone;
    if (drain.error) throw drain.error;
    const seconds = (backupDone - t0) / 1000;
    const waits = cache?.stats.waits ?? 0;
    g.detachUser(guest);
    for (const n of ['snap', 'local', 'spill', 'slow', 'disk']) if (g.find(n)) await g.removeNode(n);
    return { latencies, seconds, waits, failed };
  } finally {
    kit.kill('SIGKILL');
  }
}

async function main() {
  mkdirSync(workDir, { recursive: true });
  const facts = machineFacts(workDir);
  printMachineFacts(facts);
  console.log(`image ${IMAGE_BYTES / MiB} MiB; slow target: nbdkit rate filter at ${TARGET_MBIT} Mbit/s; guest: ${WRITE_BYTES / 1024} KiB writes at ${WRITES_PER_SEC}/s for up to ${WRITE_SECONDS} s; cache RAM ${CACHE_RAM_BYTES / MiB} MiB (small cache ${SMALL_CACHE_BYTES / 1024} KiB); cbw-timeout 30 s; ${RUNS} runs, medians (waits and failures summed over runs)\n`);
  randomImage(path.join(workDir, 'src.raw'), IMAGE_BYTES);
  const pool = new CopyWorkerPool();
  const rows: Row[] = [];
  try {
    const modes: Mode[] = ['direct', 'temp image', 'RAM+disk cache', 'small cache, waits'];
    const acc = new LatencyRuns<Mode>();
    const waited = new Map<Mode, number>();
    const failures = new Map<Mode, number>();
    for (let r = 0; r < RUNS; r++) {
      for (const m of modes) {
        const { latencies, seconds, waits, failed } = await run(m, pool);
        acc.add(m, latencies, seconds);
        waited.set(m, (waited.get(m) ?? 0) + waits);
        failures.set(m, (failures.get(m) ?? 0) + failed);
      }
    }
    const base = acc.summary('direct');
    for (const m of modes) {
      const a = acc.summary(m);
      rows.push({
        ...acc.row(m, 'direct'),
        'backup s': a.extra,
        'backup time vs direct x': a.extra / base.extra,
        'waited for space': waited.get(m) ?? 0,
        'failed writes': failures.get(m) ?? 0,
      });
    }
  } finally {
    await pool.destroy();
    rmSync(workDir, { recursive: true, force: true });
  }
  printTable(rows);
  console.log(`\nresults: ${writeResults('fleecing-cache', { machine: facts, imageBytes: IMAGE_BYTES, targetMbit: TARGET_MBIT, cacheRamBytes: CACHE_RAM_BYTES, runs: RUNS, rows })}`);
}

await main();
