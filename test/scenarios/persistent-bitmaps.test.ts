import t from 'tap';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { requireTools } from '@shear/testkit';
import { startDaemon, type DaemonHandle } from '../lib/daemon.js';
import { makeRawImage, qemuImg } from '../lib/images.js';

const MiB = 2 ** 20;

interface BitmapInfo {
  name: string;
  count: number;
  recording: boolean;
  busy: boolean;
  persistent: boolean;
  inconsistent?: boolean;
}

async function bitmapsOf(d: DaemonHandle, node: string): Promise<BitmapInfo[]> {
  const nodes = await d.cmd<{ 'node-name': string; 'dirty-bitmaps': BitmapInfo[] }[]>('query-named-block-nodes');
  return nodes.find((n) => n['node-name'] === node)!['dirty-bitmaps'];
}

const variants = [
  { name: 'qcow2 (bitmaps extension)', image: 'disk.qcow2', blockdev: (f: string) => `driver=qcow2,node-name=disk0,file.driver=file,file.filename=${f}` },
  { name: 'raw (sidecar file)', image: 'disk.raw', blockdev: (f: string) => `driver=file,node-name=disk0,filename=${f}` },
];

for (const v of variants) {
  t.test(`persistent bitmaps on ${v.name}: kept across a clean restart, inconsistent after kill -9`, async (t) => {
    if (!requireTools(t, 'qemu-img')) return;
    const dir = t.testdir();
    const img = path.join(dir, v.image);
    if (v.image.endsWith('.qcow2')) qemuImg('create', '-q', '-f', 'qcow2', img, String(16 * MiB));
    else makeRawImage(img, 16 * MiB, 5);
    const args = ['--blockdev', v.blockdev(img)];

    let d = await startDaemon(dir, args);
    await d.cmd('block-dirty-bitmap-add', { node: 'disk0', name: 'b0', persistent: true, granularity: 65536 });
    await d.cmd('block-dirty-bitmap-add', { node: 'disk0', name: 'off', persistent: true, disabled: true });
    await d.cmd('block-dirty-bitmap-add', { node: 'disk0', name: 'temp' });
    await d.cmd('x-shear-io', { node: 'disk0', command: 'write -P 0x44 1M 200k' });
    await d.cmd('x-shear-io', { node: 'disk0', command: 'write -P 0x45 9M 1k' });
    const sha = (await d.cmd<{ sha256: string }>('x-debug-block-dirty-bitmap-sha256', { node: 'disk0', name: 'b0' })).sha256;
    t.equal(await d.stop(), 0, 'clean quit');
    if (v.image.endsWith('.qcow2')) {
      const info = JSON.parse(qemuImg('info', '--output=json', img));
      const stored = info['format-specific'].data.bitmaps as { name: string; flags: string[]; granularity: number }[];
      t.same(stored.map((b) => [b.name, b.flags.sort()]).sort(), [['b0', ['auto']], ['off', []]], 'qemu-img info lists the stored bitmaps, not in use');
    } else {
      t.ok(existsSync(`${img}.shear-bitmaps`), 'the sidecar exists');
    }

    d = await startDaemon(dir, args);
    const loaded = await bitmapsOf(d, 'disk0');
    t.match(loaded, [
      { name: 'b0', count: 5 * 65536, recording: true, persistent: true },
      { name: 'off', count: 0, recording: false, persistent: true },
    ]);
    t.equal(loaded.length, 2, 'the non-persistent bitmap is gone');
    t.equal((await d.cmd<{ sha256: string }>('x-debug-block-dirty-bitmap-sha256', { node: 'disk0', name: 'b0' })).sha256, sha, 'bit for bit the same');
    // A write after the restart is recorded, then the daemon dies.
    await d.cmd('x-shear-io', { node: 'disk0', command: 'write -P 0x46 12M 64k' });
    await d.kill();

    d = await startDaemon(dir, args);
    const after = await bitmapsOf(d, 'disk0');
    t.match(after, [{ name: 'b0', inconsistent: true, recording: false }, { name: 'off', inconsistent: true }], 'after a crash the bitmaps are inconsistent');
    const tgt = path.join(dir, 'tgt.raw');
    qemuImg('create', '-q', '-f', 'raw', tgt, String(16 * MiB));
    await d.cmd('blockdev-add', { driver: 'file', 'node-name': 'tgt', filename: tgt });
    await t.rejects(
      d.cmd('blockdev-backup', { device: 'disk0', target: 'tgt', sync: 'incremental', bitmap: 'b0' }),
      { message: /Bitmap "b0" is inconsistent and cannot be used.*block-dirty-bitmap-remove/ },
      'refused for backups',
    );
    await t.rejects(d.cmd('block-dirty-bitmap-clear', { node: 'disk0', name: 'b0' }), { message: /inconsistent/ });
    await d.cmd('block-dirty-bitmap-remove', { node: 'disk0', name: 'b0' });
    await d.cmd('block-dirty-bitmap-remove', { node: 'disk0', name: 'off' });
    t.same(await bitmapsOf(d, 'disk0'), []);
    t.equal(await d.stop(), 0);
    if (v.image.endsWith('.qcow2')) {
      const info = JSON.parse(qemuImg('info', '--output=json', img));
      t.notOk(info['format-specific'].data.bitmaps?.length, 'removed from the image');
      t.equal(JSON.parse(qemuImg('check', '--output=json', img))['check-errors'], 0);
    }
    d = await startDaemon(dir, args);
    t.same(await bitmapsOf(d, 'disk0'), [], 'and they stay removed');
    await d.stop();
  });
}

t.test('persistent bitmaps are refused where they cannot be stored; stores on request', async (t) => {
  const dir = t.testdir();
  const d = await startDaemon(dir, ['--blockdev', 'driver=null-co,node-name=null0,size=1048576']);
  t.teardown(() => d.stop());
  await t.rejects(d.cmd('block-dirty-bitmap-add', { node: 'null0', name: 'p', persistent: true }), { message: /Cannot store dirty bitmaps on node "null0"/ });
  t.same(await bitmapsOf(d, 'null0'), []);
  await t.rejects(d.cmd('x-shear-store-bitmaps', { node: 'null0' }), { message: /Cannot store dirty bitmaps/ });
});
