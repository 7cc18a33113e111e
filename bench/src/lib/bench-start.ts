import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { canDropCaches } from './copy-runner.js';

export type Cache = 'cold' | 'warm';

/** A numeric BENCH_* setting: positive (or zero where allowed), else the bench stops with its name. */
export function envNumber(name: string, fallback: number, allowZero = false): number {
  const v = process.env[name];
  if (v === undefined || v === '') return fallback;
  const n = Number(v);
  if (!Number.isFinite(n) || n < 0 || (n === 0 && !allowZero)) throw new Error(`Invalid ${name} "${v}": expected a ${allowZero ? 'non-negative' : 'positive'} number`);
  return n;
}

/**
 * The checks every disk bench makes before it runs: `--chart FILE.json` (re-render a saved result
 * and stop), the CLI built, BENCH_CACHE valid, and root when a cold run needs the page cache
 * dropped. Returns the caches to run, or an exit status when the bench should stop now.
 */
export function benchStart<T>(
  name: string,
  opts: { cli: string; cacheEnv: string; chart: (input: T) => string },
): { caches: Cache[] } | { exit: number } {
  const chartArg = process.argv.indexOf('--chart');
  if (chartArg >= 0) {
    const json = process.argv[chartArg + 1];
    if (!json?.endsWith('.json')) {
      console.error(`${name} bench: --chart needs a results file (bench/results/${name}-*.json)`);
      return { exit: 2 };
    }
    const svgFile = json.replace(/\.json$/, '.svg');
    writeFileSync(svgFile, opts.chart(JSON.parse(readFileSync(json, 'utf8')) as T));
    console.log(`chart: ${svgFile}`);
    return { exit: 0 };
  }
  if (!existsSync(opts.cli)) {
    console.error(`${name} bench: ${opts.cli} is missing; build first (npx tsc -b)`);
    return { exit: 2 };
  }
  const env = opts.cacheEnv;
  const caches: Cache[] = env === 'both' ? ['cold', 'warm'] : env === 'cold' || env === 'warm' ? [env] : [];
  if (caches.length === 0) {
    console.error(`${name} bench: invalid BENCH_CACHE "${env}": expected cold, warm or both`);
    return { exit: 2 };
  }
  if (caches.includes('cold') && !canDropCaches()) {
    console.error(`${name} bench: cannot drop the page cache (writing /proc/sys/vm/drop_caches needs root); run as root or with BENCH_CACHE=warm`);
    return { exit: 2 };
  }
  return { caches };
}
