// npm run bench -- guest
// What the copy-before-write filter costs the guest (issue 17 item 4), measured two ways:
//   1. daemons: a guest stand-in (python3-libnbd, 64 KiB writes at BENCH_WRITER_MBPS, random
//      offsets, so nearly every write is a cluster's first) writes into the live export of Shear's
//      daemon and of qemu-storage-daemon, tool by tool within each round, in three modes:
//        alone      live export on disk0, no filter;
//        cbw        the fleecing filter (copy-before-write into a raw temp file) under the live
//                   export, nobody reading the point-in-time view;
//        cbw+pull   the same while nbdcopy pulls the view (export "fleece") to null:.
//      Each (daemon, mode) gets a fresh daemon and a fresh temp file, so every cbw run starts with
//      nothing preserved. Prints the medians over BENCH_RUNS of p50/p99 and MB/s with the ratios
//      to "alone" of the same daemon and Shear ÷ QEMU.
//   2. stages: in this process, one CBW write at a time through the filter over real files
//      (FileDriver), with each child call timed: read old data (source read), write it to the
//      target, guest write (source write); the rest of the write's time is the engine (claim,
//      bitmaps, request tables, events, event-loop turns). Also a plain write (no filter) and a
//      write to a cluster already preserved, in the same loop, alternating.
// Environment: BENCH_IMAGE_MIB (1024), BENCH_RUNS (3), BENCH_WRITER_MBPS (100),
// BENCH_WRITER_SECONDS (3), BENCH_PARTS (daemons,stages), BENCH_DAEMONS (shear,qemu),
// BENCH_STAGE_WRITES (2000), BENCH_DIR (bench/.work).
import { mkdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';
import { BlockGraph, FileDriver, PERM_ALL, type HostExtent, type HostMappable, PERM_CONSISTENT_READ, PERM_WRITE, filterChildPerms, type BlockIO, type BlockStatusExtent, type WriteOptions } from '@shear/block';
import { CBW_INFO, CopyBeforeWrite } from '@shear/fleecing';
import { envNumber } from './lib/bench-start.js';
import { commandLine, runCommand } from './lib/copy-runner.js';
import { randomImage, sparseFile } from './lib/images.js';
import { machineFacts, printMachineFacts, toolVersion } from './lib/machine.js';
import { median, percentile } from './lib/measure.js';
import { NbdBenchDaemon, type DaemonKind } from './lib/nbd-bench-daemon.js';
import { NbdWriter, type WriterStats } from './lib/nbd-latency-writer.js';
import { printTable, writeResults, type Row } from './lib/report.js';

const MiB = 2 ** 20;
const WRITE_BYTES = 65536;
const here = path.dirname(fileURLToPath(import.meta.url));
const CLI = path.resolve(here, '..', '..', 'packages', 'cli', 'dist', 'main.js');
const IMAGE_BYTES = Math.round(envNumber('BENCH_IMAGE_MIB', 1024)) * MiB;
const RUNS = Math.round(envNumber('BENCH_RUNS', 3));
const WRITER_MBPS = envNumber('BENCH_WRITER_MBPS', 100);
const WRITER_SECONDS = envNumber('BENCH_WRITER_SECONDS', 3);
const STAGE_WRITES = Math.round(envNumber('BENCH_STAGE_WRITES', 2000));
const WORK_DIR = path.resolve(process.env['BENCH_DIR'] ?? path.resolve(here, '..', '.work'), 'guest');
const PARTS = (process.env['BENCH_PARTS'] ?? 'daemons,stages').split(',');
const DAEMONS = (process.env['BENCH_DAEMONS'] ?? 'shear,qemu').split(',') as DaemonKind[];

type Mode = 'alone' | 'cbw' | 'cbw+pull';
const MODES: Mode[] = ['alone', 'cbw', 'cbw+pull'];

interface DaemonRun { daemon: DaemonKind; mode: Mode; run: number; writer: WriterStats; pullMiBps?: number; load1: number }

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** One (daemon, mode) window: a fresh daemon, the writer for WRITER_SECONDS (or until the pull ends). */
async function daemonRun(kind: DaemonKind, mode: Mode, run: number, live: string, tmp: string, sockets: string): Promise<DaemonRun> {
  const d = await NbdBenchDaemon.start({ kind, image: live, socketDir: sockets, shearCli: CLI });
  let writer: NbdWriter | undefined;
  try {
    if (mode === 'alone') await d.exposeLive();
    else {
      sparseFile(tmp, IMAGE_BYTES);
      await d.startFleecing(tmp);
    }
    writer = await NbdWriter.start({ uri: d.uri('live'), mbps: WRITER_MBPS, blockBytes: WRITE_BYTES, seed: 1000 + run });
    const load1 = os.loadavg()[0]!;
    writer.go();
    const t0 = performance.now();
    let pullMiBps: number | undefined;
    if (mode === 'cbw+pull') {
      const args = [d.uri('fleece'), 'null:'];
      const r = await runCommand('nbdcopy', args, 10 * 60_000);
      if (r.code !== 0) throw new Error(`${commandLine('nbdcopy', args)} exited with ${r.code ?? r.signal}: ${r.stderr.trim()}`);
      pullMiBps = IMAGE_BYTES / MiB / ((r.endedAt - r.startedAt) / 1000);
    } else {
      await sleep(WRITER_SECONDS * 1000 - (performance.now() - t0));
    }
    const w = writer;
    writer = undefined;
    const stats = await w.stop();
    if (stats.error) throw new Error(`${kind} ${mode}: the writer failed: ${stats.error}`);
    return { daemon: kind, mode, run, writer: stats, load1, ...(pullMiBps !== undefined ? { pullMiBps } : {}) };
  } finally {
    await writer?.kill();
    await d.close();
  }
}

async function daemonsPart(): Promise<{ rows: Row[]; runs: DaemonRun[] }> {
  const live = path.join(WORK_DIR, 'live.raw');
  const tmp = path.join(WORK_DIR, 'tmp.raw');
  const sockets = path.join(os.tmpdir(), `shear-guest-${process.pid}`);
  mkdirSync(sockets, { recursive: true });
  randomImage(live, IMAGE_BYTES);
  const runs: DaemonRun[] = [];
  try {
    for (let r = 0; r < RUNS; r++) {
      for (const mode of MODES) {
        for (const kind of r % 2 ? [...DAEMONS].reverse() : DAEMONS) {
          const res = await daemonRun(kind, mode, r, live, tmp, sockets);
          runs.push(res);
          console.log(`  round ${r + 1} ${kind.padEnd(5)} ${mode.padEnd(8)} p50 ${res.writer.p50Ms?.toFixed(2)} ms  p99 ${res.writer.p99Ms?.toFixed(2)} ms  ${res.writer.mbps.toFixed(1)} MB/s${res.pullMiBps ? `  pull ${res.pullMiBps.toFixed(0)} MiB/s` : ''}  load ${res.load1.toFixed(2)}`);
        }
      }
    }
  } finally {
    rmSync(sockets, { recursive: true, force: true });
    rmSync(tmp, { force: true });
    rmSync(live, { force: true });
  }
  const med = (k: DaemonKind, m: Mode, f: (x: DaemonRun) => number | null | undefined) => {
    const v = runs.filter((x) => x.daemon === k && x.mode === m).map(f).filter((x): x is number => typeof x === 'number');
    return v.length ? median(v) : NaN;
  };
  const rows: Row[] = [];
  for (const mode of MODES) {
    for (const k of DAEMONS) {
      const p99 = med(k, mode, (x) => x.writer.p99Ms);
      const row: Row = {
        daemon: k === 'shear' ? 'Shear' : 'QEMU', mode,
        'p50 ms': med(k, mode, (x) => x.writer.p50Ms), 'p99 ms': p99, 'max ms': med(k, mode, (x) => x.writer.maxMs),
        'guest MB/s': med(k, mode, (x) => x.writer.mbps),
        'p99 ÷ alone': p99 / med(k, 'alone', (x) => x.writer.p99Ms),
        'pull MiB/s': mode === 'cbw+pull' ? med(k, mode, (x) => x.pullMiBps) : '-',
      };
      if (k === 'shear' && DAEMONS.includes('qemu')) {
        row['p99 Shear ÷ QEMU'] = p99 / med('qemu', mode, (x) => x.writer.p99Ms);
        row['MB/s Shear ÷ QEMU'] = med(k, mode, (x) => x.writer.mbps) / med('qemu', mode, (x) => x.writer.mbps);
      }
      rows.push(row);
    }
  }
  return { rows, runs };
}

// ---- part 2: the stages of one copy-before-write write ----

/**
 * A FileDriver whose reads and writes report their duration. `mapped`: it also offers its host
 * mapping (the copy then goes by copy_file_range between the fds, timed from mapWrite to commit).
 */
class Timed implements BlockIO {
  onRead: (ms: number) => void = () => {};
  onWrite: (ms: number) => void = () => {};
  onMappedCopy: (ms: number) => void = () => {};
  constructor(readonly inner: FileDriver, readonly mapped: boolean) {}
  get length() { return this.inner.length; }
  async read(o: number, b: Uint8Array) { const t = performance.now(); await this.inner.read(o, b); this.onRead(performance.now() - t); }
  async write(o: number, b: Uint8Array, opts?: WriteOptions) { const t = performance.now(); await this.inner.write(o, b, opts); this.onWrite(performance.now() - t); }
  writeZeroes(o: number, n: number) { return this.inner.writeZeroes(o, n); }
  discard(o: number, n: number) { return this.inner.discard(o, n); }
  flush() { return this.inner.flush(); }
  blockStatus(o: number, n: number): Promise<BlockStatusExtent[]> { return this.inner.blockStatus(o, n); }
  hostMapping(): HostMappable | undefined {
    if (!this.mapped) return undefined;
    // As a raw file maps (block's fileMapping): one extent on the fd, nothing to commit.
    const extents = (o: number, n: number): HostExtent[] => [{ kind: 'fd', fd: this.inner.fd, hostOffset: o, bytes: n }];
    return {
      mapRead: async (o, n) => extents(o, n),
      mapWrite: async (o, n) => {
        const t = performance.now();
        return { extents: extents(o, n), abort: async () => {}, commit: async () => { this.onMappedCopy(performance.now() - t); } };
      },
    };
  }
  close() { return this.inner.close(); }
}

type Variant = 'node' | 'mapped';
interface StageSet { readOld: number[]; writeTarget: number[]; copyInKernel: number[]; guestWrite: number[]; engine: number[]; total: number[]; rewrite: number[] }

async function stagesPart(): Promise<{ rows: Row[]; stages: Record<Variant, Row[]> }> {
  const clusters = Math.min(IMAGE_BYTES / WRITE_BYTES, STAGE_WRITES * 2);
  const bytes = clusters * WRITE_BYTES;
  const files: string[] = [];
  const file = (name: string, random: boolean) => {
    const f = path.join(WORK_DIR, `stage-${name}.raw`);
    files.push(f);
    if (random) randomImage(f, bytes);
    else sparseFile(f, bytes);
    return f;
  };
  const g = new BlockGraph();
  const info = { name: 'file', childPerms: filterChildPerms };
  const plainNode = await g.addNode({ name: 'plain', info, open: () => FileDriver.open(file('plain', true)) });
  const plain = g.attachUser({ kind: 'user', name: 'plain' }, plainNode, PERM_WRITE | PERM_CONSISTENT_READ, PERM_ALL);
  const setup = async (v: Variant) => {
    const src = new Timed(await FileDriver.open(file(`${v}-src`, true)), v === 'mapped');
    const tgt = new Timed(await FileDriver.open(file(`${v}-tgt`, false)), v === 'mapped');
    const srcNode = await g.addNode({ name: `${v}-src`, info, open: async () => src });
    const tgtNode = await g.addNode({ name: `${v}-tgt`, info, open: async () => tgt });
    const cbwNode = await g.addNode({
      name: `${v}-cbw`, info: CBW_INFO,
      children: [{ role: 'file', node: srcNode }, { role: 'target', node: tgtNode }],
      open: async (c) => new CopyBeforeWrite({ file: c.get('file')!, target: c.get('target')! }),
    });
    const guest = g.attachUser({ kind: 'user', name: `${v}-guest` }, cbwNode, PERM_WRITE | PERM_CONSISTENT_READ, PERM_ALL);
    const s: StageSet = { readOld: [], writeTarget: [], copyInKernel: [], guestWrite: [], engine: [], total: [], rewrite: [] };
    return { v, src, tgt, guest, s };
  };
  const variants = [await setup('node'), await setup('mapped')];
  const data = Buffer.alloc(WRITE_BYTES, 0x5a);
  const plainMs: number[] = [];
  try {
    // A permutation of the clusters so every CBW write is its cluster's first.
    const order = Array.from({ length: clusters }, (_, i) => i);
    let x = 12345;
    for (let i = order.length - 1; i > 0; i--) {
      x = (Math.imul(x, 1103515245) + 12345) >>> 0;
      const j = x % (i + 1);
      [order[i], order[j]] = [order[j]!, order[i]!];
    }
    for (let i = 0; i < STAGE_WRITES && i < clusters; i++) {
      const off = order[i]! * WRITE_BYTES;
      let t = performance.now();
      await plain.write(off, data);
      plainMs.push(performance.now() - t);
      for (const { src, tgt, guest, s } of variants) {
        let rd = 0, tw = 0, ck = 0, gw = 0;
        src.onRead = (ms) => (rd += ms);
        tgt.onWrite = (ms) => (tw += ms);
        tgt.onMappedCopy = (ms) => (ck += ms);
        src.onWrite = (ms) => (gw += ms);
        t = performance.now();
        await guest.write(off, data);
        const total = performance.now() - t;
        s.readOld.push(rd); s.writeTarget.push(tw); s.copyInKernel.push(ck); s.guestWrite.push(gw); s.total.push(total);
        s.engine.push(total - rd - tw - ck - gw);
        src.onRead = tgt.onWrite = tgt.onMappedCopy = src.onWrite = () => {};
        // The same cluster again: already preserved, no copy.
        t = performance.now();
        await guest.write(off, data);
        s.rewrite.push(performance.now() - t);
      }
    }
  } finally {
    for (const { v, guest } of variants) {
      g.detachUser(guest);
      await g.removeNode(`${v}-cbw`);
      await g.removeNode(`${v}-src`);
      await g.removeNode(`${v}-tgt`);
    }
    g.detachUser(plain);
    await g.removeNode('plain');
    for (const f of files) rmSync(f, { force: true });
  }
  const q = (v: number[], p: number) => percentile([...v].sort((a, b) => a - b), p);
  const row = (what: string, v: number[]): Row => ({ what, 'mean µs': (v.reduce((a, b) => a + b, 0) / v.length) * 1000, 'p50 µs': q(v, 50) * 1000, 'p99 µs': q(v, 99) * 1000 });
  const stageRows = (s: StageSet, mapped: boolean): Row[] => [
    ...(mapped
      ? [row('copy old data: copy_file_range, mapWrite to commit', s.copyInKernel)]
      : [row('read old data (source read)', s.readOld), row('write old data to target', s.writeTarget)]),
    row('guest write (source write)', s.guestWrite),
    row('engine: claim, bitmaps, tables, events, loop turns', s.engine),
    row('= CBW first write, total', s.total),
  ];
  const p99Plain = q(plainMs, 99);
  const [node, mapped] = variants.map((v) => v.s) as [StageSet, StageSet];
  const rows = [
    { ...row('plain write, no filter', plainMs), 'p99 ÷ plain': 1 },
    { ...row('CBW first write, copy through the nodes', node.total), 'p99 ÷ plain': q(node.total, 99) / p99Plain },
    { ...row('CBW first write, mapped files', mapped.total), 'p99 ÷ plain': q(mapped.total, 99) / p99Plain },
    { ...row('CBW write, cluster already preserved', mapped.rewrite), 'p99 ÷ plain': q(mapped.rewrite, 99) / p99Plain },
  ];
  return { rows, stages: { node: stageRows(node, false), mapped: stageRows(mapped, true) } };
}

async function main(): Promise<number> {
  if (PARTS.includes('daemons') && !(await import('node:fs')).existsSync(CLI)) {
    console.error(`guest bench: ${CLI} is missing; build first (npx tsc -b)`);
    return 2;
  }
  mkdirSync(WORK_DIR, { recursive: true });
  const facts = machineFacts(WORK_DIR);
  printMachineFacts(facts);
  const tools = { qsd: toolVersion('qemu-storage-daemon', ['--version']), nbdcopy: toolVersion('nbdcopy', ['--version']) };
  console.log(`qemu-storage-daemon: ${tools.qsd}; nbdcopy: ${tools.nbdcopy}; load at start ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  const out: Record<string, unknown> = { machine: facts, tools, imageBytes: IMAGE_BYTES, writeBytes: WRITE_BYTES, writerMBps: WRITER_MBPS, writerSeconds: WRITER_SECONDS, runs: RUNS, loadStart: os.loadavg() };
  try {
    if (PARTS.includes('stages')) {
      console.log(`\nstages: ${STAGE_WRITES} writes of 64 KiB, one at a time, in this process (page cache warm)`);
      const r = await stagesPart();
      printTable(r.rows);
      console.log('\none CBW write, copy through the nodes (a target that cannot be mapped):');
      printTable(r.stages.node);
      console.log('\none CBW write, both sides mapped files:');
      printTable(r.stages.mapped);
      out['stages'] = r;
    }
    if (PARTS.includes('daemons')) {
      console.log(`\ndaemons: image ${IMAGE_BYTES / MiB} MiB, writer 64 KiB at ${WRITER_MBPS} MB/s for ${WRITER_SECONDS} s (cbw+pull: until the pull ends), ${RUNS} rounds, medians`);
      const r = await daemonsPart();
      printTable(r.rows);
      out['daemons'] = r;
    }
  } finally {
    rmSync(WORK_DIR, { recursive: true, force: true });
  }
  out['loadEnd'] = os.loadavg();
  console.log(`\nload at end ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  console.log(`results: ${writeResults('guest', out as { machine: typeof facts })}`);
  return 0;
}

process.exitCode = await main();
