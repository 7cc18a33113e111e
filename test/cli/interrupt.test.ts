import t from 'tap';
import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { shear } from '../lib/cli.js';
import { makeRawImage } from '../lib/images.js';

// Issue 14 item 5: a 0-byte source used to spin the main thread forever (deaf to signals), and
// signals must end every phase of a backup with 130/143, one line, and nothing left behind.

const MiB = 2 ** 20;

function leftovers(dir: string, keep: string[]): string[] {
  return readdirSync(dir).filter((f) => !keep.includes(f));
}

t.test('a 0-byte source gives a 0-byte target', async (t) => {
  const dir = t.testdir();
  const src = path.join(dir, 'empty.raw');
  writeFileSync(src, '');
  for (const fmt of ['raw', 'qcow2']) {
    const dst = path.join(dir, `out.${fmt}`);
    const r = await shear(['backup', '--source', src, '--target', dst, '--target-format', fmt, '--verify', '--json']);
    t.equal(r.code, 0, r.stderr);
    t.match(JSON.parse(r.stdout), { bytes: 0, copiedBytes: 0, verified: true, retries: 0 });
    if (fmt === 'raw') t.equal(statSync(dst).size, 0, 'the target is empty');
  }
  t.same(leftovers(dir, ['empty.raw', 'out.raw', 'out.qcow2']), [], 'no partial file');
});

const PHASES = ['open', 'copy', 'verify', 'fsync', 'rename'] as const;

for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  t.test(`${sig} in every phase of a backup: exit ${sig === 'SIGINT' ? 130 : 143}, one line, nothing left`, async (t) => {
    const dir = t.testdir();
    const src = path.join(dir, 'disk.raw');
    makeRawImage(src, 8 * MiB, 7);
    for (const phase of PHASES) {
      const dst = path.join(dir, 'out.raw');
      let signalled = false;
      const r = await shear(['backup', '--source', src, '--target', dst, '--verify', '--max-chunk', '64k', '--workers', '2'], {
        env: { SHEAR_PAUSE_AT: phase },
        onSpawn: (kill, stderr) => {
          const poll = setInterval(() => {
            if (stderr().includes(`shear: paused at ${phase}\n`)) {
              clearInterval(poll);
              signalled = true;
              kill(sig);
            }
          }, 10);
        },
      });
      t.ok(signalled, `${phase}: the command reached the phase`);
      t.equal(r.code, sig === 'SIGINT' ? 130 : 143, `${phase}: exit status (${r.stderr})`);
      const lines = r.stderr.split('\n').filter((l) => l && !l.startsWith('shear: paused at'));
      t.same(lines, [`shear: interrupted; nothing was written to ${dst}`], `${phase}: one line, no log record`);
      t.notOk(existsSync(dst), `${phase}: no target`);
      t.same(leftovers(dir, ['disk.raw']), [], `${phase}: no partial file`);
    }
  });
}

t.test('a signal whose unwinding stalls still ends the command within the limit, leaving nothing', async (t) => {
  // Workers and nodes that take longer to close than the unwind limit (a busy machine, a wedged
  // disk): the forced exit must still delete the partial file. SHEAR_STALL_UNWIND holds the
  // unwinding after the workers and nodes are closed, before the partial file is removed.
  const dir = t.testdir();
  const src = path.join(dir, 'disk.raw');
  makeRawImage(src, 8 * MiB, 5);
  const dst = path.join(dir, 'out.raw');
  const r = await shear(['backup', '--source', src, '--target', dst, '--max-chunk', '64k', '--workers', '2'], {
    env: { SHEAR_PAUSE_AT: 'copy', SHEAR_STALL_UNWIND: '1' },
    onSpawn: (kill, stderr) => {
      const poll = setInterval(() => {
        if (stderr().includes('shear: paused at copy\n')) {
          clearInterval(poll);
          kill('SIGINT');
        }
      }, 10);
    },
  });
  t.match(r.stderr, /shear: unwinding stalled\n/, 'the unwinding was held');
  t.equal(r.code, 130, `exit status (${r.stderr})`);
  t.match(r.stderr, new RegExp(`shear: interrupted; nothing was written to ${dst.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}\n`), 'one line');
  t.notOk(existsSync(dst), 'no target');
  t.same(leftovers(dir, ['disk.raw']), [], 'no partial file');
});

t.test('without SHEAR_PAUSE_AT the same backup runs straight through', async (t) => {
  const dir = t.testdir();
  const src = path.join(dir, 'disk.raw');
  const content = makeRawImage(src, 2 * MiB, 3);
  const r = await shear(['backup', '--source', src, '--target', path.join(dir, 'out.raw'), '--verify']);
  t.equal(r.code, 0, r.stderr);
  t.notMatch(r.stderr, /paused/);
  t.ok(readFileSync(path.join(dir, 'out.raw')).equals(content));
});
