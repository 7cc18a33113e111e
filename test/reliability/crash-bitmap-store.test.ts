import t from 'tap';
import { readdirSync } from 'node:fs';
import path from 'node:path';
import { requireTools } from '@shear/testkit';
import { startDaemon, type DaemonHandle } from '../lib/daemon.js';
import { qemuImg, qemuImgCheck } from '../lib/images.js';

// 16 crashes, each with three daemon starts: well under a minute on a quiet machine, but about
// 300 s (tap's per-file default) when the suite runs beside CPU hogs. A hang guard, not a speed bound.
t.setTimeout(15 * 60_000);

// kill -9 of the daemon exactly while it stores persistent bitmaps: SHEAR_CRASH_AT (a test-only
// hook, packages/base/src/crash-point.ts) kills it right after one write step of the store. After
// a restart every bitmap must be consistent with exactly the bits it had, or inconsistent; never
// consistent with other bits. The image must stay sound and keep its data.

const MiB = 2 ** 20;

interface BitmapInfo {
  name: string;
  count: number;
  recording: boolean;
  persistent: boolean;
  inconsistent?: boolean;
}

async function bitmapsOf(d: DaemonHandle): Promise<BitmapInfo[]> {
  const nodes = await d.cmd<{ 'node-name': string; 'dirty-bitmaps': BitmapInfo[] }[]>('query-named-block-nodes');
  return nodes.find((n) => n['node-name'] === 'disk0')!['dirty-bitmaps'];
}

const sha = async (d: DaemonHandle, name: string) => (await d.cmd<{ sha256: string }>('x-debug-block-dirty-bitmap-sha256', { node: 'disk0', name })).sha256;
const io = (d: DaemonHandle, command: string) => d.cmd('x-shear-io', { node: 'disk0', command });

/** Data written, life by life: checked byte for byte after the crash. */
const WRITES_BEFORE = ['-P 0x44 1M 200k', '-P 0x45 9M 1k'];
const WRITE_LATE = '-P 0x48 14M 4k';
const WRITES_DURING = ['-P 0x46 12M 64k', '-P 0x47 3M 5k'];

/**
 * Steps of a consistent store, in order, and whether the new bitmaps are in force after it
 * (before: the old entries, which were marked in use when the image was opened, stay in force).
 */
const variants = [
  {
    kind: 'qcow2',
    image: 'disk.qcow2',
    blockdev: (f: string) => `driver=qcow2,node-name=disk0,file.driver=file,file.filename=${f}`,
    steps: { data: false, directory: false, refcounts: false, header: true, freed: true } as Record<string, boolean>,
  },
  {
    kind: 'raw',
    image: 'disk.raw',
    blockdev: (f: string) => `driver=file,node-name=disk0,filename=${f}`,
    steps: { 'sidecar-tmp': false, 'sidecar-rename': true, 'sidecar-dir': true } as Record<string, boolean>,
  },
];

for (const v of variants) {
  for (const [step, committed] of Object.entries(v.steps)) {
    for (const trigger of ['x-shear-store-bitmaps', 'quit'] as const) {
      t.test(`${v.kind}: kill -9 right after "${step}" of a bitmap store (${trigger})`, async (t) => {
        if (!requireTools(t, 'qemu-img')) return;
        const dir = t.testdir();
        const img = path.join(dir, v.image);
        qemuImg('create', '-q', '-f', v.kind, img, String(16 * MiB));
        const args = ['--blockdev', v.blockdev(img)];

        // First life: bitmaps created, data written, stored consistent by a clean quit.
        let d = await startDaemon(dir, args);
        await d.cmd('block-dirty-bitmap-add', { node: 'disk0', name: 'b0', persistent: true, granularity: 65536 });
        await d.cmd('block-dirty-bitmap-add', { node: 'disk0', name: 'fine', persistent: true, granularity: 4096 });
        await d.cmd('block-dirty-bitmap-add', { node: 'disk0', name: 'off', persistent: true });
        for (const w of WRITES_BEFORE) await io(d, `write ${w}`);
        await d.cmd('block-dirty-bitmap-disable', { node: 'disk0', name: 'off' });
        await d.cmd('block-dirty-bitmap-add', { node: 'disk0', name: 'late', persistent: true });
        await io(d, `write ${WRITE_LATE}`);
        t.equal(await d.stop(), 0, 'first life: clean quit', { signal: d.proc.signalCode, stderr: d.stderr() });

        // Second life: the bitmaps, taken over at open, record more writes (nothing else may mark
        // them in use on disk meanwhile), then a store that the hook cuts short.
        d = await startDaemon(dir, args, { env: { SHEAR_CRASH_AT: `bitmap-store:${step}` } });
        for (const w of WRITES_DURING) await io(d, `write ${w}`);
        await io(d, 'flush');
        const names = ['b0', 'fine', 'off', 'late'];
        const want = new Map<string, { sha: string; count: number }>();
        for (const b of await bitmapsOf(d)) want.set(b.name, { sha: await sha(d, b.name), count: b.count });
        t.same([...want.keys()].sort(), [...names].sort(), 'four persistent bitmaps before the store');
        t.ok(want.get('off')!.count > 0 && want.get('off')!.count < want.get('b0')!.count, 'the disabled bitmap holds only the first writes');
        const died = new Promise<NodeJS.Signals | null>((resolve) => d.proc.once('exit', (_code, signal) => resolve(signal)));
        await d.cmd(trigger, trigger === 'quit' ? {} : { node: 'disk0' }).catch(() => undefined);
        t.equal(await died, 'SIGKILL', `the daemon killed itself after "${step}"`);
        await d.stop();

        // The image as the crash left it: sound, readable by QEMU, bitmaps old (in use) or new.
        if (v.kind === 'qcow2') {
          const check = qemuImgCheck(img);
          t.equal(check['check-errors'], 0, 'qemu-img check: no error');
          t.notOk(check.corruptions, 'qemu-img check: no corruption (leaks at most)');
          const info = JSON.parse(qemuImg('info', '--output=json', img));
          const stored = (info['format-specific'].data.bitmaps ?? []) as { name: string; flags: string[] }[];
          t.same(stored.map((b) => b.name).sort(), [...names].sort(), 'qemu-img info lists every bitmap');
          for (const b of stored) t.equal(b.flags.includes('in-use'), !committed, `${b.name}: ${committed ? 'stored consistent' : 'still in use'} for QEMU`);
        } else {
          const strays = readdirSync(dir).filter((f) => f.includes('.shear-bitmaps.tmp-'));
          // Harmless (never read), but worth knowing: only a crash before the rename leaves one.
          t.ok(strays.length <= (step === 'sidecar-tmp' ? 1 : 0), `temporary sidecars left: ${strays.length}`);
        }

        // Third life: each bitmap is consistent with exactly its bits, or inconsistent.
        d = await startDaemon(dir, args);
        const after = await bitmapsOf(d);
        t.same(after.map((b) => b.name).sort(), [...names].sort(), 'every persistent bitmap is back');
        for (const b of after) {
          if (b.inconsistent) {
            t.notOk(committed, `${b.name}: inconsistent, as the store had not committed`);
            continue;
          }
          t.ok(committed, `${b.name}: consistent only once the store committed`);
          t.equal(b.count, want.get(b.name)!.count, `${b.name}: same count`);
          t.equal(await sha(d, b.name), want.get(b.name)!.sha, `${b.name}: bit for bit the same`);
        }
        for (const w of [...WRITES_BEFORE, WRITE_LATE, ...WRITES_DURING]) await t.resolves(io(d, `read ${w}`), `data intact: ${w}`);
        t.equal(await d.stop(), 0, 'third life: clean quit', { signal: d.proc.signalCode, stderr: d.stderr() });
        if (v.kind === 'raw') t.same(readdirSync(dir).filter((f) => f.includes('.shear-bitmaps.tmp-')), [], 'the next store removed any temporary sidecar the crash left');
        if (v.kind === 'qcow2') t.equal(qemuImgCheck(img)['check-errors'], 0, 'qemu-img check after the restart');
      });
    }
  }
}
