// npm run soak -- [MINUTES]   (default 10)
// Rounds of the point-in-time check under a random writer (full push, incremental, pull, slow
// backup through a small fleecing cache) with
// random seeds, worker counts, bitmap granularities and disk sizes, until the time is up.
// Prints how many rounds, backups, guest writes and bytes it checked, and any mismatch.
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { consistencyRound } from '../lib/consistency-run.js';

const MiB = 2 ** 20;
const minutes = Number(process.argv[2] ?? 10);
const deadline = Date.now() + minutes * 60_000;
const totals = { rounds: 0, backups: 0, writes: 0, bytesChecked: 0, mismatchedClusters: 0, failedRounds: 0, cacheWaits: 0 };
let x = Number(process.env['SOAK_SEED'] ?? Date.now()) >>> 0;
const rand = (n: number) => {
  x = (Math.imul(x, 1103515245) + 12345) >>> 0;
  return (x >>> 8) % n;
};
while (Date.now() < deadline) {
  const params = {
    seed: rand(1 << 30),
    workers: [1, 2, 4][rand(3)]!,
    granularity: [4096, 16384, 65536, 262144][rand(4)]!,
    sizeBytes: [16, 32, 64][rand(3)]! * MiB,
    speed: [8, 16, 32][rand(3)]! * MiB,
  };
  const dir = mkdtempSync(path.join(os.tmpdir(), 'shear-soak-'));
  try {
    const r = await consistencyRound({ dir, ...params });
    totals.rounds++;
    totals.backups += r.backups;
    totals.writes += r.writes;
    totals.bytesChecked += r.bytesChecked;
    totals.mismatchedClusters += r.mismatchedClusters;
    totals.cacheWaits += r.cacheWaits;
    // A guest that stopped (a refused write) is a failure too: it means a write failed.
    if (r.details.some((d) => d.startsWith('writer:')) || r.writes === 0) totals.failedRounds++;
    console.log(`round ${totals.rounds}: ${JSON.stringify(params)} -> ${r.writes} writes, ${r.backups} backups, ${r.cacheWaits} cache waits, ${r.mismatchedClusters} mismatched clusters${r.details.length ? ' ' + r.details.join('; ') : ''}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
console.log(`\nsoak: ${totals.rounds} rounds, ${totals.backups} backups, ${totals.writes} guest writes, ${(totals.bytesChecked / MiB).toFixed(0)} MiB checked, ${totals.cacheWaits} guest writes that waited for fleecing-cache space, ${totals.mismatchedClusters} mismatched clusters, ${totals.failedRounds} rounds with a failed guest write`);
process.exitCode = totals.mismatchedClusters === 0 && totals.failedRounds === 0 ? 0 : 1;
