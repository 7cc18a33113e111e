import { FuzzEnv, type Memory } from './env.js';
import { CampaignContext } from './context.js';
import { Findings, newStats, type Finding, type TargetStats } from './findings.js';
import { handshakeLane } from './nbd-handshake.js';
import { transmissionLane, TRANSMISSION_LANES } from './nbd-transmission.js';
import { Prng } from './prng.js';
import { qmpLane } from './qmp-lane.js';

export type Target = 'qmp' | 'nbd' | 'all';

export interface CampaignOptions {
  inputs: number;
  seed: number;
  target: Target;
  /** No reply within this long is a hang (then confirmed by a liveness probe). */
  hangMs?: number;
  log?: (line: string) => void;
}

export interface CampaignResult {
  seed: number;
  target: Target;
  requestedInputs: number;
  stats: TargetStats[];
  totals: { inputs: number; crashes: number; hangs: number; violations: number };
  memory: { before: Memory; after: Memory };
  sockets: { before: number; after: number };
  /** Records the daemon logged at error level or above, and any uncaught-exception report. */
  errorLogs: string[];
  /** What accepted QMP inputs had created, removed before the memory figure was taken. */
  createdByInputs: number;
  finalChecks: { answers: boolean; socketsReleased: boolean; quitCode: number | null };
  findings: Finding[];
  seconds: number;
  ok: boolean;
}

const QMP_LANES = 4;
const HANDSHAKE_LANES = 16;

/** Splits n into k near-equal parts. */
function split(n: number, k: number): number[] {
  return Array.from({ length: k }, (_, i) => Math.floor(n / k) + (i < n % k ? 1 : 0));
}

/**
 * The generated-input campaign: a real daemon with NBD exports, then QMP inputs and NBD
 * handshake and transmission inputs (side by side), counting inputs, crashes, hangs and protocol violations,
 * and the daemon's memory and sockets before and after. Deterministic for a seed (lanes run
 * concurrently, so only the inputs, not their interleaving, are reproducible).
 */
export async function runCampaign(opts: CampaignOptions): Promise<CampaignResult> {
  const log = opts.log ?? (() => {});
  const hangMs = opts.hangMs ?? 30_000;
  const started = Date.now();
  const root = new Prng(opts.seed);
  const findings = new Findings();
  const env = await FuzzEnv.start();
  let quitCode: number | null = null;
  try {
    const commands = (await env.d.cmd<{ name: string }[]>('query-commands')).map((c) => c.name);
    const before = await env.memory();
    const socketsBefore = await env.socketFds();
    const stats: TargetStats[] = [];
    const qmpShare = opts.target === 'qmp' ? opts.inputs : opts.target === 'nbd' ? 0 : Math.round(opts.inputs / 2);
    const nbdShare = opts.inputs - qmpShare;
    // Lanes get their generators in a fixed order, whatever the target, so a seed means the same inputs.
    const qmpRngs = Array.from({ length: QMP_LANES }, () => root.fork());
    const hsRngs = Array.from({ length: HANDSHAKE_LANES }, () => root.fork());
    const txRngs = Array.from({ length: TRANSMISSION_LANES }, () => root.fork());

    const phase = async (name: string, share: number, lanes: (ctx: CampaignContext) => Promise<void>[]): Promise<void> => {
      const s = newStats(name);
      stats.push(s);
      const ctx = new CampaignContext(env, s, findings, hangMs, log);
      const t0 = Date.now();
      const progress = setInterval(() => log(`  ${name}: ${s.inputs} inputs, ${s.violations} violations, ${s.hangs} hangs, ${s.crashes} crashes (${((Date.now() - t0) / 1000).toFixed(0)} s)`), 30_000);
      try {
        await Promise.all(lanes(ctx));
      } finally {
        clearInterval(progress);
      }
      s.seconds = (Date.now() - t0) / 1000;
      log(`${name}: ${s.inputs} inputs of ${share} in ${s.seconds.toFixed(1)} s`);
    };

    // QMP and NBD inputs run side by side: one daemon, one event loop, serving both at once.
    const hsShare = Math.round(nbdShare * 0.08);
    const txShare = nbdShare - hsShare;
    await Promise.all([
      qmpShare > 0 ? phase('qmp', qmpShare, (ctx) => split(qmpShare, QMP_LANES).map((n, i) => qmpLane(ctx, qmpRngs[i]!, commands, n))) : undefined,
      hsShare > 0 ? phase('nbd-handshake', hsShare, (ctx) => split(hsShare, HANDSHAKE_LANES).map((n, i) => handshakeLane(ctx, hsRngs[i]!, n))) : undefined,
      txShare > 0 ? phase('nbd-transmission', txShare, (ctx) => split(txShare, TRANSMISSION_LANES).map((n, i) => transmissionLane(ctx, txRngs[i]!, i, n))) : undefined,
    ]);

    // The end state: the daemon answers, holds no connection of ours, and quits cleanly.
    const answers = env.alive && (await env.d.cmd('query-version').then(() => true, () => false));
    let createdByInputs = 0;
    let after = before;
    let socketsAfter = -1;
    if (answers) {
      createdByInputs = (await env.removeCreated()).length;
      for (let i = 0; i < 100; i++) {
        socketsAfter = await env.socketFds();
        if (socketsAfter <= socketsBefore) break;
        await new Promise((r) => setTimeout(r, 100));
      }
      after = await env.memory();
    }
    const errorLogs = env.d
      .stderr()
      .split('\n')
      .filter((l) => /"level":(50|60)/.test(l) || /uncaught|unhandled/i.test(l))
      .slice(0, 20);
    quitCode = await env.close();
    const totals = {
      inputs: stats.reduce((a, s) => a + s.inputs, 0),
      crashes: stats.reduce((a, s) => a + s.crashes, 0) + errorLogs.filter((l) => /uncaught|unhandled/i.test(l)).length,
      hangs: stats.reduce((a, s) => a + s.hangs, 0),
      violations: stats.reduce((a, s) => a + s.violations, 0),
    };
    const finalChecks = { answers, socketsReleased: socketsAfter >= 0 && socketsAfter <= socketsBefore, quitCode };
    return {
      seed: opts.seed,
      target: opts.target,
      requestedInputs: opts.inputs,
      stats,
      totals,
      memory: { before, after },
      sockets: { before: socketsBefore, after: socketsAfter },
      errorLogs,
      createdByInputs,
      finalChecks,
      findings: findings.list,
      seconds: (Date.now() - started) / 1000,
      ok: totals.crashes === 0 && totals.hangs === 0 && totals.violations === 0 && errorLogs.length === 0 && answers && finalChecks.socketsReleased && quitCode === 0,
    };
  } catch (err) {
    if (env.alive) await env.close().catch(() => {});
    throw err;
  }
}

const MiB = 2 ** 20;

/** The summary table and the findings, as printed by `npm run fuzz`. */
export function formatResult(r: CampaignResult): string {
  const lines: string[] = [];
  const row = (cells: (string | number)[]) => lines.push(cells.map((c, i) => (i === 0 ? String(c).padEnd(18) : String(c).padStart(11))).join(''));
  row(['target', 'inputs', 'conns', 'closes', 'accepted', 'crashes', 'hangs', 'violations', 'seconds']);
  for (const s of r.stats) row([s.target, s.inputs, s.connections, s.expectedCloses, s.accepted, s.crashes, s.hangs, s.violations, s.seconds.toFixed(1)]);
  row(['total', r.totals.inputs, '', '', '', r.totals.crashes, r.totals.hangs, r.totals.violations, r.seconds.toFixed(1)]);
  const m = (x: Memory) => `RSS ${(x.rssBytes / MiB).toFixed(1)} MiB (peak ${(x.hwmBytes / MiB).toFixed(1)})${x.heapUsedBytes !== undefined ? `, heap ${(x.heapUsedBytes / MiB).toFixed(1)} MiB used of ${(x.heapTotalBytes! / MiB).toFixed(1)}` : ''}`;
  lines.push('');
  lines.push(`daemon memory before: ${m(r.memory.before)}`);
  lines.push(`daemon memory after:  ${m(r.memory.after)}`);
  lines.push(`daemon sockets: ${r.sockets.before} before, ${r.sockets.after} after; objects created by accepted inputs and removed: ${r.createdByInputs}`);
  lines.push(`end state: answers QMP ${r.finalChecks.answers ? 'yes' : 'NO'}, connections released ${r.finalChecks.socketsReleased ? 'yes' : 'NO'}, quit exit code ${r.finalChecks.quitCode}`);
  lines.push(`error-level log records: ${r.errorLogs.length}`);
  for (const s of r.stats) {
    lines.push(`${s.target} replies: ${Object.entries(s.errors).sort((a, b) => b[1] - a[1]).map(([k, v]) => `${k} ${v}`).join(', ')}`);
  }
  for (const f of r.findings) lines.push(`FINDING ${f.target} ${f.what}: ${f.detail}${f.index !== undefined ? ` [input #${f.index}]` : ''}${f.input ? ` input(base64)=${f.input.slice(0, 200)}` : ''}`);
  for (const l of r.errorLogs) lines.push(`ERROR LOG ${l.slice(0, 300)}`);
  lines.push(r.ok ? 'fuzz: OK' : 'fuzz: FAILED');
  return lines.join('\n');
}
