import t, { type Test } from 'tap';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { QmpClient } from '@shear/qmp';
import { requireTools } from '@shear/testkit';
import { shear } from '../lib/cli.js';
import { jobEnd, startDaemon, type DaemonHandle } from '../lib/daemon.js';
import { makeRawImage, qemuImg } from '../lib/images.js';

const MiB = 2 ** 20;
const C = 65536;
const SIZE = 16 * MiB;

interface CacheInfo { 'ram-bytes': number; 'ram-used': number; 'file-used': number; spills: number; drained: number }

async function cacheInfo(d: DaemonHandle): Promise<CacheInfo> {
  const nodes = await d.cmd<{ 'node-name': string; 'x-shear-cache'?: CacheInfo }[]>('query-named-block-nodes');
  return nodes.find((n) => n['node-name'] === 'cache')!['x-shear-cache']!;
}

/**
 * A daemon on a 16 MiB disk of non-zero clusters (so every overwritten cluster needs
 * preserving), a raw spill file and a raw final target beside it.
 */
async function setup(t: Test, seed: number) {
  const dir = t.testdir();
  const disk = path.join(dir, 'disk.raw');
  const data = makeRawImage(disk, SIZE, seed);
  for (let o = 0; o < SIZE; o += C) if (data.subarray(o, o + C).every((b) => b === 0)) data.fill(7, o, o + C);
  writeFileSync(disk, data);
  const spill = path.join(dir, 'spill.tmp');
  qemuImg('create', '-q', '-f', 'raw', spill, String(SIZE));
  const final = path.join(dir, 'final.raw');
  qemuImg('create', '-q', '-f', 'raw', final, String(SIZE));
  const d = await startDaemon(dir, ['--blockdev', `driver=file,node-name=disk0,filename=${disk}`]);
  t.teardown(() => d.stop());
  return { d, disk, data, spill, final };
}

t.test('fleecing cache: RAM first, spill file second, drained to the target with discard-source', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const { d, disk, spill, final } = await setup(t, 52);
  await d.cmd('x-shear-io', { node: 'disk0', command: 'read 0 4k' });
  await d.cmd('blockdev-add', { driver: 'fleecing-cache', 'node-name': 'cache', 'ram-bytes': MiB, file: { driver: 'file', filename: spill } });
  await t.rejects(d.cmd('blockdev-backup', { 'job-id': 'fleece', device: 'disk0', target: 'cache', sync: 'none', 'x-shear-cbw-timeout': -1 }), { message: /x-shear-cbw-timeout/ });
  await d.cmd('blockdev-backup', { 'job-id': 'fleece', device: 'disk0', target: 'cache', sync: 'none', 'filter-node-name': 'cbw', 'x-shear-cbw-timeout': 20 });
  t.match(await cacheInfo(d), { 'wait-ms': 20_000 }, "the job's filter gives the cache its cbw-timeout");
  const snapshot = readFileSync(disk);
  await d.cmd('blockdev-add', { driver: 'snapshot-access', 'node-name': 'snap', file: 'cbw' });
  // The guest overwrites 4 MiB: 1 MiB of old data fits in RAM, 3 MiB spill to the file.
  for (let c = 0; c < 64; c++) await d.cmd('x-shear-io', { node: 'disk0', command: `write -P 0x42 ${c * C} 64k` });
  let info = await cacheInfo(d);
  t.match(info, { 'ram-used': MiB, 'file-used': 3 * MiB, spills: 48 }, 'RAM first, then the spill file');
  t.ok(statSync(spill).blocks * 512 >= 3 * MiB, 'the spilled data is in the file');
  // The backup to the (slow) target drains the cache as it goes.
  await d.cmd('blockdev-add', { driver: 'file', 'node-name': 'final', filename: final });
  await d.cmd('blockdev-backup', { 'job-id': 'drain', device: 'snap', target: 'final', sync: 'full', 'discard-source': true, 'x-perf': { 'max-chunk': 65536, 'max-workers': 1 } });
  const end = await jobEnd(d, 'drain');
  t.notOk(end.data?.['error']);
  info = await cacheInfo(d);
  t.match(info, { 'ram-used': 0, 'file-used': 0, drained: 64 }, 'every cached chunk was freed once it reached the target');
  t.ok(statSync(spill).blocks * 512 < MiB, 'and the spill file is empty again');
  await d.cmd('blockdev-del', { 'node-name': 'final' });
  t.ok(readFileSync(final).equals(snapshot), 'the target holds the disk as it was');
  await d.cmd('blockdev-del', { 'node-name': 'snap' });
  await d.cmd('job-cancel', { id: 'fleece' });
});

for (const policy of ['break-guest-write', 'break-snapshot'] as const) {
  t.test(`fleecing cache full (RAM and file): on-cbw-error=${policy} is followed exactly`, async (t) => {
    if (!requireTools(t, 'qemu-img')) return;
    const { d, data, spill } = await setup(t, 53);
    // Room for 4 chunks in RAM and 4 in the file.
    await d.cmd('blockdev-add', { driver: 'fleecing-cache', 'node-name': 'cache', 'ram-bytes': 4 * C, 'file-bytes': 4 * C, file: { driver: 'file', filename: spill } });
    await d.cmd('blockdev-add', { driver: 'copy-before-write', 'node-name': 'cbw', file: 'disk0', target: 'cache', 'on-cbw-error': policy });
    await d.cmd('blockdev-add', { driver: 'snapshot-access', 'node-name': 'snap', file: 'cbw' });
    // Writes go through the filter (a guest attached to it, as an export on it would be).
    for (let c = 0; c < 8; c++) await d.cmd('x-shear-io', { node: 'cbw', command: `write -P 0x43 ${c * C} 64k` });
    const ninth = d.cmd('x-shear-io', { node: 'cbw', command: `write -P 0x44 ${8 * C} 64k` });
    if (policy === 'break-guest-write') {
      await t.rejects(ninth, { message: /copy-before-write failed.*fleecing cache is full/ }, 'the guest write fails');
      await t.rejects(d.cmd('x-shear-io', { node: 'cbw', command: `read -P 0x44 ${8 * C} 64k` }), { message: /Pattern verification failed/ }, 'and did not change the disk');
      await d.cmd('x-shear-io', { node: 'snap', command: `read -P 0x${data[0]!.toString(16)} 0 1` });
      t.pass('the snapshot stays readable, with the old data');
    } else {
      await ninth;
      t.pass('the guest write succeeds');
      await t.rejects(d.cmd('x-shear-io', { node: 'snap', command: 'read 0 4k' }), { message: /Cannot read the snapshot/ }, 'and the snapshot is given up');
    }
  });
}

t.test('full cache with cbw-timeout: guest writes wait for the drain instead of failing; events and query-jobs say so', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const { d, data, spill, final } = await setup(t, 54);
  const snapshot = Buffer.from(data);
  // 4 chunks of RAM and 4 of spill file: an eighth of what the guest is about to overwrite.
  await d.cmd('blockdev-add', { driver: 'fleecing-cache', 'node-name': 'cache', 'ram-bytes': 4 * C, 'file-bytes': 4 * C, file: { driver: 'file', filename: spill } });
  await d.cmd('blockdev-add', { driver: 'copy-before-write', 'node-name': 'cbw', file: 'disk0', target: 'cache', 'on-cbw-error': 'break-guest-write', 'cbw-timeout': 30 });
  await d.cmd('blockdev-add', { driver: 'snapshot-access', 'node-name': 'snap', file: 'cbw' });
  await d.cmd('blockdev-add', { driver: 'file', 'node-name': 'final', filename: final });
  // A slow target: 1 MiB/s (16 chunks a second) while the guest writes. Unlimited once the guest is done.
  await d.cmd('blockdev-backup', { 'job-id': 'drain', device: 'snap', target: 'final', sync: 'full', 'discard-source': true, speed: MiB, 'x-perf': { 'max-chunk': C, 'max-workers': 2 } });
  // Held until the cache is full: however busy the machine, the guest must outrun the drain here,
  // so the test waits for states (paused, watching, full) instead of racing the rate limit.
  await d.cmd('job-pause', { id: 'drain' });
  t.match(await d.cmd('query-jobs'), [{ id: 'drain', status: 'paused' }]);
  // What an operator runs to follow it; its first line means it is subscribed to the events.
  let watching!: () => void;
  const watcherReady = new Promise<void>((resolve) => (watching = resolve));
  const watcher = shear(['jobs', '--qmp', `unix:${d.socket}`, '--watch', '--job', 'drain', '--interval', '100'], { onStdout: (out) => out.includes('\n') && watching() });
  await watcherReady;
  let peak = 0;
  const sample = async (c: number) => {
    const jobs = await d.cmd<{ id: string; 'x-shear-cache'?: { node: string; 'ram-used': number; 'file-used': number } }[]>('query-jobs');
    const info = jobs.find((j) => j.id === 'drain')?.['x-shear-cache'];
    if (info) peak = Math.max(peak, info['ram-used'] + info['file-used']);
    if (c === 240) t.match(info, { node: 'cache', 'ram-bytes': 4 * C, 'file-bytes': 4 * C }, 'query-jobs shows the cache the job drains');
  };
  // The guest writes on its own connection: a QMP connection runs one command at a time, so a
  // write waiting for space there would hold up the job-resume that makes space.
  const guest = await QmpClient.connect(d.socket);
  t.teardown(() => guest.close());
  const write = (c: number) => guest.execute('x-shear-io', { node: 'cbw', command: `write -P 0x45 ${c * C} 64k` });
  // From the top down: the drain copies unchanged clusters from the bottom up, so these still
  // need preserving when the guest overwrites them. Eight fill RAM and file; the ninth waits.
  for (let c = 255; c > 247; c--) await write(c);
  const full = d.qmp.waitEvent('X_SHEAR_CACHE_STATE', (e) => e['state'] === 'full', { timeoutMs: 60_000 });
  const ninth = write(247);
  t.match((await full).data, { node: 'cache', state: 'full', waiting: 1 }, 'the ninth write waits: the cache is full');
  await sample(247);
  // Asked while the drain is still held, so the job is surely there whatever the machine's load.
  const once = await shear(['jobs', '--qmp', `unix:${d.socket}`]);
  t.match(once.stdout, /^drain {2}backup {2}paused {2}[\d.]+% .* cache cache \w+: RAM /m, 'shear jobs shows the job with its cache');
  await d.cmd('job-resume', { id: 'drain' });
  await ninth;
  for (let c = 246; c >= 192; c--) {
    await write(c);
    if (c % 16 === 0) await sample(c);
  }
  t.equal((await shear(['jobs', '--qmp', `unix:${d.socket}`, '--job', 'nope'])).code, 3, 'an unknown job is exit status 3');
  t.equal((await shear(['jobs'])).code, 2, 'no --qmp is a usage error');
  t.pass('all 64 guest writes succeeded although the cache holds only 8 chunks');
  // Unlimited from here. On a loaded machine the 1 MiB/s drain may have finished while the guest
  // wrote: then there is no job left to speed up, and its end event is already there.
  await d.cmd('block-job-set-speed', { device: 'drain', speed: 0 }).catch((err: { desc?: string }) => {
    if (!/not found/.test(err.desc ?? '')) throw err;
  });
  const end = await jobEnd(d, 'drain');
  t.notOk(end.data?.['error'], 'the drain completed');
  const w = await watcher;
  t.equal(w.code, 0, `shear jobs --watch exits 0 when the job completes ${w.stderr}`);
  t.match(w.stdout, /cache cache: \w+ -> full \(RAM/, 'and printed the cache filling up');
  t.match(w.stdout, /writes waiting/, 'with the writes waiting for space');
  t.match(w.stdout, /job drain: completed\n/, 'and the end of the job');
  t.ok(peak <= 8 * C, 'the cache never held more than its limits');
  const states = d.events.filter((e) => e.event === 'X_SHEAR_CACHE_STATE').map((e) => e.data?.['state']);
  t.ok(states.includes('spilling') && states.includes('full'), `the cache reported spilling and full (${states.join(' ')})`);
  t.match(d.events.find((e) => e.event === 'X_SHEAR_CACHE_STATE')?.data, { node: 'cache' }, 'events name the node');
  t.notOk(d.events.some((e) => e.event === 'X_SHEAR_CBW_ERROR' || e.event === 'X_SHEAR_CACHE_WRITE_FAILED'), 'no guest write failed');
  const info = await cacheInfo(d);
  t.ok((info as unknown as { waits: number }).waits > 0, 'some writes waited for space');
  await d.cmd('blockdev-del', { 'node-name': 'final' });
  t.ok(readFileSync(final).equals(snapshot), 'the slow target holds the disk as it was when the filter started');
});
