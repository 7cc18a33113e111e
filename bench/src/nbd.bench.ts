// npm run bench -- nbd        (or: npm run bench -- nbd --chart bench/results/nbd-X.json)
// Shear's NBD paths against qemu-storage-daemon's, on the same fully allocated random image:
//   1. pull: nbdcopy reads the fleecing export (copy-before-write + snapshot-access) to a local
//      raw file, without and with a guest stand-in writing 64 KiB at 100 MB/s into the live
//      export meanwhile; every pull is compared with the image as it was at the snapshot point;
//   2. push: the daemon's backup job (blockdev-backup sync=full) into a blockdev-add'ed 'nbd'
//      node served by nbdkit with its delay filter (a remote target with latency), at default
//      workers and with x-perf max-workers=1;
//   3. writer latency (p50, p99, max) through the live export: alone, with the fleecing filter
//      active and nobody reading, during a push backup to a local file, during the pull of 1.
// Method as in shared/research/measured-here.md: durable = wall time + fsync(target) from here;
// cold = page cache dropped, warm = source read into the cache first; medians of BENCH_RUNS.
// Daemon start-up and graph set-up are not timed.
//
// The live image is a copy of the pristine image; nothing writes to it before a snapshot point,
// so the snapshot-point content is the pristine image itself, which every pull and push is
// compared with (cmp). After a run with a writer, the clusters it wrote (its offsets are
// reproducible from its seed) are copied back from the pristine image.
//
// Environment: BENCH_IMAGE_GIB (4), BENCH_RUNS (3), BENCH_CACHE cold|warm|both (both),
// BENCH_DIR (bench/.work), BENCH_PARTS (pull,push,latency), BENCH_DAEMONS (shear,qemu),
// BENCH_DELAY_MS (1: nbdkit rdelay/wdelay), BENCH_WRITER_MBPS (100), BENCH_WRITER_SECONDS (3:
// the writer-alone and filter-only windows).
// Quick check: BENCH_IMAGE_GIB=0.25 BENCH_RUNS=1 npm run bench -- nbd
import { closeSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';
import { benchStart, envNumber, type Cache } from './lib/bench-start.js';
import { machineFacts, printMachineFacts, toolVersion } from './lib/machine.js';
import { median, stat } from './lib/measure.js';
import { printTable, writeResultsAndChart, type Row } from './lib/report.js';
import { allocatedBytes, ensureImage, freeDiskBytes, sparseFile, type ImageInfo } from './lib/images.js';
import { CopyFailure, cachedPercent, commandLine, dropCaches, fsyncFile, runCommand, syncAll, verifyCopy, warmFile, type Verdict } from './lib/copy-runner.js';
import { NbdBenchDaemon, type DaemonKind } from './lib/nbd-bench-daemon.js';
import { NbdkitTarget } from './lib/nbdkit-target.js';
import { NbdWriter, PYTHON, writerOffsets, type WriterStats } from './lib/nbd-latency-writer.js';
import { renderChart, type BarPanel, type Stat } from './lib/svg-chart.js';

const GiB = 2 ** 30;
const MiB = 2 ** 20;
const WRITE_BYTES = 65536;
const here = path.dirname(fileURLToPath(import.meta.url));
const CLI = path.resolve(here, '..', '..', 'packages', 'cli', 'dist', 'main.js');

function envList<T extends string>(name: string, fallback: T[], allowed: readonly T[]): T[] {
  const v = process.env[name];
  if (v === undefined || v === '') return fallback;
  const items = v.split(',').map((s) => s.trim()).filter(Boolean);
  for (const i of items) if (!allowed.includes(i as T)) throw new Error(`Invalid ${name} entry "${i}": expected one of ${allowed.join(', ')}`);
  return items as T[];
}

type Part = 'pull' | 'push' | 'latency';
const PARTS = ['pull', 'push', 'latency'] as const;

const IMAGE_GIB = envNumber('BENCH_IMAGE_GIB', 4);
const RUNS = Math.round(envNumber('BENCH_RUNS', 3));
const CACHE_ENV = process.env['BENCH_CACHE'] ?? 'both';
const WORK_DIR = path.resolve(process.env['BENCH_DIR'] ?? path.resolve(here, '..', '.work'));
const PARTS_ON = envList<Part>('BENCH_PARTS', [...PARTS], PARTS);
const DAEMONS = envList<DaemonKind>('BENCH_DAEMONS', ['shear', 'qemu'], ['shear', 'qemu']);
const DELAY_MS = envNumber('BENCH_DELAY_MS', 1, true);
const WRITER_MBPS = envNumber('BENCH_WRITER_MBPS', 100);
const WRITER_SECONDS = envNumber('BENCH_WRITER_SECONDS', 3);
const LATENCY_GOAL_MS = 1;

const toBytes = (gib: number) => Math.max(1, Math.round((gib * GiB) / MiB)) * MiB;
const gib = (b: number) => `${(b / GiB).toFixed(2)} GiB`;
const fmt = (v: number | undefined | null, digits?: number) => (v === undefined || v === null || !Number.isFinite(v) ? '-' : digits !== undefined ? v.toFixed(digits) : v >= 100 ? v.toFixed(0) : v.toFixed(2));
const label = (d: DaemonKind) => (d === 'shear' ? 'Shear' : 'QEMU');

interface Measurement {
  part: Part;
  daemon: DaemonKind;
  /** The daemon's peak RSS (VmHWM before quit). */
  peakRssBytes?: number;
  /** pull: 'no writer' | 'writer' | 'plain export to null:'; push: 'default' | 'max-workers=1'; latency: 'alone' | 'cbw, no reader' | 'push'. */
  variant: string;
  cache: Cache;
  run: number;
  ok: boolean;
  verdict: Verdict | 'NOT RUN' | 'n/a';
  error?: string;
  bytes: number;
  cmdSeconds?: number;
  fsyncSeconds?: number;
  durableSeconds?: number;
  mibPerSec?: number;
  /** blockdev-backup -> BLOCK_JOB_COMPLETED. */
  jobSeconds?: number;
  writer?: WriterStats;
  /** Bytes the fleecing temp file got (clusters copied before writes). */
  tmpAllocatedBytes?: number;
  srcCachedPercent: number;
  loadavg1: number;
  /** Whole-machine CPU busy % (all cores) during the timed window, from /proc/stat. */
  busyPercent?: number;
}

interface Paths { pristine: string; live: string; tmp: string; out: string; target: string; sockets: string }

/** Whole-machine CPU counters (jiffies): busy% over a window = 1 - idle delta / total delta. */
function cpuTimes(): { idle: number; total: number } {
  const f = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
  return { idle: (f[3] ?? 0) + (f[4] ?? 0), total: f.reduce((a, b) => a + b, 0) };
}
function busySince(t0: { idle: number; total: number }): number {
  const t1 = cpuTimes();
  const total = t1.total - t0.total;
  return total > 0 ? 100 * (1 - (t1.idle - t0.idle) / total) : NaN;
}

/** Puts the writer's clusters back from the pristine image (or the whole image when unknown). */
function restoreLive(p: Paths, bytes: number, seed: number, stats: WriterStats | undefined): void {
  if (!stats) {
    copyFileSync(p.pristine, p.live);
    return;
  }
  const offsets = [...new Set(writerOffsets(seed, bytes, WRITE_BYTES, stats.attempted + 1))];
  const buf = Buffer.allocUnsafe(WRITE_BYTES);
  const src = openSync(p.pristine, 'r');
  const dst = openSync(p.live, 'r+');
  try {
    for (const o of offsets) {
      const n = readSync(src, buf, 0, WRITE_BYTES, o);
      for (let done = 0; done < n;) done += writeSync(dst, buf, done, n - done, o + done);
    }
  } finally {
    closeSync(src);
    closeSync(dst);
  }
}

function prepareCache(cache: Cache, file: string): void {
  if (cache === 'cold') dropCaches();
  else {
    syncAll();
    warmFile(file);
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Ctx { p: Paths; bytes: number; seed: number; commands: Map<string, string[]> }

/** Keeps the first full command log of each kind of measurement for the results. */
function remember(ctx: Ctx, key: string, lines: string[]): void {
  if (!ctx.commands.has(key)) ctx.commands.set(key, lines);
}

async function startDaemon(ctx: Ctx, kind: DaemonKind): Promise<NbdBenchDaemon> {
  return NbdBenchDaemon.start({ kind, image: ctx.p.live, socketDir: ctx.p.sockets, shearCli: CLI });
}

/** Part 1 (and part 3's pull row): nbdcopy from the fleecing export, optionally with the writer. */
async function measurePull(ctx: Ctx, m: Measurement, withWriter: boolean): Promise<void> {
  const { p } = ctx;
  sparseFile(p.tmp, ctx.bytes);
  rmSync(p.out, { force: true });
  let writer: NbdWriter | undefined;
  let stats: WriterStats | undefined;
  const d = await startDaemon(ctx, m.daemon);
  try {
    await d.startFleecing(p.tmp);
    prepareCache(m.cache, p.live);
    m.srcCachedPercent = cachedPercent(p.live);
    if (withWriter) writer = await NbdWriter.start({ uri: d.uri('live'), mbps: WRITER_MBPS, blockBytes: WRITE_BYTES, seed: ctx.seed });
    const args = [d.uri('fleece'), p.out];
    remember(ctx, `pull/${m.daemon}`, [d.command, ...d.log, commandLine('nbdcopy', args), ...(withWriter ? [`writer: ${PYTHON} (libnbd) 64 KiB pwrite at ${WRITER_MBPS} MB/s to ${d.uri('live')}`] : [])]);
    const cpu0 = cpuTimes();
    m.loadavg1 = os.loadavg()[0]!;
    writer?.go();
    const r = await runCommand('nbdcopy', args, 10 * 60_000);
    if (writer) {
      const w = writer;
      writer = undefined;
      stats = await w.stop();
      m.writer = stats;
    }
    m.busyPercent = busySince(cpu0);
    if (r.code !== 0) throw new CopyFailure(`${commandLine('nbdcopy', args)} exited with ${r.code ?? r.signal}:\n${(r.stderr + r.stdout).trim().split('\n').slice(-8).join('\n')}`);
    m.fsyncSeconds = fsyncFile(p.out) / 1000;
    m.cmdSeconds = (r.endedAt - r.startedAt) / 1000;
    m.tmpAllocatedBytes = allocatedBytes(p.tmp);
    if (stats?.error) throw new CopyFailure(`The writer failed during the pull: ${stats.error}`);
  } finally {
    await writer?.kill();
    const peak = await d.close();
    if (peak) m.peakRssBytes = peak;
    if (withWriter) restoreLive(p, ctx.bytes, ctx.seed, stats);
  }
  await verify(ctx, m, p.out);
}

/** Diagnostic for part 1: nbdcopy from the plain live export (no filter) to null:, the NBD read path alone. */
async function measureReadToNull(ctx: Ctx, m: Measurement): Promise<void> {
  const d = await startDaemon(ctx, m.daemon);
  try {
    await d.exposeLive();
    prepareCache(m.cache, ctx.p.live);
    m.srcCachedPercent = cachedPercent(ctx.p.live);
    const args = [d.uri('live'), 'null:'];
    remember(ctx, `read-to-null/${m.daemon}`, [d.command, ...d.log, commandLine('nbdcopy', args)]);
    const cpu0 = cpuTimes();
    m.loadavg1 = os.loadavg()[0]!;
    const r = await runCommand('nbdcopy', args, 10 * 60_000);
    m.busyPercent = busySince(cpu0);
    if (r.code !== 0) throw new CopyFailure(`${commandLine('nbdcopy', args)} exited with ${r.code ?? r.signal}:\n${(r.stderr + r.stdout).trim().split('\n').slice(-8).join('\n')}`);
    m.cmdSeconds = (r.endedAt - r.startedAt) / 1000;
    m.fsyncSeconds = 0;
    m.durableSeconds = m.cmdSeconds;
    m.mibPerSec = ctx.bytes / MiB / m.cmdSeconds;
    m.verdict = 'n/a';
    m.ok = true;
  } finally {
    const peak = await d.close();
    if (peak) m.peakRssBytes = peak;
  }
}

/** Part 2: the backup job into nbdkit (with latency) through a blockdev-add'ed 'nbd' node. */
async function measurePush(ctx: Ctx, m: Measurement, maxWorkers: number | undefined): Promise<void> {
  const { p } = ctx;
  sparseFile(p.target, ctx.bytes);
  const nbdkit = await NbdkitTarget.start({ file: p.target, socket: path.join(p.sockets, 'nbdkit.sock'), delayMs: DELAY_MS });
  try {
    const d = await startDaemon(ctx, m.daemon);
    try {
      await d.exposeLive();
      await d.cmd('blockdev-add', { driver: 'nbd', 'node-name': 'tgt', server: { type: 'unix', path: nbdkit.socket } });
      prepareCache(m.cache, p.live);
      m.srcCachedPercent = cachedPercent(p.live);
      const cpu0 = cpuTimes();
      m.loadavg1 = os.loadavg()[0]!;
      const job = await d.backup('tgt', maxWorkers);
      await d.cmd('blockdev-del', { 'node-name': 'tgt' });
      const endedAt = performance.now();
      m.busyPercent = busySince(cpu0);
      m.fsyncSeconds = fsyncFile(p.target) / 1000;
      m.cmdSeconds = (endedAt - job.startedAt) / 1000;
      m.jobSeconds = (job.completedAt - job.startedAt) / 1000;
      remember(ctx, `push/${m.daemon}/${m.variant}`, [nbdkit.command, d.command, ...d.log]);
    } finally {
      const peak = await d.close();
    if (peak) m.peakRssBytes = peak;
    }
  } finally {
    await nbdkit.stop();
  }
  await verify(ctx, m, p.target);
}

/** Part 3: the writer's latency alone, with the fleecing filter only, or during a push backup to a local file. */
async function measureLatency(ctx: Ctx, m: Measurement, mode: 'alone' | 'cbw, no reader' | 'push'): Promise<void> {
  const { p } = ctx;
  let writer: NbdWriter | undefined;
  let stats: WriterStats | undefined;
  const d = await startDaemon(ctx, m.daemon);
  let verifyTarget = false;
  try {
    if (mode === 'cbw, no reader') {
      sparseFile(p.tmp, ctx.bytes);
      await d.startFleecing(p.tmp);
    } else {
      await d.exposeLive();
    }
    if (mode === 'push') {
      sparseFile(p.target, ctx.bytes);
      await d.cmd('blockdev-add', { driver: 'file', 'node-name': 'tgt', filename: p.target });
    }
    prepareCache(m.cache, p.live);
    m.srcCachedPercent = cachedPercent(p.live);
    writer = await NbdWriter.start({ uri: d.uri('live'), mbps: WRITER_MBPS, blockBytes: WRITE_BYTES, seed: ctx.seed });
    const cpu0 = cpuTimes();
    m.loadavg1 = os.loadavg()[0]!;
    let startedAt = performance.now();
    let endedAt: number;
    if (mode === 'push') {
      // The writer starts after the job's point in time (blockdev-backup returned), so the
      // target must equal the image as it was before any write.
      const started = await d.startBackup('tgt');
      writer.go();
      const job = await started.done;
      startedAt = job.startedAt;
      m.jobSeconds = (job.completedAt - job.startedAt) / 1000;
    } else {
      writer.go();
      await sleep(WRITER_SECONDS * 1000);
    }
    const w = writer;
    writer = undefined;
    stats = await w.stop();
    m.writer = stats;
    if (mode === 'push') {
      await d.cmd('blockdev-del', { 'node-name': 'tgt' });
      endedAt = performance.now();
      m.fsyncSeconds = fsyncFile(p.target) / 1000;
      m.cmdSeconds = (endedAt - startedAt) / 1000;
      verifyTarget = true;
    }
    m.busyPercent = busySince(cpu0);
    if (mode === 'cbw, no reader') m.tmpAllocatedBytes = allocatedBytes(p.tmp);
    remember(ctx, `latency/${m.daemon}/${mode}`, [d.command, ...d.log, `writer: ${PYTHON} (libnbd) 64 KiB pwrite at ${WRITER_MBPS} MB/s to ${d.uri('live')}`]);
    if (stats.error) throw new CopyFailure(`The writer failed: ${stats.error}`);
  } finally {
    await writer?.kill();
    const peak = await d.close();
    if (peak) m.peakRssBytes = peak;
    restoreLive(p, ctx.bytes, ctx.seed, stats);
  }
  if (verifyTarget) await verify(ctx, m, p.target);
  else {
    m.verdict = 'n/a';
    m.ok = true;
  }
}

async function verify(ctx: Ctx, m: Measurement, file: string): Promise<void> {
  m.durableSeconds = m.cmdSeconds! + m.fsyncSeconds!;
  m.mibPerSec = ctx.bytes / MiB / m.durableSeconds;
  const v = await verifyCopy(ctx.p.pristine, file, 'raw');
  m.verdict = v.verdict;
  m.ok = v.verdict === 'ok';
  if (!m.ok) m.error = `${file} differs from the snapshot-point content: ${v.detail}`;
  rmSync(file, { force: true });
}

interface Case { part: Part; daemon: DaemonKind; variant: string; cache: Cache; run: (ctx: Ctx, m: Measurement) => Promise<void> }

function plan(caches: Cache[], run: number): Case[] {
  // Shear and QEMU alternate which goes first from run to run, so drift hits both alike.
  const daemons = run % 2 === 1 ? DAEMONS : [...DAEMONS].reverse();
  const cases: Case[] = [];
  const add = (part: Part, variant: string, cs: Cache[], fn: Case['run']) => {
    for (const cache of cs) for (const daemon of daemons) cases.push({ part, daemon, variant, cache, run: fn });
  };
  if (PARTS_ON.includes('pull') || PARTS_ON.includes('latency')) {
    add('pull', 'no writer', PARTS_ON.includes('pull') ? caches : [], (c, m) => measurePull(c, m, false));
    add('pull', 'writer', caches, (c, m) => measurePull(c, m, true));
    add('pull', 'plain export to null:', PARTS_ON.includes('pull') ? caches : [], measureReadToNull);
  }
  if (PARTS_ON.includes('push')) {
    add('push', 'default', caches, (c, m) => measurePush(c, m, undefined));
    add('push', 'max-workers=1', caches, (c, m) => measurePush(c, m, 1));
  }
  if (PARTS_ON.includes('latency')) {
    // Writing alone or through the idle filter depends little on the page cache: one cache state.
    const one: Cache[] = [caches.includes('warm') ? 'warm' : 'cold'];
    add('latency', 'alone', one, (c, m) => measureLatency(c, m, 'alone'));
    add('latency', 'cbw, no reader', one, (c, m) => measureLatency(c, m, 'cbw, no reader'));
    add('latency', 'push', caches, (c, m) => measureLatency(c, m, 'push'));
  }
  return cases;
}

/** Processes other than this bench's using noticeable CPU right now (top's second sample). */
function busyOthers(): string[] {
  try {
    const out = execFileSync('top', ['-b', '-n', '2', '-d', '1', '-w', '200'], { encoding: 'utf8' });
    const last = out.split(/\n(?=top - )/).pop() ?? '';
    const lines = last.split('\n');
    const head = lines.findIndex((l) => /^\s*PID\s/.test(l));
    return lines.slice(head + 1).filter((l) => {
      const f = l.trim().split(/\s+/);
      return f.length >= 12 && Number(f[8]) >= 5 && Number(f[0]) !== process.pid && f[11] !== 'top';
    }).map((l) => { const f = l.trim().split(/\s+/); return `${f[11]} (pid ${f[0]}) ${f[8]}% CPU`; });
  } catch {
    return ['(top not available)'];
  }
}

/** The key of a summary cell. */
const key = (part: Part, variant: string, cache: Cache, daemon: DaemonKind) => `${part}/${variant}/${cache}/${daemon}`;

interface Summary {
  /** MiB/s durable of the good runs. */
  mibps?: Stat;
  p50?: Stat;
  p99?: Stat;
  max?: Stat;
  writerMbps?: number;
  writes?: number;
  verified: string;
  busy?: number;
}

function summarize(ms: Measurement[]): Map<string, Summary> {
  const groups = new Map<string, Measurement[]>();
  for (const m of ms) {
    const k = key(m.part, m.variant, m.cache, m.daemon);
    groups.set(k, [...(groups.get(k) ?? []), m]);
  }
  const out = new Map<string, Summary>();
  for (const [k, g] of groups) {
    const good = g.filter((m) => m.ok);
    const w = good.map((m) => m.writer).filter((x): x is WriterStats => x !== undefined && x.p99Ms !== null);
    const s: Summary = { verified: g[0]!.verdict === 'n/a' ? `${good.length}/${g.length} ran` : `${good.length}/${g.length}` };
    const mib = stat(good.map((m) => m.mibPerSec).filter((v): v is number => v !== undefined));
    if (mib) s.mibps = mib;
    if (w.length) {
      s.p50 = stat(w.map((x) => x.p50Ms!));
      s.p99 = stat(w.map((x) => x.p99Ms!));
      s.max = stat(w.map((x) => x.maxMs!));
      s.writerMbps = median(w.map((x) => x.mbps));
      s.writes = w.reduce((n, x) => n + x.writes, 0);
    }
    const busy = g.map((m) => m.busyPercent).filter((v): v is number => v !== undefined && Number.isFinite(v));
    if (busy.length) s.busy = median(busy);
    out.set(k, s);
  }
  return out;
}

const range = (s: Stat | undefined, digits?: number) => (s ? `${fmt(s.median, digits)} (${fmt(s.min, digits)}-${fmt(s.max, digits)})` : '-');
const ratioOf = (a: Stat | undefined, b: Stat | undefined) => (a && b && b.median > 0 ? a.median / b.median : undefined);

function tables(sum: Map<string, Summary>, caches: Cache[]): { pull: Row[]; push: Row[]; latency: Row[]; goal: Row[] } {
  const get = (part: Part, variant: string, cache: Cache, d: DaemonKind) => sum.get(key(part, variant, cache, d));
  const pull: Row[] = [];
  for (const variant of ['no writer', 'writer', 'plain export to null:']) {
    for (const cache of caches) {
      const s = get('pull', variant, cache, 'shear');
      const q = get('pull', variant, cache, 'qemu');
      if (!s && !q) continue;
      pull.push({
        pull: variant === 'writer' ? `+ writer ${WRITER_MBPS} MB/s` : variant === 'no writer' ? 'no writer' : 'diag: live export -> null: (no filter)',
        cache,
        'Shear MiB/s (min-max)': range(s?.mibps),
        'QEMU MiB/s (min-max)': range(q?.mibps),
        'Shear/QEMU x': fmt(ratioOf(s?.mibps, q?.mibps)),
        'writer p99 ms S / Q': variant === 'writer' ? `${fmt(s?.p99?.median, 3)} / ${fmt(q?.p99?.median, 3)}` : '-',
        'writer MB/s S / Q': variant === 'writer' ? `${fmt(s?.writerMbps, 0)} / ${fmt(q?.writerMbps, 0)}` : '-',
        'verified S / Q': `${s?.verified ?? '-'} / ${q?.verified ?? '-'}`,
      });
    }
  }
  const push: Row[] = [];
  for (const variant of ['default', 'max-workers=1']) {
    for (const cache of caches) {
      const s = get('push', variant, cache, 'shear');
      const q = get('push', variant, cache, 'qemu');
      if (!s && !q) continue;
      push.push({
        'backup job': variant === 'default' ? 'default workers' : 'x-perf max-workers=1',
        cache,
        'Shear MiB/s (min-max)': range(s?.mibps),
        'QEMU MiB/s (min-max)': range(q?.mibps),
        'Shear/QEMU x': fmt(ratioOf(s?.mibps, q?.mibps)),
        'vs own max-workers=1 x S / Q': variant === 'default'
          ? `${fmt(ratioOf(s?.mibps, get('push', 'max-workers=1', cache, 'shear')?.mibps))} / ${fmt(ratioOf(q?.mibps, get('push', 'max-workers=1', cache, 'qemu')?.mibps))}`
          : '-',
        'verified S / Q': `${s?.verified ?? '-'} / ${q?.verified ?? '-'}`,
      });
    }
  }
  const latency: Row[] = [];
  const lrows: Array<{ part: Part; variant: string; name: string }> = [
    { part: 'latency', variant: 'alone', name: 'no backup' },
    { part: 'latency', variant: 'cbw, no reader', name: 'fleecing filter, no reader' },
    { part: 'latency', variant: 'push', name: 'push backup to local file' },
    { part: 'pull', variant: 'writer', name: 'pull (nbdcopy on fleece)' },
  ];
  for (const r of lrows) {
    for (const cache of caches.concat(caches.includes('warm') ? [] : ['warm'])) {
      const s = get(r.part, r.variant, cache, 'shear');
      const q = get(r.part, r.variant, cache, 'qemu');
      if (!s?.p99 && !q?.p99) continue;
      latency.push({
        'writer during': r.name,
        cache,
        'Shear p50/p99/max ms': s?.p99 ? `${fmt(s.p50!.median, 3)} / ${fmt(s.p99.median, 3)} / ${fmt(s.max!.median, 1)}` : '-',
        'QEMU p50/p99/max ms': q?.p99 ? `${fmt(q.p50!.median, 3)} / ${fmt(q.p99.median, 3)} / ${fmt(q.max!.median, 1)}` : '-',
        'p99 Shear/QEMU x': fmt(ratioOf(s?.p99, q?.p99)),
        'Shear p99 range': range(s?.p99, 3),
        'writer MB/s S / Q': `${fmt(s?.writerMbps, 0)} / ${fmt(q?.writerMbps, 0)}`,
        'copy MiB/s S / Q': r.variant === 'push' || r.part === 'pull' ? `${fmt(s?.mibps?.median, 0)} / ${fmt(q?.mibps?.median, 0)}` : '-',
      });
    }
  }
  const goal: Row[] = [];
  for (const cache of caches) {
    const s = get('pull', 'writer', cache, 'shear');
    const q = get('pull', 'writer', cache, 'qemu');
    if (!s?.mibps || !q?.mibps || !s.p99) continue;
    const fastEnough = s.mibps.median >= q.mibps.median;
    const p99Ok = s.p99.median < LATENCY_GOAL_MS;
    goal.push({
      cache,
      'Shear pull / QEMU pull x (with writer)': fmt(s.mibps.median / q.mibps.median),
      'pull >= QEMU': fastEnough ? 'yes' : 'NO',
      'Shear writer p99 ms (worst run)': `${fmt(s.p99.median, 3)} (${fmt(s.p99.max, 3)})`,
      'p99 < 1 ms': p99Ok ? (s.p99.max < LATENCY_GOAL_MS ? 'yes' : 'median yes, not every run') : 'NO',
      'goal holds': fastEnough && p99Ok ? 'yes' : 'NO',
    });
  }
  return { pull, push, latency, goal };
}

interface ChartInput {
  machine: { cpu: string; cores: number; kernel: string };
  date: string;
  config: { imageBytes: number; runs: number; caches: Cache[]; delayMs: number; writerMbps: number };
  stats: Record<string, Summary>;
}

function chart(r: ChartInput): string {
  const get = (part: Part, variant: string, cache: Cache, d: DaemonKind) => r.stats[key(part, variant, cache, d)];
  const colors: Record<DaemonKind, string> = { shear: '#e15759', qemu: '#4e79a7' };
  const daemons: DaemonKind[] = ['shear', 'qemu'];
  const panels: BarPanel[] = [];
  const rowsOf = (items: Array<{ part: Part; variant: string; name: string; caches: Cache[] }>, pick: (s: Summary | undefined) => Stat | undefined, title: string, unit: string) => {
    const rows: string[] = [];
    const cells: Array<Array<Stat | undefined>> = [];
    for (const it of items) {
      for (const cache of it.caches) {
        const vals = daemons.map((d) => pick(get(it.part, it.variant, cache, d)));
        if (vals.every((v) => !v)) continue;
        rows.push(`${it.name}, ${cache}`);
        cells.push(vals);
      }
    }
    if (rows.length) panels.push({ title, rows, unit, series: daemons.map((d, i) => ({ name: label(d), color: colors[d], values: cells.map((c) => c[i]) })) });
  };
  const cs = r.config.caches;
  rowsOf([
    { part: 'pull', variant: 'no writer', name: 'no writer', caches: cs },
    { part: 'pull', variant: 'writer', name: `+ writer ${r.config.writerMbps} MB/s`, caches: cs },
    { part: 'pull', variant: 'plain export to null:', name: 'diag: live export to null:', caches: cs },
  ], (s) => s?.mibps, `1. Pull: nbdcopy from the fleecing export to a raw file (${gib(r.config.imageBytes)})`, 'MiB/s durable (median, whisker min-max)');
  rowsOf([
    { part: 'push', variant: 'default', name: 'default workers', caches: cs },
    { part: 'push', variant: 'max-workers=1', name: 'max-workers=1', caches: cs },
  ], (s) => s?.mibps, `2. Push: backup job to nbdkit, delay ${r.config.delayMs} ms per request (driver=nbd)`, 'MiB/s durable (median, whisker min-max)');
  const toUs = (s: Stat | undefined) => (s ? { median: s.median * 1000, min: s.min * 1000, max: s.max * 1000 } : undefined);
  const lat = [
    { part: 'latency' as Part, variant: 'alone', name: 'no backup', caches: [cs.includes('warm') ? 'warm' : 'cold'] as Cache[] },
    { part: 'latency' as Part, variant: 'cbw, no reader', name: 'filter, no reader', caches: [cs.includes('warm') ? 'warm' : 'cold'] as Cache[] },
    { part: 'latency' as Part, variant: 'push', name: 'push to local file', caches: cs },
    { part: 'pull' as Part, variant: 'writer', name: 'pull (nbdcopy)', caches: cs },
  ];
  // Push rows get a panel of their own: their p99 runs to hundreds of ms and would flatten the rest.
  const isPush = (l: (typeof lat)[number]) => l.variant === 'push';
  rowsOf(lat.filter((l) => !isPush(l)), (s) => toUs(s?.p99), `3a. Writer p99 latency (64 KiB at ${r.config.writerMbps} MB/s; goal < 1000 us when pulled)`, 'p99 write latency, microseconds (median of runs, whisker min-max)');
  rowsOf(lat.filter(isPush), (s) => toUs(s?.p99), '3b. Writer p99 latency during a push backup to a local file', 'p99 write latency, microseconds (median of runs, whisker min-max)');
  rowsOf(lat, (s) => toUs(s?.p50), '3c. Writer p50 latency', 'p50 write latency, microseconds (median of runs, whisker min-max)');
  return renderChart({
    title: 'Shear vs qemu-storage-daemon over NBD: pull, push to a slow target, writer latency',
    subtitle: [
      `${r.machine.cpu}, ${r.machine.cores} cores, Linux ${r.machine.kernel}, ${r.date.slice(0, 16)}Z; ${gib(r.config.imageBytes)} random image; ${r.config.runs} run(s) per case`,
      'durable = wall time + fsync(target); cold = page cache dropped, warm = source cached; every pull and push compared with the snapshot-point content',
    ],
    panels,
    lines: [],
  });
}

/** Where the pristine image lives: the copy benchmark's when it has the wanted size, else our own directory. */
function pristineImage(bytes: number, log: (s: string) => void): ImageInfo {
  let shared = false;
  try {
    const marker = JSON.parse(readFileSync(path.join(WORK_DIR, 'images.json'), 'utf8')) as { images?: { full?: { bytes?: number } } };
    const file = path.join(WORK_DIR, 'full.raw');
    shared = marker.images?.full?.bytes === bytes && existsSync(file) && statSync(file).size === bytes;
  } catch { /* none yet */ }
  // Never resize the copy benchmark's full.raw: other sizes get a directory of their own.
  const dir = shared || !existsSync(path.join(WORK_DIR, 'full.raw')) ? WORK_DIR : path.join(WORK_DIR, 'nbd-images');
  mkdirSync(dir, { recursive: true });
  return ensureImage(dir, 'full', bytes, log);
}

async function main(): Promise<number> {
  const begin = benchStart<ChartInput>('nbd', { cli: CLI, cacheEnv: CACHE_ENV, chart });
  if ('exit' in begin) return begin.exit;
  const { caches } = begin;
  const needTools = ['nbdcopy', 'qemu-storage-daemon', 'cmp', ...(PARTS_ON.includes('push') ? ['nbdkit'] : [])];
  for (const t of needTools) {
    if (toolVersion('sh', ['-c', `command -v ${t}`]) === 'not found') {
      console.error(`nbd bench: ${t} is not installed`);
      return 2;
    }
  }
  if (toolVersion(PYTHON, ['-c', 'import nbd; print(nbd.NBD().get_version())']) === 'not found') {
    console.error(`nbd bench: ${PYTHON} cannot import nbd (install python3-libnbd)`);
    return 2;
  }
  const bytes = toBytes(IMAGE_GIB);
  mkdirSync(WORK_DIR, { recursive: true });
  const runDir = path.join(WORK_DIR, 'nbd-run');
  rmSync(runDir, { recursive: true, force: true });
  mkdirSync(runDir, { recursive: true });
  // live + fleecing temp (partly) + pull output + push target, and maybe a new pristine image.
  const need = bytes * 3.3 + GiB + (existsSync(path.join(WORK_DIR, 'full.raw')) ? 0 : bytes);
  const free = freeDiskBytes(WORK_DIR);
  if (free < need) {
    console.error(`nbd bench: not enough free disk in ${WORK_DIR}: ${gib(free)} free, about ${gib(need)} needed; lower BENCH_IMAGE_GIB`);
    return 2;
  }
  const sockets = mkdtempSync(path.join(os.tmpdir(), 'nbdb-'));
  const facts = machineFacts(WORK_DIR);
  printMachineFacts(facts);
  const versions = {
    'qemu-storage-daemon': toolVersion('qemu-storage-daemon', ['--version']),
    nbdcopy: toolVersion('nbdcopy', ['--version']),
    nbdkit: toolVersion('nbdkit', ['--version']),
    'python3-libnbd': toolVersion(PYTHON, ['-c', 'import nbd; print("libnbd", nbd.NBD().get_version())']),
    shear: toolVersion('git', ['-C', path.dirname(CLI), 'log', '-1', '--format=%h %s']),
  };
  console.log(`tools: ${Object.entries(versions).map(([k, v]) => `${k}: ${v}`).join('; ')}`);
  console.log(`parts ${PARTS_ON.join(',')}; daemons ${DAEMONS.join(',')}; image ${gib(bytes)}; runs ${RUNS}; cache ${caches.join('+')}; nbdkit delay ${DELAY_MS} ms; writer 64 KiB at ${WRITER_MBPS} MB/s (alone/filter windows ${WRITER_SECONDS} s)`);
  console.log('MiB/s = 2^20 bytes/s of image size, durable (wall time + fsync(target)); MB/s = 10^6 bytes/s; latency = each pwrite, python3-libnbd, as the writer sees it');
  const others0 = busyOthers();
  console.log(`other processes using >= 5% CPU now: ${others0.length ? others0.join('; ') : 'none'}\n`);

  const image = pristineImage(bytes, (s) => console.log(s));
  console.log(`pristine image ${image.path}: ${gib(image.bytes)}, ${gib(image.allocatedBytes)} allocated${image.reused ? ' (reused)' : `, generated in ${image.generateSeconds.toFixed(1)} s`}`);
  const p: Paths = {
    pristine: image.path,
    live: path.join(runDir, 'live.raw'),
    tmp: path.join(runDir, 'fleece-tmp.raw'),
    out: path.join(runDir, 'pulled.raw'),
    target: path.join(runDir, 'push-target.raw'),
    sockets,
  };
  copyFileSync(p.pristine, p.live);
  const ctx: Ctx = { p, bytes, seed: 0, commands: new Map() };

  const total = plan(caches, 1).length * RUNS;
  console.log(`${total} timed measurements\n`);
  const measurements: Measurement[] = [];
  const started = Date.now();
  let n = 0;
  let liveCheck = 'not checked';
  try {
    for (let run = 1; run <= RUNS; run++) {
      for (const c of plan(caches, run)) {
        ctx.seed = 0x5eed0100 + n;
        const m: Measurement = { part: c.part, daemon: c.daemon, variant: c.variant, cache: c.cache, run, ok: false, verdict: 'NOT RUN', bytes, srcCachedPercent: NaN, loadavg1: os.loadavg()[0]! };
        try {
          await c.run(ctx, m);
        } catch (err) {
          m.ok = false;
          m.error = err instanceof CopyFailure ? err.message : (err as Error).stack ?? String(err);
        }
        measurements.push(m);
        n++;
        const w = m.writer;
        const status = m.ok ? (m.verdict === 'ok' ? 'verified' : 'ok') : m.verdict === 'NOT RUN' ? 'FAILED' : `VERIFY ${m.verdict}`;
        console.log(`[${n}/${total}] run ${run} ${c.part} ${c.variant} ${c.cache} ${label(c.daemon)}: ${m.mibPerSec !== undefined ? `${fmt(m.mibPerSec)} MiB/s` : ''}${w ? ` writer ${w.writes} writes ${fmt(w.mbps, 0)} MB/s p50 ${fmt(w.p50Ms, 3)} p99 ${fmt(w.p99Ms, 3)} max ${fmt(w.maxMs, 1)} ms` : ''}, load ${m.loadavg1.toFixed(2)}, busy ${fmt(m.busyPercent, 0)}%, ${status}`);
        if (!m.ok) console.error(`\n!!!!!!!! run ${run} ${c.part} ${c.variant} ${c.cache} ${c.daemon}: ${status}\n${m.error}\n!!!!!!!!\n`);
      }
    }
    // Every run started from this state and nothing wrote before its snapshot point: the live
    // image must be back to the pristine content after the last restore.
    const live = await verifyCopy(p.pristine, p.live, 'raw');
    liveCheck = live.verdict === 'ok' ? 'live image equals the pristine image after all restores' : `LIVE IMAGE DIFFERS from the pristine image after the restores: ${live.detail}`;
    console.log(`\n${liveCheck}`);
  } finally {
    rmSync(runDir, { recursive: true, force: true });
    rmSync(sockets, { recursive: true, force: true });
  }
  const wallMinutes = (Date.now() - started) / 60000;
  const others1 = busyOthers();

  const sum = summarize(measurements);
  const t = tables(sum, caches);
  if (t.pull.length) {
    console.log(`\n=== 1. pull: nbdcopy from the fleecing export (copy-before-write + snapshot-access) to a local raw file, ${gib(bytes)} ===`);
    printTable(t.pull);
  }
  if (t.push.length) {
    console.log(`\n=== 2. push: blockdev-backup sync=full into blockdev-add driver=nbd -> nbdkit file plugin, delay filter rdelay=wdelay=${DELAY_MS}ms ===`);
    printTable(t.push);
  }
  if (t.latency.length) {
    console.log(`\n=== 3. writer latency: 64 KiB pwrite at ${WRITER_MBPS} MB/s to the live export (median over runs of each run's percentile) ===`);
    printTable(t.latency);
  }
  if (t.goal.length) {
    console.log(`\n=== goal: Shear's pull at least as fast as QEMU's while the writer's p99 stays under ${LATENCY_GOAL_MS} ms ===`);
    printTable(t.goal);
  }
  const failures = measurements.filter((m) => m.verdict === 'NOT RUN');
  const mismatches = measurements.filter((m) => m.verdict === 'MISMATCH' || m.verdict === 'ERROR');
  const loads = measurements.map((m) => m.loadavg1);
  const busy = measurements.map((m) => m.busyPercent).filter((v): v is number => v !== undefined && Number.isFinite(v));
  console.log(`\n${measurements.length} measurements in ${wallMinutes.toFixed(1)} min: ${measurements.filter((m) => m.verdict === 'ok').length} copies verified identical to the snapshot point, ${mismatches.length} mismatched, ${failures.length} failed`);
  console.log(`noise: 1-min load average before each: median ${fmt(median(loads))}, max ${fmt(Math.max(...loads))}; machine CPU busy during timed windows: median ${fmt(median(busy), 0)}%, max ${fmt(Math.max(...busy), 0)}% (of ${facts.cores} cores; this bench alone uses up to all of them while copying)`);
  console.log(`other processes using >= 5% CPU at the end: ${others1.length ? others1.join('; ') : 'none'}`);

  const stats = Object.fromEntries(sum);
  const results = {
    machine: facts,
    versions,
    config: { imageBytes: bytes, runs: RUNS, caches, parts: PARTS_ON, daemons: DAEMONS, delayMs: DELAY_MS, writerMbps: WRITER_MBPS, writerSeconds: WRITER_SECONDS, writeBytes: WRITE_BYTES, workDir: WORK_DIR, pristine: image.path, wallMinutes },
    commands: Object.fromEntries(ctx.commands),
    tables: t,
    stats,
    noise: { othersAtStart: others0, othersAtEnd: others1, loadavgMedian: median(loads), loadavgMax: Math.max(...loads), busyMedian: median(busy), busyMax: Math.max(...busy) },
    measurements,
    liveCheck,
    failures: failures.length,
    mismatches: mismatches.length,
  };
  writeResultsAndChart('nbd', results, chart);
  if (failures.length || mismatches.length || !liveCheck.startsWith('live image equals')) {
    console.error(`\nnbd bench: ${mismatches.length} MISMATCHED or unverifiable, ${failures.length} FAILED (see !!!!!!!! above); ${liveCheck}`);
    return 1;
  }
  return 0;
}

process.exitCode = await main();
