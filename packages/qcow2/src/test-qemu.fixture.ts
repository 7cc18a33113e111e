import { execFileSync, spawnSync } from 'node:child_process';

/**
 * Test-only wrappers around qemu-img and qemu-io. Guard callers with requireTools first.
 */

function run(cmd: string, args: string[]): { status: number; stdout: string; stderr: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
  if (r.error) throw r.error;
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

export function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
}

export interface CheckResult {
  'check-errors': number;
  corruptions?: number;
  leaks?: number;
  'image-end-offset'?: number;
  [k: string]: unknown;
}

/** `qemu-img check --output=json` (exit status 2 and 3 still print a report). */
export function qemuCheck(path: string): CheckResult {
  const r = run('qemu-img', ['check', '--output=json', '-f', 'qcow2', path]);
  if (!r.stdout.trim().startsWith('{')) throw new Error(`qemu-img check failed (${r.status}): ${r.stderr}`);
  return JSON.parse(r.stdout) as CheckResult;
}

/** True when the two images read the same (a longer image must read zeroes past the shorter one). */
export function qemuCompare(a: string, fmtA: string, b: string, fmtB: string): { same: boolean; output: string } {
  const r = run('qemu-img', ['compare', '-f', fmtA, '-F', fmtB, a, b]);
  if (r.status !== 0 && r.status !== 1) throw new Error(`qemu-img compare failed (${r.status}): ${r.stderr}`);
  return { same: r.status === 0, output: r.stdout + r.stderr };
}

export function qemuInfo(path: string): Record<string, unknown> {
  return JSON.parse(qemuImg('info', '--output=json', path)) as Record<string, unknown>;
}

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present?: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

export function qemuMap(path: string, fmt = 'qcow2'): MapEntry[] {
  return JSON.parse(qemuImg('map', '--output=json', '-f', fmt, path)) as MapEntry[];
}

/** Runs qemu-io commands against an image (qcow2 by default). */
export function qemuIo(path: string, cmds: string[], fmt = 'qcow2'): string {
  const args = ['-f', fmt];
  for (const c of cmds) args.push('-c', c);
  args.push(path);
  const r = run('qemu-io', args);
  if (r.status !== 0 || /error|failed/i.test(r.stdout + r.stderr)) throw new Error(`qemu-io failed (${r.status}): ${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** Deterministic bytes for test data (xorshift), so failures reproduce. */
export function patternBytes(bytes: number, seed: number): Uint8Array {
  const out = new Uint8Array(bytes);
  let x = seed | 1;
  for (let i = 0; i < bytes; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

/** Per-cluster allocation as qemu-img map sees it: 'data', 'zero' (allocated zero) or 'below' (not allocated in the top image). */
export function mapByCluster(entries: readonly MapEntry[], clusterBytes: number, length: number): string[] {
  const out: string[] = new Array<string>(Math.ceil(length / clusterBytes)).fill('?');
  for (const e of entries) {
    const kind = e.depth === 0 && e.present !== false ? (e.data ? 'data' : 'zero') : 'below';
    for (let off = e.start; off < e.start + e.length; off += clusterBytes) out[Math.floor(off / clusterBytes)] = kind;
  }
  return out;
}
