// npm run bench -- peers
// One run, one table: Shear against every peer on every copy workload. It runs the copy,
// incremental and nbd benches (each alternates the tools within every run, cold and warm, and
// verifies every copy; rates are durable: the target's fsync is counted for every tool), adds the
// scale row (a huge sparse image with 1% data; lib/peers-scale.ts), and then reads their results
// into one table: Shear's default against its single-task mode and against the best peer, with
// Shear's peak RSS, plus the guest writer's latency during pulls and pushes.
//
// Environment: BENCH_SIZE (4G; suffixes k, M, G, T), BENCH_RUNS (3), BENCH_CACHE (both),
// BENCH_PARTS (copy,incremental,nbd,scale), BENCH_SCALE_SIZE (1T), BENCH_SCALE_DATA_PERCENT (1),
// BENCH_DIR (bench/.work). --reuse FILE.json re-renders a saved peers result without running.
// Quick check: BENCH_SIZE=256M BENCH_RUNS=1 BENCH_SCALE_SIZE=16G npm run bench -- peers
import { spawn } from 'node:child_process';
import { mkdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { benchStart, envNumber, type Cache } from './lib/bench-start.js';
import { machineFacts, printMachineFacts } from './lib/machine.js';
import { median } from './lib/measure.js';
import { printTable, writeResultsAndChart, type Row } from './lib/report.js';
import { runScale } from './lib/peers-scale.js';
import { renderChart, type BarPanel, type Stat } from './lib/svg-chart.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;
const here = path.dirname(fileURLToPath(import.meta.url));
const CLI = path.resolve(here, '..', '..', 'packages', 'cli', 'dist', 'main.js');
const WORK_DIR = path.resolve(process.env['BENCH_DIR'] ?? path.resolve(here, '..', '.work'));
const PARTS = ['copy', 'incremental', 'nbd', 'scale'] as const;
type Part = (typeof PARTS)[number];

function envSize(name: string, fallback: string): number {
  const v = process.env[name] || fallback;
  const m = /^(\d+(?:\.\d+)?)([kKmMgGtT]?)$/.exec(v.trim());
  if (!m) throw new Error(`Invalid ${name} "${v}": expected a size such as 4G or 512M`);
  const unit = { '': 1, k: 2 ** 10, m: MiB, g: GiB, t: 2 ** 40 }[m[2]!.toLowerCase() as '' | 'k' | 'm' | 'g' | 't'];
  return Math.round((Number(m[1]) * unit) / MiB) * MiB;
}

const SIZE = envSize('BENCH_SIZE', '4G');
const RUNS = Math.round(envNumber('BENCH_RUNS', 3));
const SCALE_SIZE = envSize('BENCH_SCALE_SIZE', '1T');
const SCALE_PERCENT = envNumber('BENCH_SCALE_DATA_PERCENT', 1);
const PARTS_ON = (process.env['BENCH_PARTS'] ?? PARTS.join(',')).split(',').map((s) => s.trim()).filter(Boolean) as Part[];

interface AnyMeasurement {
  ok: boolean;
  cache: Cache;
  caseId?: string;
  workload?: string;
  part?: string;
  variant?: string;
  daemon?: string;
  label?: string;
  mibPerSec?: number;
  peakRssBytes?: number;
  writer?: { p99Ms: number | null; mbps: number };
}

/** Runs one of the other benches as a child, its output shown as it comes; returns its results file. */
function runBench(name: string, env: Record<string, string>): Promise<{ file?: string; status: number }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [path.join(here, `${name}.bench.js`)], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'inherit'] });
    let file: string | undefined;
    let pending = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      process.stdout.write(d);
      pending += d;
      const lines = pending.split('\n');
      pending = lines.pop()!;
      for (const l of lines) {
        const m = /^results: (.+\.json)$/.exec(l.trim());
        if (m) file = m[1];
      }
    });
    child.once('error', reject);
    child.once('close', (code) => resolve({ ...(file ? { file } : {}), status: code ?? 1 }));
  });
}

interface Line {
  workload: string;
  cache: Cache;
  shear: AnyMeasurement[];
  single: AnyMeasurement[];
  /** Each peer's measurements, by its label. */
  peers: Map<string, AnyMeasurement[]>;
  note?: string;
}

const rate = (ms: AnyMeasurement[]) => {
  const ok = ms.filter((m) => m.ok && m.mibPerSec !== undefined).map((m) => m.mibPerSec!);
  return ok.length ? median(ok) : undefined;
};

function lines(results: Partial<Record<Part, { measurements: AnyMeasurement[] }>>, caches: Cache[]): Line[] {
  const out: Line[] = [];
  const group = (ms: AnyMeasurement[], key: (m: AnyMeasurement) => string | undefined) => {
    const g = new Map<string, AnyMeasurement[]>();
    for (const m of ms) {
      const k = key(m);
      if (k) g.set(k, [...(g.get(k) ?? []), m]);
    }
    return g;
  };
  for (const cache of caches) {
    const copy = results.copy?.measurements.filter((m) => m.cache === cache) ?? [];
    for (const [w, name] of [['full', 'full random'], ['sparse', '50% sparse'], ['mixed', 'compressed qcow2']] as const) {
      const ms = copy.filter((m) => m.workload === w);
      if (!ms.length) continue;
      out.push({
        workload: name, cache,
        shear: ms.filter((m) => m.caseId === 'shear-default'),
        single: ms.filter((m) => m.caseId === 'shear-single-task'),
        // dd is the machine's copy limit for reference, not a peer: it fills every hole.
        peers: group(ms, (m) => (m.caseId!.startsWith('shear') || m.caseId === 'dd' ? undefined : m.label)),
      });
    }
    const inc = results.incremental?.measurements.filter((m) => m.cache === cache) ?? [];
    if (inc.length) {
      out.push({
        workload: 'incremental 10%', cache,
        shear: inc.filter((m) => m.caseId === 'shear-incr'),
        single: inc.filter((m) => m.caseId === 'shear-incr-mw1'),
        peers: group(inc, (m) => (m.caseId!.startsWith('qemu-incr') ? m.label : undefined)),
        note: 'single-task = x-perf max-workers=1',
      });
    }
    const nbd = results.nbd?.measurements.filter((m) => m.cache === cache) ?? [];
    const pull = nbd.filter((m) => m.part === 'pull' && m.variant === 'no writer');
    if (pull.length) {
      out.push({
        workload: 'pull (nbdcopy from the fleecing export)', cache,
        shear: pull.filter((m) => m.daemon === 'shear'), single: [],
        peers: group(pull, (m) => (m.daemon === 'qemu' ? 'QEMU fleecing export' : undefined)),
      });
    }
    const push = nbd.filter((m) => m.part === 'push');
    if (push.length) {
      out.push({
        workload: 'push to NBD (1 ms added latency)', cache,
        shear: push.filter((m) => m.daemon === 'shear' && m.variant === 'default'),
        single: push.filter((m) => m.daemon === 'shear' && m.variant === 'max-workers=1'),
        peers: group(push, (m) => (m.daemon === 'qemu' ? `QEMU backup job (${m.variant})` : undefined)),
        note: 'single-task = x-perf max-workers=1',
      });
    }
    const scale = results.scale?.measurements.filter((m) => m.cache === cache) ?? [];
    if (scale.length) {
      out.push({
        workload: `scale: ${(SCALE_SIZE / 2 ** 40).toFixed(2)} TiB sparse, ${SCALE_PERCENT}% data`, cache,
        shear: scale.filter((m) => m.caseId === 'shear-default'),
        single: scale.filter((m) => m.caseId === 'shear-single-task'),
        peers: group(scale, (m) => (m.caseId!.startsWith('shear') ? undefined : m.label)),
      });
    }
  }
  return out;
}

const fmt = (v: number | undefined, digits = 2) => (v === undefined || !Number.isFinite(v) ? '-' : v >= 100 ? v.toFixed(0) : v.toFixed(digits));

function tableRows(ls: Line[]): Row[] {
  return ls.map((l) => {
    const shear = rate(l.shear);
    const single = rate(l.single);
    let best: [string, number] | undefined;
    for (const [label, ms] of l.peers) {
      const r = rate(ms);
      if (r !== undefined && (!best || r > best[1])) best = [label, r];
    }
    const rss = l.shear.concat(l.single).map((m) => m.peakRssBytes).filter((v): v is number => v !== undefined);
    const all = [...l.shear, ...l.single, ...[...l.peers.values()].flat()];
    return {
      workload: l.workload,
      cache: l.cache,
      'shear MiB/s': fmt(shear),
      'single-task MiB/s': fmt(single),
      'best peer': best?.[0] ?? '-',
      'peer MiB/s': fmt(best?.[1]),
      'shear / best peer x': fmt(shear !== undefined && best ? shear / best[1] : undefined),
      'default / single-task x': fmt(shear !== undefined && single !== undefined ? shear / single : undefined),
      'shear peak RSS MiB': rss.length ? fmt(Math.max(...rss) / MiB, 0) : '-',
      verified: `${all.filter((m) => m.ok).length}/${all.length}`,
    };
  });
}

function latencyRows(nbd: AnyMeasurement[] | undefined): Row[] {
  if (!nbd) return [];
  const rows: Row[] = [];
  const kinds: Array<[string, (m: AnyMeasurement) => boolean]> = [
    ['no backup', (m) => m.part === 'latency' && m.variant === 'alone'],
    ['copy-before-write, no reader', (m) => m.part === 'latency' && m.variant === 'cbw, no reader'],
    ['during a pull', (m) => m.part === 'pull' && m.variant === 'writer'],
    ['during a push', (m) => m.part === 'latency' && m.variant === 'push'],
  ];
  for (const [name, pick] of kinds) {
    const row: Row = { 'guest writer (100 MB/s, 64 KiB)': name };
    for (const d of ['shear', 'qemu']) {
      const ms = nbd.filter((m) => pick(m) && m.daemon === d && m.writer);
      const p99 = ms.map((m) => m.writer!.p99Ms).filter((v): v is number => v !== null);
      row[`${d} p99 ms`] = p99.length ? fmt(median(p99), 3) : '-';
      row[`${d} MB/s`] = ms.length ? fmt(median(ms.map((m) => m.writer!.mbps)), 1) : '-';
    }
    rows.push(row);
  }
  return rows;
}

interface Saved {
  caches: Cache[];
  table: Row[];
  latency: Row[];
  machine: ReturnType<typeof machineFacts>;
  config: Record<string, unknown>;
}

function chart(r: Saved): string {
  const panels: BarPanel[] = r.caches.map((cache) => {
    const rows = r.table.filter((t) => t.cache === cache);
    const val = (v: string | number | undefined): Stat | undefined => {
      const n = Number(v);
      return Number.isFinite(n) ? { median: n, min: n, max: n } : undefined;
    };
    return {
      title: `${cache} page cache: MiB/s (medians)`,
      rows: rows.map((t) => String(t.workload)),
      series: [
        { name: 'Shear default', color: '#1f77b4', values: rows.map((t) => val(t['shear MiB/s'])) },
        { name: 'Shear single-task', color: '#aec7e8', values: rows.map((t) => val(t['single-task MiB/s'])) },
        { name: 'best peer', color: '#ff7f0e', values: rows.map((t) => val(t['peer MiB/s'])) },
      ],
      unit: 'MiB/s',
    };
  });
  return renderChart({
    title: 'Shear against its peers',
    subtitle: [`${r.machine.cpu}, ${r.machine.cores} cores; image ${fmt(Number(r.config['sizeBytes']) / GiB)} GiB; ${r.config['runs']} runs`],
    panels,
    lines: [],
  });
}

async function main(): Promise<number> {
  const begin = benchStart<Saved>('peers', { cli: CLI, cacheEnv: process.env['BENCH_CACHE'] ?? 'both', chart });
  if ('exit' in begin) return begin.exit;
  const { caches } = begin;
  for (const p of PARTS_ON) {
    if (!PARTS.includes(p)) {
      console.error(`peers bench: invalid BENCH_PARTS entry "${p}": expected ${PARTS.join(', ')}`);
      return 2;
    }
  }
  mkdirSync(WORK_DIR, { recursive: true });
  const facts = machineFacts(WORK_DIR);
  printMachineFacts(facts);
  const started = Date.now();
  const env = { BENCH_IMAGE_GIB: String(SIZE / GiB), BENCH_RUNS: String(RUNS), BENCH_CACHE: process.env['BENCH_CACHE'] ?? 'both', BENCH_DIR: WORK_DIR };
  const results: Partial<Record<Part, { measurements: AnyMeasurement[] }>> = {};
  const files: Partial<Record<Part, string>> = {};
  const failed: string[] = [];
  const sub: Array<[Part, string, Record<string, string>]> = [
    ['copy', 'copy', { BENCH_WORKLOADS: 'full,sparse,mixed' }],
    ['incremental', 'incremental', { BENCH_ONLY: '^(shear-incr|shear-incr-mw1|qemu-incr|qemu-incr-mw1)$', BENCH_DIR: path.join(WORK_DIR, 'incremental') }],
    ['nbd', 'nbd', { BENCH_PARTS: 'pull,push,latency' }],
  ];
  for (const [part, name, extra] of sub) {
    if (!PARTS_ON.includes(part)) continue;
    console.log(`\n######## peers: the ${name} bench ########\n`);
    const r = await runBench(name, { ...env, ...extra });
    if (r.status !== 0) failed.push(`${name} exited with ${r.status}`);
    if (r.file) {
      files[part] = r.file;
      results[part] = JSON.parse(readFileSync(r.file, 'utf8')) as { measurements: AnyMeasurement[] };
    } else failed.push(`${name} wrote no results`);
  }
  let scaleImage: unknown;
  if (PARTS_ON.includes('scale')) {
    console.log('\n######## peers: the scale row ########\n');
    const s = await runScale({ workDir: WORK_DIR, bytes: SCALE_SIZE, dataPercent: SCALE_PERCENT, runs: RUNS, caches, cli: CLI, log: (l) => console.log(l) });
    results.scale = { measurements: s.measurements };
    scaleImage = s.image;
    const bad = s.measurements.filter((m) => !m.ok);
    if (bad.length) failed.push(`scale: ${bad.length} copies failed or mismatched`);
  }

  const table = tableRows(lines(results, caches));
  const latency = latencyRows(results.nbd?.measurements);
  console.log(`\n=== Shear against its peers (MiB/s of logical size, durable, medians of ${RUNS}; x > 1: Shear faster) ===`);
  printMachineFacts(facts);
  printTable(table);
  if (latency.length) {
    console.log('\n=== the guest\'s writes while a backup runs (medians of the runs\' p99) ===');
    printTable(latency);
  }
  const config = { sizeBytes: SIZE, runs: RUNS, caches, parts: PARTS_ON, scaleBytes: SCALE_SIZE, scaleDataPercent: SCALE_PERCENT, workDir: WORK_DIR, wallMinutes: (Date.now() - started) / 60000 };
  const saved: Saved = { caches, table, latency, machine: facts, config };
  writeResultsAndChart('peers', { ...saved, files, scaleImage, scale: results.scale?.measurements ?? [], failed }, chart);
  if (failed.length) {
    console.error(`\npeers bench: ${failed.join('; ')}`);
    return 1;
  }
  return 0;
}

process.exitCode = await main();
