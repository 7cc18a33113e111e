import { mkdirSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import type { MachineFacts } from './machine.js';

export type Row = Record<string, string | number>;

export function printTable(rows: Row[]): void {
  if (rows.length === 0) return;
  const cols = Object.keys(rows[0]!);
  const cell = (v: string | number | undefined) => (typeof v === 'number' ? formatNumber(v) : (v ?? ''));
  const widths = cols.map((c) => Math.max(c.length, ...rows.map((r) => String(cell(r[c])).length)));
  const line = (vals: string[]) => vals.map((v, i) => v.padEnd(widths[i]!)).join('  ');
  console.log(line(cols));
  console.log(line(widths.map((w) => '-'.repeat(w))));
  for (const r of rows) console.log(line(cols.map((c) => String(cell(r[c])))));
}

export function formatNumber(v: number): string {
  if (!Number.isFinite(v)) return String(v);
  if (Math.abs(v) >= 100) return v.toFixed(0);
  if (Math.abs(v) >= 1) return v.toFixed(2);
  return v.toPrecision(3);
}

/** Writes results as JSON under bench/results/ (git-ignored) and returns the path. */
export function writeResults(name: string, data: { machine: MachineFacts; [k: string]: unknown }): string {
  const dir = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'results');
  mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `${name}-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
  writeFileSync(file, JSON.stringify({ benchmark: name, date: new Date().toISOString(), ...data }, null, 2) + '\n');
  return file;
}

/**
 * The end of the disk benches: the results as JSON (writeResults) and, beside it, the SVG drawn
 * from the same object, so that `--chart FILE.json` (benchStart) redraws exactly this chart.
 */
export function writeResultsAndChart<T extends { machine: MachineFacts }>(name: string, results: T, chart: (r: T & { date: string }) => string): void {
  const file = writeResults(name, results);
  console.log(`\nresults: ${file}`);
  const svgFile = file.replace(/\.json$/, '.svg');
  writeFileSync(svgFile, chart({ ...results, date: new Date().toISOString() }));
  console.log(`chart:   ${svgFile}`);
}
