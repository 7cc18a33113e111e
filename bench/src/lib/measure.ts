import { performance } from 'node:perf_hooks';
import type { Stat } from './svg-chart.js';

export function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

/**
 * Runs `fn` `runs` times after `warmup` unmeasured runs and returns every duration in ms.
 * `setup` runs before each call, outside the timing.
 */
export async function timeRuns(fn: () => unknown, opts: { runs: number; warmup?: number; setup?: () => unknown }): Promise<number[]> {
  const times: number[] = [];
  for (let i = 0; i < (opts.warmup ?? 1) + opts.runs; i++) {
    await opts.setup?.();
    const t0 = performance.now();
    await fn();
    const dt = performance.now() - t0;
    if (i >= (opts.warmup ?? 1)) times.push(dt);
  }
  return times;
}

/** Repeats a fast synchronous `fn` until `minMs` have passed and returns ms per call. */
export function timePerCall(fn: () => unknown, minMs = 50): number {
  let n = 0;
  const t0 = performance.now();
  let dt = 0;
  do {
    fn();
    n++;
    dt = performance.now() - t0;
  } while (dt < minMs);
  return dt / n;
}

/** Median, min and max of a set of runs; undefined when there were none. */
export function stat(values: number[]): Stat | undefined {
  return values.length ? { median: median(values), min: Math.min(...values), max: Math.max(...values) } : undefined;
}

/** The p-th percentile of ascending values (nearest rank). */
export function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

/**
 * A writer's latencies per mode over several runs: each run's p50, p99 and max, plus one extra
 * figure per run (the backup's rate or time); summary() gives the medians across runs.
 */
export class LatencyRuns<M extends string> {
  readonly #runs = new Map<M, { p50: number[]; p99: number[]; max: number[]; extra: number[]; n: number }>();

  add(mode: M, latencies: number[], extra: number): void {
    const sorted = [...latencies].sort((a, b) => a - b);
    const a = this.#runs.get(mode) ?? { p50: [], p99: [], max: [], extra: [], n: 0 };
    a.p50.push(percentile(sorted, 50));
    a.p99.push(percentile(sorted, 99));
    a.max.push(sorted.at(-1)!);
    a.extra.push(extra);
    a.n += sorted.length;
    this.#runs.set(mode, a);
  }

  summary(mode: M): { writes: number; p50: number; p99: number; max: number; extra: number } {
    const a = this.#runs.get(mode);
    if (!a) throw new Error(`no runs of mode "${mode}"`);
    return { writes: a.n, p50: median(a.p50), p99: median(a.p99), max: median(a.max), extra: median(a.extra) };
  }

  /** The latency columns of a results row for `mode`, with its p99 as a ratio to `base`'s. */
  row(mode: M, base: M): Record<string, string | number> {
    const a = this.summary(mode);
    return { mode, writes: a.writes, 'p50 ms': a.p50, 'p99 ms': a.p99, 'max ms': a.max, [`p99 vs ${base} x`]: a.p99 / this.summary(base).p99 };
  }
}
