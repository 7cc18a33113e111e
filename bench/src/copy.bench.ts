// npm run bench -- copy [--free]      (or: npm run bench -- copy --chart bench/results/copy-X.json)
// Shear's one-shot copy (shear backup) against qemu-img convert, QEMU's own backup job in
// qemu-storage-daemon, nbdcopy, and cp / dd as the machine's limit, on a fully allocated, a
// half-sparse and (compressed qcow2 targets) a mixed-content raw image. Method as in
// shared/research/measured-here.md: durable time = wall time of the command + an fsync of the
// target from this process; cold = page cache dropped; warm = source read into the cache first.
// Every copy is verified against the source.
//
// Environment: BENCH_IMAGE_GIB (4), BENCH_MIXED_GIB (min(1, image)), BENCH_RUNS (3),
// BENCH_CACHE cold|warm|both (both), BENCH_DIR (bench/.work), BENCH_WORKLOADS (full,sparse,mixed),
// BENCH_ONLY (regex on case ids, e.g. 'shear|qemu-img'). --free deletes the images at the end.
// Quick check: BENCH_IMAGE_GIB=0.25 BENCH_RUNS=1 BENCH_CACHE=warm npm run bench -- copy
import { mkdirSync, readdirSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { benchStart, envNumber, type Cache } from './lib/bench-start.js';
import { machineFacts, printMachineFacts, toolVersion } from './lib/machine.js';
import { median, stat } from './lib/measure.js';
import { printTable, writeResultsAndChart, type Row } from './lib/report.js';
import { allocatedBytes, bytesToGenerate, ensureImage, freeDiskBytes, freeImages, type ImageInfo, type ImageKind } from './lib/images.js';
import { CopyFailure, cachedPercent, dropCaches, fsyncFile, qsdBackup, runCommand, syncAll, timedCommand, verifyCopy, warmFile, type Timed, type Verdict } from './lib/copy-runner.js';
import { renderChart, type BarPanel, type LineChart, type Stat } from './lib/svg-chart.js';

const GiB = 2 ** 30;
const MiB = 2 ** 20;
const here = path.dirname(fileURLToPath(import.meta.url));
const CLI = path.resolve(here, '..', '..', 'packages', 'cli', 'dist', 'main.js');

const IMAGE_GIB = envNumber('BENCH_IMAGE_GIB', 4);
const MIXED_GIB = envNumber('BENCH_MIXED_GIB', Math.min(1, IMAGE_GIB));
const RUNS = Math.round(envNumber('BENCH_RUNS', 3));
const CACHE_ENV = process.env['BENCH_CACHE'] ?? 'both';
const WORK_DIR = path.resolve(process.env['BENCH_DIR'] ?? path.resolve(here, '..', '.work'));
const WORKLOADS = (process.env['BENCH_WORKLOADS'] ?? 'full,sparse,mixed').split(',').map((s) => s.trim()).filter(Boolean) as ImageKind[];
const ONLY = process.env['BENCH_ONLY'] ? new RegExp(process.env['BENCH_ONLY']) : undefined;
const FREE = process.argv.includes('--free');

type Format = 'raw' | 'qcow2';

/** Rounds to whole MiB so every image is a multiple of 64 KiB. */
const toBytes = (gib: number) => Math.max(1, Math.round((gib * GiB) / MiB)) * MiB;

interface Case {
  id: string;
  label: string;
  family: 'shear' | 'qemu' | 'nbd' | 'limit';
  targetFormat: Format;
  /** Shear's worker count, for the scaling chart (undefined for single-task and other tools). */
  workers?: number;
  /** The shell form of the command, for the results. */
  command: string;
  tools: string[];
  /** Creates the target before timing, where the tool needs one to exist. */
  prepare?: (dst: string, bytes: number) => void;
  run: (src: string, dst: string) => Promise<Timed>;
}

function shearCase(id: string, label: string, extra: string[], opts: { workers?: number; format?: Format } = {}): Case {
  const format = opts.format ?? 'raw';
  const args = (src: string, dst: string) => [CLI, 'backup', '--source', src, '--target', dst, '--json', ...(format === 'qcow2' ? ['--target-format', 'qcow2'] : []), ...extra];
  return {
    id, label, family: 'shear', targetFormat: format, ...(opts.workers !== undefined ? { workers: opts.workers } : {}),
    command: `node packages/cli/dist/main.js ${args('$SRC', '$DST').slice(1).join(' ')}`,
    tools: [],
    run: (src, dst) => timedCommand(process.execPath, args(src, dst)),
  };
}

function commandCase(id: string, label: string, family: Case['family'], format: Format, cmd: string, args: (src: string, dst: string) => string[], prepare?: Case['prepare']): Case {
  return {
    id, label, family, targetFormat: format, command: [cmd, ...args('$SRC', '$DST')].join(' '), tools: [cmd],
    ...(prepare ? { prepare } : {}),
    run: (src, dst) => timedCommand(cmd, args(src, dst)),
  };
}

function qsdCase(id: string, label: string, format: Format, opts: { maxWorkers?: number; compress?: boolean }): Case {
  const qmp = { 'job-id': 'bench0', device: 'src', target: 'tgt', sync: 'full', ...(opts.compress ? { compress: true } : {}), ...(opts.maxWorkers ? { 'x-perf': { 'max-workers': opts.maxWorkers } } : {}) };
  return {
    id, label, family: 'qemu', targetFormat: format,
    command: `qemu-storage-daemon + QMP blockdev-add src (file, read-only) / tgt (${format === 'raw' ? 'file' : 'qcow2 on file'}); blockdev-backup ${JSON.stringify(qmp)}; wait BLOCK_JOB_COMPLETED; blockdev-del tgt`,
    tools: ['qemu-storage-daemon', ...(format === 'qcow2' ? ['qemu-img'] : [])],
    prepare: (dst, bytes) => {
      if (format === 'raw') {
        writeFileSync(dst, '');
        truncateSync(dst, bytes);
      } else {
        execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', dst, String(bytes)]);
      }
    },
    run: (src, dst) => qsdBackup({ source: src, target: dst, targetFormat: format, workDir: WORK_DIR, ...opts }),
  };
}

function shearDefaultWorkers(): number {
  const help = execFileSync(process.execPath, [CLI, 'help', 'backup'], { encoding: 'utf8' });
  const m = /--workers N\s+worker threads \(default: (\d+)/.exec(help);
  if (!m) throw new Error(`Cannot find the default worker count in "shear help backup":\n${help}`);
  return Number(m[1]);
}

function rawCases(defaultWorkers: number): Case[] {
  const cases: Case[] = [
    shearCase('shear-default', `shear (default: ${defaultWorkers} workers)`, [], { workers: defaultWorkers }),
    shearCase('shear-single-task', 'shear --single-task', ['--single-task']),
  ];
  for (const w of [1, 2, 4, 8]) if (w !== defaultWorkers) cases.push(shearCase(`shear-w${w}`, `shear --workers ${w}`, ['--workers', String(w)], { workers: w }));
  cases.push(
    commandCase('qemu-img-m1', 'qemu-img convert -m 1', 'qemu', 'raw', 'qemu-img', (s, d) => ['convert', '-f', 'raw', '-O', 'raw', '-m', '1', s, d]),
    commandCase('qemu-img-m16-W', 'qemu-img convert -m 16 -W', 'qemu', 'raw', 'qemu-img', (s, d) => ['convert', '-f', 'raw', '-O', 'raw', '-m', '16', '-W', s, d]),
    commandCase('qemu-img-m16-W-tnone', 'qemu-img convert -m 16 -W -t none', 'qemu', 'raw', 'qemu-img', (s, d) => ['convert', '-f', 'raw', '-O', 'raw', '-m', '16', '-W', '-t', 'none', s, d]),
    qsdCase('qsd-backup', 'QEMU backup job (64 workers)', 'raw', {}),
    qsdCase('qsd-backup-mw1', 'QEMU backup job max-workers=1', 'raw', { maxWorkers: 1 }),
    // A local-file destination is created and truncated by nbdcopy itself, so no --target-is-zero.
    commandCase('nbdcopy', 'nbdcopy (defaults)', 'nbd', 'raw', 'nbdcopy', (s, d) => [s, d]),
    commandCase('cp', 'cp --sparse=auto', 'limit', 'raw', 'cp', (s, d) => ['--sparse=auto', s, d]),
    commandCase('dd', 'dd bs=4M', 'limit', 'raw', 'dd', (s, d) => [`if=${s}`, `of=${d}`, 'bs=4M', 'status=none']),
  );
  return cases;
}

function compressCases(defaultWorkers: number): Case[] {
  const c = ['--compress'];
  const cases: Case[] = [
    shearCase('shear-default', `shear --compress (default: ${defaultWorkers} workers)`, c, { workers: defaultWorkers, format: 'qcow2' }),
    shearCase('shear-single-task', 'shear --compress --single-task', [...c, '--single-task'], { format: 'qcow2' }),
  ];
  for (const w of [1, 2]) if (w !== defaultWorkers) cases.push(shearCase(`shear-w${w}`, `shear --compress --workers ${w}`, [...c, '--workers', String(w)], { workers: w, format: 'qcow2' }));
  cases.push(
    commandCase('qemu-img-c', 'qemu-img convert -c -O qcow2', 'qemu', 'qcow2', 'qemu-img', (s, d) => ['convert', '-c', '-f', 'raw', '-O', 'qcow2', s, d]),
    qsdCase('qsd-backup-compress', 'QEMU backup job compress=true', 'qcow2', { compress: true }),
  );
  return cases;
}

interface Measurement {
  workload: ImageKind;
  caseId: string;
  label: string;
  cache: Cache;
  run: number;
  ok: boolean;
  verdict: Verdict | 'NOT RUN';
  error?: string;
  bytes: number;
  cmdSeconds?: number;
  fsyncSeconds?: number;
  durableSeconds?: number;
  mibPerSec?: number;
  cmdMibPerSec?: number;
  /** Peak RSS of the copying process (GNU time) or daemon (VmHWM). */
  peakRssBytes?: number;
  srcCachedPercent: number;
  dstAllocatedBytes?: number;
  loadavg1: number;
  report?: Record<string, unknown>;
}

function cleanTargets(dir: string): void {
  for (const f of readdirSync(dir)) if (/^\.?out\.(raw|qcow2)/.test(f)) rmSync(path.join(dir, f), { force: true });
}

async function measureOnce(workload: ImageKind, image: ImageInfo, c: Case, cache: Cache, run: number): Promise<Measurement> {
  const dst = path.join(WORK_DIR, `out.${c.targetFormat}`);
  cleanTargets(WORK_DIR);
  c.prepare?.(dst, image.bytes);
  if (cache === 'cold') dropCaches();
  else {
    syncAll();
    warmFile(image.path);
  }
  const m: Measurement = {
    workload, caseId: c.id, label: c.label, cache, run, ok: false, verdict: 'NOT RUN', bytes: image.bytes,
    srcCachedPercent: cachedPercent(image.path), loadavg1: os.loadavg()[0]!,
  };
  try {
    const t = await c.run(image.path, dst);
    const fsyncMs = fsyncFile(dst);
    m.cmdSeconds = (t.endedAt - t.startedAt) / 1000;
    m.fsyncSeconds = fsyncMs / 1000;
    m.durableSeconds = m.cmdSeconds + m.fsyncSeconds;
    m.mibPerSec = image.bytes / MiB / m.durableSeconds;
    m.cmdMibPerSec = image.bytes / MiB / m.cmdSeconds;
    if (t.report) m.report = t.report;
    if (t.peakRssBytes) m.peakRssBytes = t.peakRssBytes;
    m.dstAllocatedBytes = allocatedBytes(dst);
    const v = await verifyCopy(image.path, dst, c.targetFormat);
    m.verdict = v.verdict;
    m.ok = v.verdict === 'ok';
    if (!m.ok) m.error = v.detail;
  } catch (err) {
    m.error = err instanceof CopyFailure ? err.message : (err as Error).stack ?? String(err);
  }
  cleanTargets(WORK_DIR);
  return m;
}

/** The tool's own view of its speed: Shear's JSON mibPerSec (its time without Node start-up), or the QEMU job's length / job time. */
function selfReported(m: Measurement): number | undefined {
  const r = m.report;
  if (typeof r?.['mibPerSec'] === 'number') return r['mibPerSec'];
  if (typeof r?.['jobSeconds'] === 'number') return m.bytes / MiB / r['jobSeconds'];
  return undefined;
}

function haveTool(cmd: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

const gib = (b: number) => `${(b / GiB).toFixed(2)} GiB`;
const fmt = (v: number | undefined) => (v === undefined || !Number.isFinite(v) ? '-' : v >= 100 ? v.toFixed(0) : v.toFixed(2));

async function main(): Promise<number> {
  const begin = benchStart<ChartInput>('copy', { cli: CLI, cacheEnv: CACHE_ENV, chart });
  if ('exit' in begin) return begin.exit;
  const { caches } = begin;
  for (const w of WORKLOADS) {
    if (!['full', 'sparse', 'mixed'].includes(w)) {
      console.error(`copy bench: invalid BENCH_WORKLOADS entry "${w}": expected full, sparse or mixed`);
      return 2;
    }
  }
  mkdirSync(WORK_DIR, { recursive: true });
  cleanTargets(WORK_DIR);

  const imageBytes = toBytes(IMAGE_GIB);
  const mixedBytes = toBytes(MIXED_GIB);
  const wanted = WORKLOADS.map((kind) => ({ kind, bytes: kind === 'mixed' ? mixedBytes : imageBytes }));
  // One target at a time, as large as the largest image, plus room for the file system.
  const need = bytesToGenerate(WORK_DIR, wanted) + Math.max(...wanted.map((w) => w.bytes)) * 1.05 + GiB;
  const free = freeDiskBytes(WORK_DIR);
  if (free < need) {
    console.error(`copy bench: not enough free disk in ${WORK_DIR}: ${gib(free)} free, ${gib(need)} needed (images still to generate + one target + 1 GiB); lower BENCH_IMAGE_GIB or point BENCH_DIR elsewhere`);
    return 2;
  }
  if (caches.includes('warm') && imageBytes * 2.2 > os.freemem() + 0) {
    console.warn(`copy bench: warning: source + target (${gib(imageBytes * 2)}) come near free memory (${gib(os.freemem())}); "warm" runs may not keep the source cached (see src cached % in the results)`);
  }

  const facts = machineFacts(WORK_DIR);
  printMachineFacts(facts);
  const versions = {
    'qemu-img': toolVersion('qemu-img', ['--version']),
    'qemu-storage-daemon': toolVersion('qemu-storage-daemon', ['--version']),
    nbdcopy: toolVersion('nbdcopy', ['--version']),
    cp: toolVersion('cp', ['--version']),
    dd: toolVersion('dd', ['--version']),
  };
  console.log(`tools: ${Object.entries(versions).map(([k, v]) => `${k}: ${v}`).join('; ')}`);
  const defaultWorkers = shearDefaultWorkers();
  console.log(`work dir ${WORK_DIR}; images ${gib(imageBytes)} (mixed ${gib(mixedBytes)}); runs ${RUNS}; cache ${caches.join('+')}; Shear default workers ${defaultWorkers}`);
  console.log('MiB/s = 2^20 bytes/s of logical image size; durable = command wall time (QEMU job: blockdev-backup to completion + blockdev-del) + fsync(target)');
  console.log('self-reported = Shear\'s own JSON mibPerSec (no Node start-up) or the QEMU job\'s len / (blockdev-backup -> BLOCK_JOB_COMPLETED)\n');

  const images = new Map<ImageKind, ImageInfo>();
  for (const w of wanted) {
    const info = ensureImage(WORK_DIR, w.kind, w.bytes, (msg) => console.log(msg));
    images.set(w.kind, info);
    console.log(`${info.kind}.raw: ${gib(info.bytes)} logical, ${gib(info.allocatedBytes)} allocated${info.reused ? ' (reused)' : `, generated in ${info.generateSeconds.toFixed(1)} s`}`);
  }

  const plan = new Map<ImageKind, Case[]>();
  for (const w of WORKLOADS) {
    let cases = w === 'mixed' ? compressCases(defaultWorkers) : rawCases(defaultWorkers);
    if (ONLY) cases = cases.filter((c) => ONLY.test(c.id));
    const missing = cases.filter((c) => c.tools.some((t) => !haveTool(t)));
    for (const c of missing) console.warn(`copy bench: SKIPPED ${w}/${c.id}: needs ${c.tools.filter((t) => !haveTool(t)).join(', ')}`);
    plan.set(w, cases.filter((c) => !missing.includes(c)));
  }
  const total = [...plan.values()].reduce((n, cs) => n + cs.length, 0) * caches.length * RUNS;
  console.log(`${total} timed copies\n`);

  const measurements: Measurement[] = [];
  const started = Date.now();
  let n = 0;
  // Cases interleave within each run, so drift on a shared machine hits all of them alike.
  for (const w of WORKLOADS) {
    const image = images.get(w)!;
    for (const cache of caches) {
      for (let run = 1; run <= RUNS; run++) {
        for (const c of plan.get(w)!) {
          const m = await measureOnce(w, image, c, cache, run);
          measurements.push(m);
          n++;
          const status = m.ok ? 'ok' : m.verdict === 'NOT RUN' ? 'FAILED' : `VERIFY ${m.verdict}`;
          console.log(`[${n}/${total}] ${w} ${cache} run ${run}: ${c.label}: ${fmt(m.mibPerSec)} MiB/s (cmd ${fmt(m.cmdMibPerSec)}), src cached ${fmt(m.srcCachedPercent)}%, load ${m.loadavg1.toFixed(2)}, ${status}`);
          if (!m.ok) console.error(`\n!!!!!!!! ${w} ${cache} ${c.id} run ${run}: ${status}\n${m.error}\n!!!!!!!!\n`);
        }
      }
    }
  }
  const wallMinutes = (Date.now() - started) / 60000;

  // Summaries.
  const summary: Row[] = [];
  const stats = new Map<string, Stat>();
  const key = (w: string, id: string, cache: string) => `${w}/${id}/${cache}`;
  for (const w of WORKLOADS) {
    for (const c of plan.get(w)!) {
      for (const cache of caches) {
        const ms = measurements.filter((m) => m.workload === w && m.caseId === c.id && m.cache === cache);
        const s = stat(ms.filter((m) => m.ok).map((m) => m.mibPerSec!));
        if (s) stats.set(key(w, c.id, cache), s);
      }
    }
  }
  const ratio = (a: Stat | undefined, b: Stat | undefined) => (a && b ? a.median / b.median : undefined);
  for (const w of WORKLOADS) {
    const rows: Row[] = [];
    for (const c of plan.get(w)!) {
      for (const cache of caches) {
        const ms = measurements.filter((m) => m.workload === w && m.caseId === c.id && m.cache === cache);
        const s = stats.get(key(w, c.id, cache));
        const good = ms.filter((m) => m.ok);
        const row: Row = {
          tool: c.label,
          cache,
          'MiB/s median (min-max)': s ? `${fmt(s.median)} (${fmt(s.min)}-${fmt(s.max)})` : 'FAILED',
          'cmd-only MiB/s': fmt(median(good.map((m) => m.cmdMibPerSec!)) || undefined),
          'self-reported MiB/s': fmt(median(good.map(selfReported).filter((v): v is number => v !== undefined)) || undefined),
          'x shear default': fmt(ratio(s, stats.get(key(w, 'shear-default', cache)))),
          'x single-task': fmt(ratio(s, stats.get(key(w, 'shear-single-task', cache)))),
          'dst allocated': good.length ? gib(median(good.map((m) => m.dstAllocatedBytes!))) : '-',
          'src cached %': fmt(median(ms.map((m) => m.srcCachedPercent))),
          verified: `${good.length}/${ms.length}`,
          'peak RSS MiB': fmt(Math.max(...good.map((m) => (m.peakRssBytes ?? NaN) / MiB)) || undefined),
        };
        rows.push(row);
        summary.push({ workload: w, caseId: c.id, command: c.command, ...row, medianMiBps: s?.median ?? NaN, minMiBps: s?.min ?? NaN, maxMiBps: s?.max ?? NaN });
      }
    }
    const image = images.get(w)!;
    console.log(`\n=== ${w}.raw: ${gib(image.bytes)} logical, ${gib(image.allocatedBytes)} allocated${w === 'mixed' ? ' -> compressed qcow2 target' : ' -> raw target'} ===`);
    printTable(rows);
  }

  const headline: Row[] = [];
  for (const w of WORKLOADS) {
    for (const cache of caches) {
      const d = stats.get(key(w, 'shear-default', cache));
      const q = w === 'mixed' ? stats.get(key(w, 'qemu-img-c', cache)) : stats.get(key(w, 'qemu-img-m16-W', cache));
      const qsd = stats.get(key(w, w === 'mixed' ? 'qsd-backup-compress' : 'qsd-backup', cache));
      const limit = w === 'mixed' ? undefined : stats.get(key(w, 'cp', cache));
      headline.push({
        workload: w, cache,
        'shear default MiB/s': fmt(d?.median),
        'default / single-task x': fmt(ratio(d, stats.get(key(w, 'shear-single-task', cache)))),
        'default / qemu-img x': fmt(ratio(d, q)),
        'default / QEMU backup job x': fmt(ratio(d, qsd)),
        'default / nbdcopy x': fmt(ratio(d, stats.get(key(w, 'nbdcopy', cache)))),
        'default / cp x': fmt(ratio(d, limit)),
      });
    }
  }
  console.log('\n=== headline: Shear default workers vs its single-task baseline and vs the others ===');
  console.log('(qemu-img = convert -m 16 -W for raw targets, convert -c for the compressed qcow2 target; QEMU backup job = 64 workers, compress=true for qcow2; cp = cp (auto))');
  printTable(headline);

  const failures = measurements.filter((m) => m.verdict === 'NOT RUN');
  const mismatches = measurements.filter((m) => m.verdict === 'MISMATCH' || m.verdict === 'ERROR');
  const loads = measurements.map((m) => m.loadavg1);
  console.log(`\n${measurements.length} copies in ${wallMinutes.toFixed(1)} min: ${measurements.length - failures.length - mismatches.length} verified identical, ${mismatches.length} mismatched or unverifiable, ${failures.length} failed`);
  console.log(`1-min load average before each copy: median ${fmt(median(loads))}, max ${fmt(Math.max(...loads))} (this bench alone keeps it near 1-2; well above that means others were busy too)`);

  const results = {
    machine: facts,
    versions,
    config: { imageBytes, mixedBytes, runs: RUNS, caches, workDir: WORK_DIR, workloads: WORKLOADS, only: ONLY?.source ?? null, shearDefaultWorkers: defaultWorkers, kernel: os.release(), wallMinutes },
    images: [...images.values()],
    cases: Object.fromEntries([...plan].map(([w, cs]) => [w, cs.map((c) => ({ id: c.id, label: c.label, command: c.command }))])),
    summary,
    headline,
    measurements,
    failures: failures.length,
    mismatches: mismatches.length,
  };
  writeResultsAndChart('copy', results, chart);

  if (FREE) {
    freeImages(WORK_DIR);
    console.log(`images deleted from ${WORK_DIR}`);
  }
  if (failures.length || mismatches.length) {
    console.error(`\ncopy bench: ${mismatches.length} copies MISMATCHED or could not be verified, ${failures.length} FAILED (see !!!!!!!! above)`);
    return 1;
  }
  return 0;
}

interface ChartInput {
  machine: { cpu: string; cores: number; kernel: string };
  date: string;
  config: { runs: number; caches: Cache[]; shearDefaultWorkers: number };
  images: ImageInfo[];
  cases: Record<string, Array<{ id: string; label: string }>>;
  /** Rows with workload, caseId, cache, medianMiBps, minMiBps, maxMiBps (NaN became null in JSON). */
  summary: Array<Record<string, unknown>>;
}

/** The SVG for a results object (the one written to JSON), so `--chart FILE.json` can redraw it. */
function chart(r: ChartInput): string {
  const stats = new Map<string, Stat>();
  for (const s of r.summary) {
    const med = s['medianMiBps'];
    if (typeof med === 'number' && Number.isFinite(med)) {
      stats.set(`${String(s['workload'])}/${String(s['caseId'])}/${String(s['cache'])}`, { median: med, min: Number(s['minMiBps']), max: Number(s['maxMiBps']) });
    }
  }
  const get = (w: string, id: string, cache: string) => stats.get(`${w}/${id}/${cache}`);
  const defaultWorkers = r.config.shearDefaultWorkers;
  const workersOf = (id: string) => (id === 'shear-default' ? defaultWorkers : /^shear-w(\d+)$/.test(id) ? Number(id.slice(7)) : undefined);
  const caches = r.config.caches;
  const colors: Record<Cache, string> = { cold: '#4e79a7', warm: '#f28e2b' };
  const workloads = Object.keys(r.cases);
  const panels: BarPanel[] = workloads.map((w) => {
    const img = r.images.find((i) => i.kind === w);
    return {
      title: `${w}.raw (${img ? `${gib(img.bytes)}, ${gib(img.allocatedBytes)} allocated` : '?'}) -> ${w === 'mixed' ? 'compressed qcow2' : 'raw'}`,
      rows: r.cases[w]!.map((c) => c.label),
      unit: 'MiB/s durable (median, whisker min-max)',
      series: caches.map((cache) => ({ name: cache, color: colors[cache], values: r.cases[w]!.map((c) => get(w, c.id, cache)) })),
    };
  });
  const lineColors: Record<string, string> = { full: '#e15759', sparse: '#59a14f', mixed: '#b07aa1' };
  const lines: LineChart[] = [];
  for (const compress of [false, true]) {
    const ws = workloads.filter((w) => (w === 'mixed') === compress);
    const counts = [...new Set(ws.flatMap((w) => r.cases[w]!.map((c) => workersOf(c.id)).filter((n): n is number => n !== undefined)))].sort((a, b) => a - b);
    const xTicks = ['single-task', ...counts.map(String)];
    const series: LineChart['series'] = [];
    for (const w of ws) {
      for (const cache of caches) {
        const points = r.cases[w]!.flatMap((c) => {
          const n = workersOf(c.id);
          const s = get(w, c.id, cache);
          return n !== undefined && s ? [{ x: counts.indexOf(n) + 1, y: s.median }] : [];
        }).sort((a, b) => a.x - b.x);
        const single = get(w, 'shear-single-task', cache);
        if (points.length || single) {
          series.push({ name: `${w}${compress ? ' (compress)' : ''} ${cache}`, color: lineColors[w] ?? '#333', dashed: cache === 'cold', points, ...(single ? { extra: [{ x: 0, y: single.median }] } : {}) });
        }
      }
    }
    if (series.length) {
      lines.push({
        title: compress ? 'Shear --compress by worker count, qcow2 target (hollow = --single-task; dashed = cold)' : 'Shear by worker count, raw target (hollow = --single-task; dashed = cold)',
        xLabel: 'workers', yLabel: 'MiB/s durable (median)', xTicks, series,
      });
    }
  }
  return renderChart({
    title: 'Shear copy throughput vs QEMU, nbdcopy and cp/dd',
    subtitle: [
      `${r.machine.cpu}, ${r.machine.cores} cores, Linux ${r.machine.kernel}, ${r.date.slice(0, 16)}Z; ${r.config.runs} run(s) per case; Shear default = ${defaultWorkers} workers`,
      'durable = command wall time + fsync(target); cold = page cache dropped, warm = source cached; every copy verified',
    ],
    panels,
    lines,
  });
}

process.exitCode = await main();
