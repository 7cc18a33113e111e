import t from 'tap';
import { requireLibnbdPython, requireTools } from '@shear/testkit';
import { consistencyRound } from '../lib/consistency-run.js';

const MiB = 2 ** 20;

// Bounded version of the soak (test/soak/consistency.mjs runs many more rounds).
const ROUNDS = [
  { seed: 101, workers: 2, granularity: 65536, sizeBytes: 24 * MiB, speed: 16 * MiB },
  { seed: 202, workers: 1, granularity: 16384, sizeBytes: 16 * MiB, speed: 8 * MiB },
];

for (const r of ROUNDS) {
  t.test(`point in time under a random writer: seed ${r.seed}, ${r.workers} worker(s), bitmap granularity ${r.granularity}`, async (t) => {
    if (!requireTools(t, 'qemu-img', 'nbdcopy') || !requireLibnbdPython(t)) return;
    const report = await consistencyRound({ dir: t.testdir(), ...r });
    t.equal(report.backups, 4, 'full, incremental, pull and fleecing-cache backups all ran');
    t.ok(report.writes > 50, `the guest wrote throughout (${report.writes} writes)`);
    t.ok(report.cacheSpills > 0, `the fleecing cache spilled to its file (${report.cacheSpills} chunks; ${report.cacheWaits} guest writes waited for space)`);
    t.equal(report.mismatchedClusters, 0, report.details.join('; ') || 'every backup equals the disk at its start');
  });
}
