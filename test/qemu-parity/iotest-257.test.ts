import t, { type Test } from 'tap';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { haveTool, requireTools } from '@shear/testkit';
import { LIBNBD_PYTHON, apiCases, bitmapSyncCase, combinations, startQsd, startShear, type Daemon, type Transcript } from '../lib/iotest257.js';

/**
 * QEMU's iotest 257 replayed against qemu-storage-daemon and against Shear's daemon: for every
 * combination the two transcripts (events with their offset/len/error, bitmap counts and
 * SHA-256s, image comparisons, API errors) must be equal. One daemon of each kind serves every
 * case (each case removes all it added); the two run a case at once, each on its own images.
 */
// 22 cases of seven backups each on two daemons: about 3 minutes on a quiet 2-core machine,
// longer than the suite's 300 s per file when the machine is shared by many (load 30: 6 min).
t.setTimeout(15 * 60_000);

const tools = ['qemu-storage-daemon', 'qemu-io', 'qemu-img', 'nbdsh', LIBNBD_PYTHON];
let daemons: { qemu: Daemon; shear: Daemon } | undefined;

t.before(async () => {
  if (!tools.every(haveTool)) return;
  const root = t.testdir();
  const [qemu, shear] = await Promise.allSettled([startQsd(), startShear(root)]);
  if (qemu.status === 'fulfilled' && shear.status === 'fulfilled') daemons = { qemu: qemu.value, shear: shear.value };
  else {
    for (const r of [qemu, shear]) if (r.status === 'fulfilled') await r.value.stop();
    throw [qemu, shear].find((r) => r.status === 'rejected')!.reason;
  }
});
t.teardown(async () => {
  if (daemons) await Promise.all([daemons.qemu.stop(), daemons.shear.stop()]);
});

async function both(t: Test, name: string, body: (d: Daemon, dir: string) => Promise<Transcript>): Promise<{ qemu: Transcript; shear: Transcript }> {
  const root = t.testdir();
  const dirs = { qemu: path.join(root, 'qemu'), shear: path.join(root, 'shear') };
  mkdirSync(dirs.qemu);
  mkdirSync(dirs.shear);
  const [qemu, shear] = await Promise.all([body(daemons!.qemu, dirs.qemu), body(daemons!.shear, dirs.shear)]);
  if (process.env['SHEAR_257_DUMP']) process.stderr.write(`${name}\nqemu:  ${JSON.stringify(qemu)}\nshear: ${JSON.stringify(shear)}\n`);
  return { qemu, shear };
}

// SHEAR_257_ONLY=<substring of a name> runs only the matching cases (while debugging one).
const only = process.env['SHEAR_257_ONLY'];
for (const c of combinations()) {
  const name = `sync ${c.sync}, bitmap mode ${c.bitmapMode}, ${c.failure === 'none' ? 'no' : c.failure} failure`;
  if (only && !name.includes(only)) continue;
  t.test(name, async (t) => {
    if (!requireTools(t, ...tools)) return;
    const { qemu, shear } = await both(t, name, (d, dir) => bitmapSyncCase(d, dir, c));
    t.same(shear, qemu, 'Shear saw what qemu-storage-daemon saw');
    if (c.failure === 'intermediate') {
      const text = JSON.stringify(qemu);
      t.match(text, /"event":"BLOCK_JOB_ERROR","data":\{[^}]*"operation":"read"/, 'the oracle reported the read error (the fault was armed)');
    }
  });
}

if (!only || 'API failure cases'.includes(only)) t.test('API failure cases', async (t) => {
  if (!requireTools(t, ...tools)) return;
  const { qemu, shear } = await both(t, 'api', apiCases);
  t.same(shear, qemu, 'Shear refuses what qemu-storage-daemon refuses, with the same errors');
});
