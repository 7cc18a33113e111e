import t from 'tap';
import { formatResult, runCampaign } from '../fuzz/campaign.js';

// A small run of `npm run fuzz` (fixed seed) so the harness itself cannot rot: it must reach
// every target, and a healthy daemon must come out of it with nothing to report. The full
// campaign (a million inputs) is its own command; see docs/reliability.md.
t.test('a 2,000-input fuzz campaign over QMP and NBD finds no crash, hang or protocol violation', async (t) => {
  const r = await runCampaign({ inputs: 2000, seed: 14, target: 'all', hangMs: 120_000 });
  const report = formatResult(r);
  t.ok(r.totals.inputs >= 2000, `${r.totals.inputs} inputs ran`);
  t.same(r.stats.map((s) => s.target).sort(), ['nbd-handshake', 'nbd-transmission', 'qmp'], 'every target ran');
  for (const s of r.stats) t.ok(s.inputs > 0 && s.connections > 0, `${s.target}: ${s.inputs} inputs over ${s.connections} connections`);
  t.same(r.findings, [], 'no findings');
  t.same(r.totals, { ...r.totals, crashes: 0, hangs: 0, violations: 0 }, 'no crash, hang or violation');
  t.same(r.errorLogs, [], 'no error-level log record');
  t.same(r.finalChecks, { answers: true, socketsReleased: true, quitCode: 0 }, 'the daemon still answered, held no connection of ours, and quit with 0');
  t.ok(r.memory.after.rssBytes > 0 && r.memory.before.heapUsedBytes! > 0, 'memory figures were read');
  if (!r.ok) t.comment(report);
});
