// npm run fuzz -- [--inputs N] [--seed S] [--target qmp|nbd|all] [--hang-ms MS]
// The generated-input campaign over the daemon's QMP parser and dispatcher and its NBD server
// (handshake and transmission). Prints a summary table and writes the figures as JSON under
// bench/results/. Exit status 0 only when nothing crashed, hung or broke the protocol.
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { formatResult, runCampaign, type Target } from './campaign.js';

function usage(msg: string): never {
  console.error(`npm run fuzz: ${msg}\nusage: npm run fuzz -- [--inputs N] [--seed S] [--target qmp|nbd|all] [--hang-ms MS]`);
  process.exit(2);
}

const args = process.argv.slice(2);
const opts = { inputs: 1_000_000, seed: 1, target: 'all' as Target, hangMs: 30_000 };
for (let i = 0; i < args.length; i++) {
  const a = args[i]!;
  const v = args[i + 1];
  const num = (name: string) => {
    if (v === undefined || !/^\d+$/.test(v)) usage(`${name} needs a non-negative integer`);
    i++;
    return Number(v);
  };
  if (a === '--inputs') opts.inputs = num('--inputs');
  else if (a === '--seed') opts.seed = num('--seed');
  else if (a === '--hang-ms') opts.hangMs = num('--hang-ms');
  else if (a === '--target') {
    if (v !== 'qmp' && v !== 'nbd' && v !== 'all') usage('--target is qmp, nbd or all');
    opts.target = v;
    i++;
  } else usage(`unknown option ${a}`);
}

console.log(`fuzz: ${opts.inputs} inputs, seed ${opts.seed}, target ${opts.target}`);
const result = await runCampaign({ ...opts, log: (l) => console.log(l) });
console.log(formatResult(result));
const dir = path.join(import.meta.dirname, '..', '..', 'bench', 'results');
mkdirSync(dir, { recursive: true });
const file = path.join(dir, `fuzz-${opts.target}-seed${opts.seed}-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
writeFileSync(file, JSON.stringify({ command: `npm run fuzz -- ${args.join(' ')}`.trim(), node: process.version, ...result }, null, 2));
console.log(`figures: ${path.relative(process.cwd(), file)}`);
process.exitCode = result.ok ? 0 : 1;
