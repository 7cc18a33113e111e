import { performance } from 'node:perf_hooks';

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
