#!/usr/bin/env node
// npm run bench            lists the benchmarks
// npm run bench -- NAME    runs one (after the build that npm run bench does first)
import { readdirSync } from 'node:fs';
import { spawnSync } from 'node:child_process';

const dist = new URL('./dist/', import.meta.url);
const names = readdirSync(dist).filter((f) => f.endsWith('.bench.js')).map((f) => f.replace(/\.bench\.js$/, '')).sort();
const name = process.argv[2];
if (!name) {
  console.log('benchmarks (run one with: npm run bench -- NAME):');
  for (const n of names) console.log(`  ${n}`);
  process.exit(0);
}
if (!names.includes(name)) {
  console.error(`bench: no benchmark named "${name}"; known: ${names.join(', ')}`);
  process.exit(2);
}
const r = spawnSync(process.execPath, [new URL(`${name}.bench.js`, dist).pathname, ...process.argv.slice(3)], { stdio: 'inherit' });
process.exit(r.status ?? 1);
