// npm run bench -- incremental [--free]   (or: npm run bench -- incremental --chart bench/results/incremental-X.json)
// Shear's incremental backup (blockdev-backup sync=bitmap bitmap-mode=on-success in `shear
// daemon`) against QEMU's (the same in qemu-storage-daemon) on the same image and the same
// bitmap, against Shear's own full backup of that image, and against a naive one-thread
// pread/pwrite loop over the dirty extents. Data set as in shared/research/measured-here.md
// (c. incr): a random raw image of BENCH_IMAGE_GIB, 10% of its 64 KiB clusters dirty, uniform
// random, fixed seed.
//
// Each daemon gets its own copy of the image. Per measurement: a fresh daemon with disk0 on its
// copy and a writable NBD export of it; a bitmap (granularity 64 KiB) is added and the dirty
// clusters are written through the export by a python3-libnbd client (seeded data, so both
// copies stay equal and rewriting changes nothing but the bitmap); the bitmap's SHA-256
// (x-debug-block-dirty-bitmap-sha256) must equal the expected one in both daemons; a sparse raw
// target is added; the page cache is dropped (cold) or the image read into it (warm). Timed:
// blockdev-backup -> BLOCK_JOB_COMPLETED, plus fsync(target) from this process (durable).
// Not timed: daemon start-up, bitmap filling, graph setup. Every target is verified: an
// incremental one has the dirty clusters equal to the source and zeroes elsewhere; a full one
// equals the source (cmp).
//
// Environment: BENCH_IMAGE_GIB (4), BENCH_RUNS (3), BENCH_CACHE cold|warm|both (both),
// BENCH_DIR (bench/.work/incremental), BENCH_DIRTY_PERCENT (10), BENCH_SEED (20261121),
// BENCH_ONLY (regex on case ids, e.g. 'shear-incr$|qemu-incr$|shear-full').
// --free deletes the images at the end.
// Quick check: BENCH_IMAGE_GIB=0.5 BENCH_RUNS=1 npm run bench -- incremental
import { closeSync, copyFileSync, existsSync, mkdirSync, openSync, readFileSync, readSync, rmSync, statSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { benchStart, envNumber, type Cache } from './lib/bench-start.js';
import { machineFacts, printMachineFacts, toolVersion } from './lib/machine.js';
import { median, stat } from './lib/measure.js';
import { printTable, writeResultsAndChart, type Row } from './lib/report.js';
import { allocatedBytes, ensureImage, freeDiskBytes, freeImages, type ImageInfo } from './lib/images.js';
import { CopyFailure, cachedPercent, dropCaches, fsyncFile, syncAll, verifyCopy, warmFile, type Verdict } from './lib/copy-runner.js';
import { BlockDaemon, DISK_NODE, EXPORT_NAME, runBackupJob, type DaemonKind } from './lib/incr-block-daemon.js';
import { bitmapSha256, checkIncrementalTarget, chooseDirtyClusters, dirtyExtents } from './lib/incr-dirty-set.js';
import { PYTHON, haveLibnbdPython, writeClustersOverNbd } from './lib/incr-nbd-fill.js';
import { renderChart, type BarPanel, type Stat } from './lib/svg-chart.js';

const GiB = 2 ** 30;
const MiB = 2 ** 20;
const CLUSTER_BYTES = 65536;
const BITMAP = 'b0';
const here = path.dirname(fileURLToPath(import.meta.url));
const CLI = path.resolve(here, '..', '..', 'packages', 'cli', 'dist', 'main.js');

const IMAGE_GIB = envNumber('BENCH_IMAGE_GIB', 4);
const RUNS = Math.round(envNumber('BENCH_RUNS', 3));
const DIRTY_PERCENT = envNumber('BENCH_DIRTY_PERCENT', 10);
const SEED = Math.round(envNumber('BENCH_SEED', 20261121));
const CACHE_ENV = process.env['BENCH_CACHE'] ?? 'both';
const WORK_DIR = path.resolve(process.env['BENCH_DIR'] ?? path.resolve(here, '..', '.work', 'incremental'));
const ONLY = process.env['BENCH_ONLY'] ? new RegExp(process.env['BENCH_ONLY']) : undefined;
const FREE = process.argv.includes('--free');

type Mode = 'incremental' | 'full';

interface Case {
  id: string;
  label: string;
  family: 'shear' | 'qemu' | 'naive';
  mode: Mode;
  /** The daemon that runs the job; absent for the naive loop. */
  daemon?: DaemonKind;
  xPerf?: Record<string, number>;
  daemonArgs?: string[];
}

function cases(): Case[] {
  const shear = (id: string, label: string, mode: Mode, xPerf?: Record<string, number>, daemonArgs?: string[]): Case => ({ id, label, family: 'shear', mode, daemon: 'shear', ...(xPerf ? { xPerf } : {}), ...(daemonArgs ? { daemonArgs } : {}) });
  const qemu = (id: string, label: string, mode: Mode, xPerf?: Record<string, number>): Case => ({ id, label, family: 'qemu', mode, daemon: 'qemu', ...(xPerf ? { xPerf } : {}) });
  return [
    shear('shear-incr', 'Shear incremental (defaults)', 'incremental'),
    shear('shear-incr-chunk64k', 'Shear incr max-chunk=64k', 'incremental', { 'max-chunk': 65536 }),
    shear('shear-incr-mw1', 'Shear incr max-workers=1', 'incremental', { 'max-workers': 1 }),
    shear('shear-incr-mw16', 'Shear incr max-workers=16', 'incremental', { 'max-workers': 16 }),
    shear('shear-incr-w1', 'Shear incr, daemon --workers 1', 'incremental', undefined, ['--workers', '1']),
    shear('shear-incr-w8', 'Shear incr, daemon --workers 8', 'incremental', undefined, ['--workers', '8']),
    qemu('qemu-incr', 'QEMU incremental (64 workers)', 'incremental'),
    qemu('qemu-incr-mw1', 'QEMU incr max-workers=1', 'incremental', { 'max-workers': 1 }),
    { id: 'naive', label: 'naive pread/pwrite loop (node, 1 thread)', family: 'naive', mode: 'incremental' },
    shear('shear-full', 'Shear full backup (sync=full)', 'full'),
    qemu('qemu-full', 'QEMU full backup (sync=full)', 'full'),
  ];
}

/** The data set every measurement shares. */
interface DataSet {
  imageBytes: number;
  totalClusters: number;
  clusters: Uint32Array;
  extents: Array<[number, number]>;
  dirtyBytes: number;
  expectedSha: string;
  emptySha: string;
  images: Record<DaemonKind, string>;
}

interface Measurement {
  caseId: string;
  label: string;
  mode: Mode;
  cache: Cache;
  run: number;
  ok: boolean;
  verdict: Verdict | 'NOT RUN';
  error?: string;
  /** Bytes the rate is computed on: the dirty bytes (incremental) or the image size (full). */
  bytes: number;
  cmdSeconds?: number;
  fsyncSeconds?: number;
  durableSeconds?: number;
  mibPerSec?: number;
  cmdMibPerSec?: number;
  jobLen?: number;
  fillSeconds?: number;
  bitmapAfter?: 'empty' | 'NOT EMPTY' | 'unchecked';
  /** CPU seconds the copier used in the timed window (the daemon's threads, or this process for the loop). */
  cpuSeconds?: number;
  /** The daemon's peak RSS (VmHWM before quit). */
  peakRssBytes?: number;
  srcCachedPercent: number;
  /** Page-cache share of the image right after the timed copy. */
  srcCachedAfterPercent?: number;
  /** A warm run whose image left the page cache meanwhile (someone else dropped caches): not counted, repeated. */
  excluded?: string;
  dstAllocatedBytes?: number;
  loadavg1: number;
}

const TARGET = () => path.join(WORK_DIR, 'target.raw');

function makeSparseTarget(file: string, bytes: number): void {
  rmSync(file, { force: true });
  writeFileSync(file, '');
  truncateSync(file, bytes);
}

/** Warm runs need at least this share of the image cached before and after the copy. */
const WARM_MIN_PERCENT = 95;

/** Drops the page cache (cold) or reads the image into it (warm, re-read if someone else evicted it); returns the cached share. */
function prepareCache(cache: Cache, image: string): number {
  if (cache === 'cold') {
    dropCaches();
    return cachedPercent(image);
  }
  syncAll();
  let pct = 0;
  for (let i = 0; i < 3 && !(pct >= WARM_MIN_PERCENT); i++) {
    warmFile(image);
    pct = cachedPercent(image);
  }
  return pct;
}

function checkWarmAfter(m: Measurement, image: string): void {
  m.srcCachedAfterPercent = cachedPercent(image);
  if (m.cache === 'warm' && (m.srcCachedPercent < WARM_MIN_PERCENT || m.srcCachedAfterPercent < WARM_MIN_PERCENT)) {
    m.excluded = `image only ${m.srcCachedPercent.toFixed(0)}% cached before and ${m.srcCachedAfterPercent.toFixed(0)}% after a warm run: something else evicted it`;
  }
}

/** Adds the bitmap and fills it through the daemon's NBD export; checks its SHA-256. */
async function fillBitmap(d: BlockDaemon, ds: DataSet): Promise<number> {
  await d.qmp.execute('block-dirty-bitmap-add', { node: DISK_NODE, name: BITMAP, granularity: CLUSTER_BYTES });
  const t0 = performance.now();
  await writeClustersOverNbd(d.nbdSocket, EXPORT_NAME, ds.clusters, CLUSTER_BYTES, SEED);
  const seconds = (performance.now() - t0) / 1000;
  const { sha256 } = await d.qmp.execute<{ sha256: string }>('x-debug-block-dirty-bitmap-sha256', { node: DISK_NODE, name: BITMAP });
  if (sha256 !== ds.expectedSha) throw new CopyFailure(`The ${d.kind} daemon's bitmap after the fill has SHA-256 ${sha256}, expected ${ds.expectedSha}`);
  return seconds;
}

async function measureDaemonCase(c: Case, ds: DataSet, cache: Cache, run: number): Promise<Measurement> {
  const image = ds.images[c.daemon!];
  const target = TARGET();
  const m: Measurement = {
    caseId: c.id, label: c.label, mode: c.mode, cache, run, ok: false, verdict: 'NOT RUN',
    bytes: c.mode === 'incremental' ? ds.dirtyBytes : ds.imageBytes, srcCachedPercent: NaN, loadavg1: os.loadavg()[0]!,
  };
  try {
    makeSparseTarget(target, ds.imageBytes);
    const d = await BlockDaemon.start({ kind: c.daemon!, image, workDir: WORK_DIR, shearCli: CLI, ...(c.daemonArgs ? { extraArgs: c.daemonArgs } : {}) });
    try {
      if (c.mode === 'incremental') m.fillSeconds = await fillBitmap(d, ds);
      await d.qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'tgt', filename: target });
      m.srcCachedPercent = prepareCache(cache, image);
      m.loadavg1 = os.loadavg()[0]!;
      const args: Record<string, unknown> = { device: DISK_NODE, target: 'tgt', sync: c.mode === 'incremental' ? 'bitmap' : 'full' };
      if (c.mode === 'incremental') Object.assign(args, { bitmap: BITMAP, 'bitmap-mode': 'on-success' });
      if (c.xPerf) args['x-perf'] = c.xPerf;
      const cpu0 = d.cpuSeconds();
      const job = await runBackupJob(d, args);
      const fsyncMs = fsyncFile(target);
      m.cpuSeconds = d.cpuSeconds() - cpu0;
      checkWarmAfter(m, image);
      m.cmdSeconds = (job.endedAt - job.startedAt) / 1000;
      m.fsyncSeconds = fsyncMs / 1000;
      m.jobLen = job.len;
      if (job.len !== m.bytes) throw new CopyFailure(`The ${c.daemon} job copied len ${job.len}, expected ${m.bytes}`);
      if (c.mode === 'incremental') {
        // bitmap-mode=on-success: a successful job leaves the bitmap empty.
        const { sha256 } = await d.qmp.execute<{ sha256: string }>('x-debug-block-dirty-bitmap-sha256', { node: DISK_NODE, name: BITMAP });
        m.bitmapAfter = sha256 === ds.emptySha ? 'empty' : 'NOT EMPTY';
      }
      await d.qmp.execute('blockdev-del', { 'node-name': 'tgt' });
    } finally {
      const peak = await d.close();
      if (peak) m.peakRssBytes = peak;
    }
    finish(m);
    m.dstAllocatedBytes = allocatedBytes(target);
    await verify(m, c.mode, image, target, ds);
    if (m.bitmapAfter === 'NOT EMPTY') {
      m.ok = false;
      m.error = `${m.error ?? ''}bitmap "${BITMAP}" is not empty after a successful job with bitmap-mode=on-success`;
    }
  } catch (err) {
    m.error = err instanceof CopyFailure ? err.message : (err as Error).stack ?? String(err);
  }
  rmSync(target, { force: true });
  return m;
}

/** The reference: one thread, one synchronous pread + pwrite per dirty extent, in this process. */
async function measureNaive(c: Case, ds: DataSet, cache: Cache, run: number): Promise<Measurement> {
  const image = ds.images.shear;
  const target = TARGET();
  const m: Measurement = { caseId: c.id, label: c.label, mode: c.mode, cache, run, ok: false, verdict: 'NOT RUN', bytes: ds.dirtyBytes, srcCachedPercent: NaN, loadavg1: os.loadavg()[0]! };
  try {
    makeSparseTarget(target, ds.imageBytes);
    const maxExtent = Math.max(...ds.extents.map((e) => e[1]));
    const buf = Buffer.allocUnsafe(maxExtent);
    m.srcCachedPercent = prepareCache(cache, image);
    m.loadavg1 = os.loadavg()[0]!;
    const cpu0 = process.cpuUsage();
    const t0 = performance.now();
    const sfd = openSync(image, 'r');
    try {
      const tfd = openSync(target, 'r+');
      try {
        for (const [offset, bytes] of ds.extents) {
          for (let done = 0; done < bytes;) {
            const n = readSync(sfd, buf, done, bytes - done, offset + done);
            if (n === 0) throw new CopyFailure(`Unexpected end of "${image}" at ${offset + done}`);
            done += n;
          }
          for (let done = 0; done < bytes;) done += writeSync(tfd, buf, done, bytes - done, offset + done);
        }
      } finally {
        closeSync(tfd);
      }
    } finally {
      closeSync(sfd);
    }
    m.cmdSeconds = (performance.now() - t0) / 1000;
    m.fsyncSeconds = fsyncFile(target) / 1000;
    const cpu = process.cpuUsage(cpu0);
    m.cpuSeconds = (cpu.user + cpu.system) / 1e6;
    checkWarmAfter(m, image);
    finish(m);
    m.dstAllocatedBytes = allocatedBytes(target);
    await verify(m, 'incremental', image, target, ds);
  } catch (err) {
    m.error = err instanceof CopyFailure ? err.message : (err as Error).stack ?? String(err);
  }
  rmSync(target, { force: true });
  return m;
}

function finish(m: Measurement): void {
  m.durableSeconds = m.cmdSeconds! + m.fsyncSeconds!;
  m.mibPerSec = m.bytes / MiB / m.durableSeconds;
  m.cmdMibPerSec = m.bytes / MiB / m.cmdSeconds!;
}

async function verify(m: Measurement, mode: Mode, image: string, target: string, ds: DataSet): Promise<void> {
  if (mode === 'incremental') {
    const v = checkIncrementalTarget(image, target, ds.extents, ds.imageBytes);
    m.verdict = v.ok ? 'ok' : 'MISMATCH';
    if (!v.ok) m.error = v.detail;
  } else {
    const v = await verifyCopy(image, target, 'raw');
    m.verdict = v.verdict;
    if (v.verdict !== 'ok') m.error = v.detail;
  }
  m.ok = m.verdict === 'ok';
}

interface ImagesMarker { bytes: number; seed: number; dirtyClusters: number; baseGeneratedAt: number }

/**
 * The two image copies (one per daemon), made from the generated random image and kept while
 * the marker matches. A kept copy may already hold the dirty data; writing it again is a no-op.
 */
function ensureCopies(base: ImageInfo, dirtyClusters: number, log: (s: string) => void): Record<DaemonKind, string> {
  const images = { shear: path.join(WORK_DIR, 'shear.raw'), qemu: path.join(WORK_DIR, 'qemu.raw') };
  const markerFile = path.join(WORK_DIR, 'copies.json');
  const want: ImagesMarker = { bytes: base.bytes, seed: SEED, dirtyClusters, baseGeneratedAt: statSync(base.path).mtimeMs };
  let have: ImagesMarker | undefined;
  try { have = JSON.parse(readFileSync(markerFile, 'utf8')) as ImagesMarker; } catch { /* none */ }
  const fresh = have && JSON.stringify(have) === JSON.stringify(want) && Object.values(images).every((p) => existsSync(p) && statSync(p).size === base.bytes);
  if (!fresh) {
    rmSync(markerFile, { force: true });
    for (const [kind, p] of Object.entries(images)) {
      log(`copying ${base.path} -> ${p} (image for the ${kind} daemon)...`);
      copyFileSync(base.path, p);
    }
    writeFileSync(markerFile, JSON.stringify(want) + '\n');
  }
  return images;
}

const gib = (b: number) => `${(b / GiB).toFixed(2)} GiB`;
const fmt = (v: number | undefined) => (v === undefined || !Number.isFinite(v) ? '-' : v >= 100 ? v.toFixed(0) : v >= 1 ? v.toFixed(2) : v.toFixed(3));

async function main(): Promise<number> {
  const begin = benchStart<ChartInput>('incremental', { cli: CLI, cacheEnv: CACHE_ENV, chart });
  if ('exit' in begin) return begin.exit;
  const { caches } = begin;
  if (!(await haveLibnbdPython())) {
    console.error(`incremental bench: ${PYTHON} cannot import nbd (apt-get install python3-libnbd): it fills the bitmaps through the daemons' NBD exports`);
    return 2;
  }
  if (toolVersion('qemu-storage-daemon', ['--version']) === 'not found') {
    console.error('incremental bench: qemu-storage-daemon is missing (apt-get install qemu-system-common)');
    return 2;
  }
  mkdirSync(WORK_DIR, { recursive: true });

  const imageBytes = Math.max(1, Math.round((IMAGE_GIB * GiB) / CLUSTER_BYTES)) * CLUSTER_BYTES;
  const totalClusters = imageBytes / CLUSTER_BYTES;
  const dirtyCount = Math.floor((totalClusters * DIRTY_PERCENT) / 100);
  const present = (f: string) => existsSync(path.join(WORK_DIR, f)) && statSync(path.join(WORK_DIR, f)).size === imageBytes;
  // Images still to write (base, two copies) + one target + room for the file system.
  const need = ['full.raw', 'shear.raw', 'qemu.raw'].filter((f) => !present(f)).length * imageBytes + imageBytes * 1.05 + GiB;
  const free = freeDiskBytes(WORK_DIR);
  if (free < need) {
    console.error(`incremental bench: not enough free disk in ${WORK_DIR}: ${gib(free)} free, ${gib(need)} needed (base image, two copies, one target + 1 GiB); lower BENCH_IMAGE_GIB or point BENCH_DIR elsewhere`);
    return 2;
  }

  const facts = machineFacts(WORK_DIR);
  printMachineFacts(facts);
  const versions = {
    shear: `packages/cli ${(JSON.parse(readFileSync(path.resolve(CLI, '..', '..', 'package.json'), 'utf8')) as { version: string }).version} (git ${toolVersion('git', ['-C', path.dirname(CLI), 'rev-parse', '--short', 'HEAD'])})`,
    'qemu-storage-daemon': toolVersion('qemu-storage-daemon', ['--version']),
    python3: toolVersion(PYTHON, ['--version']),
    libnbd: toolVersion(PYTHON, ['-c', 'import nbd; print(nbd.NBD().get_version())']),
  };
  console.log(`tools: ${Object.entries(versions).map(([k, v]) => `${k}: ${v}`).join('; ')}`);
  console.log(`1-min load average now: ${os.loadavg()[0]!.toFixed(2)} (others may be running tests on this machine)`);

  const base = ensureImage(WORK_DIR, 'full', imageBytes, (msg) => console.log(msg));
  console.log(`base image ${base.path}: ${gib(base.bytes)} random${base.reused ? ' (reused)' : `, generated in ${base.generateSeconds.toFixed(1)} s`}`);
  const images = ensureCopies(base, dirtyCount, (msg) => console.log(msg));
  const clusters = chooseDirtyClusters(totalClusters, dirtyCount, SEED);
  const extents = dirtyExtents(clusters, CLUSTER_BYTES);
  const ds: DataSet = {
    imageBytes, totalClusters, clusters, extents, dirtyBytes: dirtyCount * CLUSTER_BYTES,
    expectedSha: bitmapSha256(clusters, totalClusters), emptySha: bitmapSha256(new Uint32Array(0), totalClusters), images,
  };
  console.log(`dirty: ${dirtyCount} of ${totalClusters} 64 KiB clusters (${DIRTY_PERCENT}%, uniform random, seed ${SEED}), ${extents.length} extents, ${ds.dirtyBytes} bytes (${(ds.dirtyBytes / MiB).toFixed(1)} MiB)`);
  console.log(`expected bitmap SHA-256 ${ds.expectedSha}`);

  // Fill both copies once and check that they ended equal, so every run compares like with like.
  console.log('\npreparing: filling the bitmap in each daemon once...');
  const fill: Record<string, number> = {};
  for (const kind of ['shear', 'qemu'] as const) {
    const d = await BlockDaemon.start({ kind, image: images[kind], workDir: WORK_DIR, shearCli: CLI });
    try {
      fill[kind] = await fillBitmap(d, ds);
      console.log(`  ${kind}: ${d.command}`);
      console.log(`  ${kind}: ${dirtyCount} clusters written through NBD in ${fill[kind]!.toFixed(2)} s; bitmap SHA-256 matches`);
    } finally {
      await d.close();
    }
  }
  const same = await verifyCopy(images.shear, images.qemu, 'raw');
  if (same.verdict !== 'ok') {
    console.error(`incremental bench: the two images differ after the fill (${same.detail}): the writers did not write the same data`);
    return 1;
  }
  console.log('  the two images are identical after the fill\n');

  let plan = cases();
  if (ONLY) plan = plan.filter((c) => ONLY.test(c.id));
  console.log(`work dir ${WORK_DIR}; runs ${RUNS}; cache ${caches.join('+')}; ${plan.length} cases`);
  console.log('MiB/s = 2^20 bytes/s of the dirty bytes (incremental) or the image size (full); durable = blockdev-backup -> BLOCK_JOB_COMPLETED (or the loop) + fsync(target)');
  console.log('Shear x-perf max-workers = copy tasks in flight (default 2 x worker threads); --workers = worker threads (default: parallelism, at least 4)\n');
  const total = plan.length * caches.length * RUNS;
  const measurements: Measurement[] = [];
  const started = Date.now();
  let n = 0;
  // Cases interleave within each run, so drift on a shared machine hits all of them alike.
  for (const cache of caches) {
    for (let run = 1; run <= RUNS; run++) {
      for (const c of plan) {
        n++;
        for (let attempt = 1; ; attempt++) {
          const m = c.family === 'naive' ? await measureNaive(c, ds, cache, run) : await measureDaemonCase(c, ds, cache, run);
          measurements.push(m);
          const status = m.ok ? 'ok' : m.verdict === 'NOT RUN' ? 'FAILED' : `VERIFY ${m.verdict}`;
          const cpu = m.cpuSeconds !== undefined && c.mode === 'incremental' ? `, CPU ${fmt((m.cpuSeconds * 1e6) / dirtyCount)} us/cluster` : '';
          console.log(`[${n}/${total}] ${cache} run ${run}: ${c.label}: ${fmt(m.mibPerSec)} MiB/s (job only ${fmt(m.cmdMibPerSec)}), ${fmt(m.durableSeconds)} s${cpu}, src cached ${fmt(m.srcCachedPercent)}%/${fmt(m.srcCachedAfterPercent)}%, load ${m.loadavg1.toFixed(2)}, ${status}${m.excluded ? ' (EXCLUDED, repeating)' : ''}`);
          if (!m.ok) console.error(`\n!!!!!!!! ${cache} ${c.id} run ${run}: ${status}\n${m.error}\n!!!!!!!!\n`);
          if (!m.excluded || attempt >= 3) break;
        }
      }
    }
  }
  const wallMinutes = (Date.now() - started) / 60000;

  const rateStats = new Map<string, Stat>();
  const timeStats = new Map<string, Stat>();
  const key = (id: string, cache: string) => `${id}/${cache}`;
  for (const c of plan) {
    for (const cache of caches) {
      const good = measurements.filter((m) => m.caseId === c.id && m.cache === cache && m.ok && !m.excluded);
      const r = stat(good.map((m) => m.mibPerSec!));
      const t = stat(good.map((m) => m.durableSeconds!));
      if (r) rateStats.set(key(c.id, cache), r);
      if (t) timeStats.set(key(c.id, cache), t);
    }
  }
  const summary: Row[] = [];
  for (const mode of ['incremental', 'full'] as const) {
    const rows: Row[] = [];
    for (const c of plan.filter((p) => p.mode === mode)) {
      for (const cache of caches) {
        const all = measurements.filter((m) => m.caseId === c.id && m.cache === cache);
        const ms = all.filter((m) => !m.excluded);
        const good = ms.filter((m) => m.ok);
        const r = rateStats.get(key(c.id, cache));
        const t = timeStats.get(key(c.id, cache));
        const q = rateStats.get(key('qemu-incr', cache));
        const full = timeStats.get(key('shear-full', cache));
        const row: Row = {
          tool: c.label,
          cache,
          [mode === 'incremental' ? 'MiB/s dirty, median (min-max)' : 'MiB/s image, median (min-max)']: r ? `${fmt(r.median)} (${fmt(r.min)}-${fmt(r.max)})` : 'FAILED',
          'job-only MiB/s': fmt(median(good.map((m) => m.cmdMibPerSec!)) || undefined),
          'seconds': fmt(t?.median),
          'x QEMU incr': mode === 'incremental' && r && q ? fmt(r.median / q.median) : '-',
          'time x Shear full': t && full ? fmt(t.median / full.median) : '-',
          [mode === 'incremental' ? 'CPU us/cluster' : 'CPU s']: fmt(median(good.map((m) => (mode === 'incremental' ? (m.cpuSeconds! * 1e6) / dirtyCount : m.cpuSeconds!)).filter(Number.isFinite)) || undefined),
          'src cached %': fmt(median(ms.map((m) => m.srcCachedPercent).filter(Number.isFinite))),
          'dst allocated': good.length ? gib(median(good.map((m) => m.dstAllocatedBytes!))) : '-',
          verified: `${good.length}/${ms.length}${all.length > ms.length ? ` (+${all.length - ms.length} excluded)` : ''}`,
        };
        rows.push(row);
        summary.push({
          caseId: c.id, mode, ...row,
          medianMiBps: r?.median ?? NaN, minMiBps: r?.min ?? NaN, maxMiBps: r?.max ?? NaN,
          medianSeconds: t?.median ?? NaN, minSeconds: t?.min ?? NaN, maxSeconds: t?.max ?? NaN,
        });
      }
    }
    if (rows.length === 0) continue;
    console.log(mode === 'incremental'
      ? `\n=== incremental: ${dirtyCount} dirty 64 KiB clusters (${(ds.dirtyBytes / MiB).toFixed(1)} MiB in ${extents.length} extents) of ${gib(imageBytes)}; rates on the dirty bytes ===`
      : `\n=== full backup of the same ${gib(imageBytes)} image (for the time ratio); rates on the image size ===`);
    printTable(rows);
  }

  // The goals from the issue: Shear incremental >= 1.5x QEMU's rate, <= 0.12x Shear full's time.
  const goals: Row[] = [];
  for (const cache of caches) {
    const s = rateStats.get(key('shear-incr', cache));
    const q = rateStats.get(key('qemu-incr', cache));
    const st = timeStats.get(key('shear-incr', cache));
    const f = timeStats.get(key('shear-full', cache));
    const rateX = s && q ? s.median / q.median : undefined;
    const timeX = st && f ? st.median / f.median : undefined;
    goals.push({
      cache,
      'Shear incr / QEMU incr (goal >= 1.5)': rateX === undefined ? '-' : `${fmt(rateX)} ${rateX >= 1.5 ? 'MET' : 'NOT MET'}`,
      'Shear incr time / Shear full time (goal <= 0.12)': timeX === undefined ? '-' : `${fmt(timeX)} ${timeX <= 0.12 ? 'MET' : 'NOT MET'}`,
    });
  }
  console.log('\n=== goals (Shear incremental with defaults; medians) ===');
  printTable(goals);

  const failures = measurements.filter((m) => m.verdict === 'NOT RUN');
  const mismatches = measurements.filter((m) => m.verdict !== 'NOT RUN' && !m.ok);
  const excluded = measurements.filter((m) => m.excluded);
  if (excluded.length) console.log(`\n${excluded.length} warm runs excluded and repeated: the image left the page cache during the run (another process dropped caches)`);
  const loads = measurements.map((m) => m.loadavg1);
  console.log(`${measurements.length} backups in ${wallMinutes.toFixed(1)} min: ${measurements.length - failures.length - mismatches.length} verified, ${mismatches.length} mismatched, ${failures.length} failed`);
  console.log(`1-min load average before each timed copy: median ${fmt(median(loads))}, max ${fmt(Math.max(...loads))} (this bench alone keeps it near 1; well above means others were busy too)`);

  const results = {
    machine: facts,
    versions,
    config: { imageBytes, clusterBytes: CLUSTER_BYTES, dirtyPercent: DIRTY_PERCENT, seed: SEED, runs: RUNS, caches, workDir: WORK_DIR, only: ONLY?.source ?? null, wallMinutes },
    dataSet: { totalClusters, dirtyClusters: dirtyCount, extents: extents.length, dirtyBytes: ds.dirtyBytes, bitmapSha256: ds.expectedSha, fillSeconds: fill },
    cases: plan.map((c) => ({ id: c.id, label: c.label, mode: c.mode, daemon: c.daemon ?? null, xPerf: c.xPerf ?? null, daemonArgs: c.daemonArgs ?? null })),
    summary,
    goals,
    measurements,
    failures: failures.length,
    mismatches: mismatches.length,
    excluded: excluded.length,
  };
  writeResultsAndChart('incremental', results, chart);

  if (FREE) {
    freeImages(WORK_DIR);
    for (const f of ['shear.raw', 'qemu.raw', 'copies.json']) rmSync(path.join(WORK_DIR, f), { force: true });
    console.log(`images deleted from ${WORK_DIR}`);
  }
  if (failures.length || mismatches.length) {
    console.error(`\nincremental bench: ${mismatches.length} backups MISMATCHED, ${failures.length} FAILED (see !!!!!!!! above)`);
    return 1;
  }
  return 0;
}

interface ChartInput {
  machine: { cpu: string; cores: number; kernel: string };
  date: string;
  config: { runs: number; caches: Cache[]; imageBytes: number; dirtyPercent: number };
  dataSet: { dirtyClusters: number; extents: number; dirtyBytes: number };
  cases: Array<{ id: string; label: string; mode: Mode }>;
  summary: Array<Record<string, unknown>>;
}

/** The SVG for a results object (the one written to JSON), so `--chart FILE.json` can redraw it. */
function chart(r: ChartInput): string {
  const colors: Record<Cache, string> = { cold: '#4e79a7', warm: '#f28e2b' };
  const get = (id: string, cache: string, what: 'MiBps' | 'Seconds'): Stat | undefined => {
    const s = r.summary.find((x) => x['caseId'] === id && x['cache'] === cache);
    const med = s?.[`median${what}`];
    // Times are drawn in ms: the chart labels whole numbers.
    const k = what === 'Seconds' ? 1000 : 1;
    return typeof med === 'number' && Number.isFinite(med) ? { median: med * k, min: Number(s![`min${what}`]) * k, max: Number(s![`max${what}`]) * k } : undefined;
  };
  const panel = (title: string, cs: ChartInput['cases'], what: 'MiBps' | 'Seconds', unit: string): BarPanel => ({
    title, unit, rows: cs.map((c) => c.label),
    series: r.config.caches.map((cache) => ({ name: cache, color: colors[cache], values: cs.map((c) => get(c.id, cache, what)) })),
  });
  const incr = r.cases.filter((c) => c.mode === 'incremental');
  const panels = [
    panel(`Incremental: ${r.dataSet.dirtyClusters} dirty 64 KiB clusters (${(r.dataSet.dirtyBytes / MiB).toFixed(0)} MiB, ${r.dataSet.extents} extents)`, incr, 'MiBps', 'MiB/s of dirty bytes, durable (median, whisker min-max)'),
    panel(`Time: incremental vs full backup of the ${gib(r.config.imageBytes)} image`, [...incr.filter((c) => c.id === 'shear-incr' || c.id === 'qemu-incr'), ...r.cases.filter((c) => c.mode === 'full')], 'Seconds', 'milliseconds, durable (median, whisker min-max)'),
  ].filter((p) => p.rows.length > 0);
  return renderChart({
    title: 'Incremental backup: Shear vs QEMU (blockdev-backup sync=bitmap)',
    subtitle: [
      `${r.machine.cpu}, ${r.machine.cores} cores, Linux ${r.machine.kernel}, ${r.date.slice(0, 16)}Z; ${r.config.runs} run(s) per case; ${r.config.dirtyPercent}% of the clusters dirty, uniform random`,
      'durable = blockdev-backup -> BLOCK_JOB_COMPLETED + fsync(target); cold = page cache dropped, warm = image cached; every target verified',
    ],
    panels,
    lines: [],
  });
}

process.exitCode = await main();
