import t from 'tap';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { readFileSync, writeFileSync } from 'node:fs';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { LIBNBD_PYTHON, requireLibnbdPython, requireTools } from '@shear/testkit';
import { startDaemon, type DaemonHandle } from '../lib/daemon.js';
import { makeRawImage, qemuImg } from '../lib/images.js';

const run = promisify(execFile);
const MiB = 2 ** 20;
const C = 65536;
const SIZE = 16 * MiB;

/** A python3-libnbd script run against an export; prints JSON on stdout. */
async function py(script: string, ...args: string[]): Promise<unknown> {
  const { stdout } = await run(LIBNBD_PYTHON, ['-c', script, ...args], { maxBuffer: 64 * MiB });
  return JSON.parse(stdout);
}

/** Random 64 KiB writes to random clusters of the live export, `n` of them; returns the clusters written. */
const WRITER = `
import nbd, sys, json, random
h = nbd.NBD(); h.connect_uri(sys.argv[1])
rnd = random.Random(int(sys.argv[3])); size = h.get_size(); done = []
for i in range(int(sys.argv[2])):
    c = rnd.randrange(size // 65536)
    h.pwrite(bytes([rnd.randrange(256)]) * 65536, c * 65536)
    done.append(c)
h.flush(); h.shutdown(); print(json.dumps(done))
`;

/** Reads the clusters the exported bitmap reports dirty into OUT, trimming each range after reading it. */
const INCREMENTAL = `
import nbd, sys, json
h = nbd.NBD(); h.add_meta_context("qemu:dirty-bitmap:" + sys.argv[2]); h.connect_uri(sys.argv[1])
size = h.get_size(); extents = []; state = {"end": 0}
def cb(ctx, offset, entries, err):
    pos = offset
    for i in range(0, len(entries), 2):
        if entries[i + 1] & 1: extents.append((pos, entries[i]))
        pos += entries[i]
    state["end"] = pos
off = 0
while off < size:
    h.block_status(min(size - off, 1 << 30), off, cb)
    off = state["end"]
out = open(sys.argv[3], 'r+b'); copied = 0
for (o, n) in extents:
    out.seek(o); out.write(h.pread(n, o)); copied += n
    h.trim(n, o)
out.close(); h.shutdown(); print(json.dumps({"extents": extents, "copied": copied}))
`;

async function cbwProgress(d: DaemonHandle, id: string): Promise<number> {
  const jobs = await d.cmd<{ id: string; 'current-progress': number }[]>('query-jobs');
  return jobs.find((j) => j.id === id)!['current-progress'];
}

t.test('pull backups through the fleecing export while a writer changes the live disk', async (t) => {
  if (!requireTools(t, 'nbdcopy', 'qemu-img') || !requireLibnbdPython(t)) return;
  const dir = t.testdir();
  const sockDir = mkdtempSync(path.join(os.tmpdir(), 'shear-nbd-'));
  t.teardown(() => rmSync(sockDir, { recursive: true, force: true }));
  const nbdSock = path.join(sockDir, 'nbd.sock');
  const disk = path.join(dir, 'disk.raw');
  makeRawImage(disk, SIZE, 31);
  const tmp = path.join(dir, 'fleece.tmp');
  qemuImg('create', '-q', '-f', 'raw', tmp, String(SIZE));
  const d = await startDaemon(dir, [
    '--blockdev', `driver=file,node-name=disk0,filename=${disk}`,
    '--nbd-server', `addr.type=unix,addr.path=${nbdSock}`,
    '--export', 'type=nbd,id=live,node-name=disk0,name=live,writable=on',
  ]);
  t.teardown(() => d.stop());
  const live = `nbd+unix:///live?socket=${nbdSock}`;

  // Changes since the "last backup" are tracked in b0.
  await d.cmd('block-dirty-bitmap-add', { node: 'disk0', name: 'b0' });
  const before = (await py(WRITER, live, '20', '1')) as number[];

  // The snapshot point: b0 freezes, b1 takes over, copy-before-write starts.
  await d.cmd('blockdev-add', { driver: 'file', 'node-name': 'tmp', filename: tmp });
  await d.cmd('transaction', {
    actions: [
      { type: 'block-dirty-bitmap-disable', data: { node: 'disk0', name: 'b0' } },
      { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'b1' } },
      { type: 'blockdev-backup', data: { 'job-id': 'fleece', device: 'disk0', target: 'tmp', sync: 'none', 'filter-node-name': 'cbw' } },
    ],
  });
  const snapshot = readFileSync(disk);
  t.same((await d.cmd<{ id: string; 'node-name': string }[]>('query-block-exports')).map((e) => [e.id, e['node-name']]), [['live', 'cbw']], 'the live export now writes through the filter');
  await d.cmd('blockdev-add', { driver: 'snapshot-access', 'node-name': 'snap', file: 'cbw' });
  await d.cmd('block-export-add', { type: 'nbd', id: 'fleece', 'node-name': 'snap', name: 'fleece', bitmaps: [{ node: 'disk0', name: 'b0' }] });
  const fleece = `nbd+unix:///fleece?socket=${nbdSock}`;

  // Full pull with nbdcopy while the writer runs.
  const pulled = path.join(dir, 'pulled.raw');
  const [writes] = await Promise.all([py(WRITER, live, '150', '2') as Promise<number[]>, run('nbdcopy', [fleece, pulled])]);
  t.ok(readFileSync(pulled).equals(snapshot), `nbdcopy pulled the disk as it was at the snapshot point (${(writes as number[]).length} writes ran meanwhile)`);

  // Incremental pull: only b0's clusters, each trimmed once read.
  const inc = path.join(dir, 'inc.raw');
  writeFileSync(inc, Buffer.alloc(SIZE));
  const r = (await py(INCREMENTAL, fleece, 'b0', inc)) as { extents: [number, number][]; copied: number };
  const dirty = new Set(before);
  t.equal(r.copied, dirty.size * C, 'the client read exactly the clusters b0 reports');
  const incData = readFileSync(inc);
  let wrong = 0;
  for (const c of dirty) if (!incData.subarray(c * C, (c + 1) * C).equals(snapshot.subarray(c * C, (c + 1) * C))) wrong++;
  t.equal(wrong, 0, 'each of them holds its data from the snapshot point');

  // Trimmed clusters are no longer preserved: writing them costs no copy-before-write, while
  // writing a cluster still in the view does.
  const writeLive = (cluster: number) => py(`import nbd,sys\nh=nbd.NBD();h.connect_uri(sys.argv[1]);h.pwrite(b'\\x99'*65536, ${cluster * C});h.shutdown();print(1)`, live);
  const trimmed = [...dirty];
  const p0 = await cbwProgress(d, 'fleece');
  await writeLive(trimmed[0]!);
  t.equal(await cbwProgress(d, 'fleece'), p0, 'a write to a trimmed cluster copies nothing');
  const touched = new Set([...before, ...(writes as number[])]);
  const fresh = Array.from({ length: SIZE / C }, (_, i) => i).find((c) => !touched.has(c))!;
  await writeLive(fresh);
  t.equal(await cbwProgress(d, 'fleece'), p0 + C, 'a write to a cluster still in the view copies it first');
  await t.rejects(
    py(`import nbd,sys,json\nh=nbd.NBD();h.connect_uri(sys.argv[1])\ntry:\n  h.pread(4096, ${trimmed[0]! * C})\n  print(json.dumps("ok"))\nexcept nbd.Error as e:\n  print(json.dumps(str(e.errno)))`, fleece).then((v) => (v === 'ok' ? undefined : Promise.reject(new Error(String(v))))),
    /EINVAL|22/,
    'reading a trimmed cluster fails with EINVAL',
  );

  const deleted = d.qmp.waitEvent('BLOCK_EXPORT_DELETED', (e) => e['id'] === 'fleece', { timeoutMs: 10_000 });
  await d.cmd('block-export-del', { id: 'fleece' });
  await deleted;
  await d.cmd('blockdev-del', { 'node-name': 'snap' });
  const gone = d.qmp.waitEvent('JOB_STATUS_CHANGE', (e) => e['id'] === 'fleece' && e['status'] === 'null', { timeoutMs: 10_000 });
  await d.cmd('job-cancel', { id: 'fleece' });
  await gone;
  t.same((await d.cmd<{ 'node-name': string }[]>('query-block-exports')).map((e) => e['node-name']), ['disk0'], 'the live export is back on the disk');
});

t.test('a push backup of the point-in-time view with discard-source drains the preserved data as it goes', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const disk = path.join(dir, 'disk.raw');
  makeRawImage(disk, SIZE, 33);
  const tmp = path.join(dir, 'cache.tmp');
  qemuImg('create', '-q', '-f', 'raw', tmp, String(SIZE));
  const final = path.join(dir, 'final.raw');
  qemuImg('create', '-q', '-f', 'raw', final, String(SIZE));
  const d = await startDaemon(dir, ['--blockdev', `driver=file,node-name=disk0,filename=${disk}`]);
  t.teardown(() => d.stop());
  await d.cmd('x-shear-io', { node: 'disk0', command: 'read 0 4k' }); // the guest, attached
  await d.cmd('blockdev-add', { driver: 'file', 'node-name': 'tmp', filename: tmp });
  await d.cmd('blockdev-backup', { 'job-id': 'fleece', device: 'disk0', target: 'tmp', sync: 'none', 'filter-node-name': 'cbw' });
  const snapshot = readFileSync(disk);
  await d.cmd('blockdev-add', { driver: 'snapshot-access', 'node-name': 'snap', file: 'cbw' });
  // The guest overwrites 4 MiB: their old data is preserved in the scratch file.
  for (let c = 0; c < 64; c++) await d.cmd('x-shear-io', { node: 'disk0', command: `write -P 0x42 ${c * C} 64k` });
  const { statSync } = await import('node:fs');
  const before = statSync(tmp).blocks * 512;
  // Data clusters take space there; clusters that were holes are preserved as holes.
  t.ok(before >= MiB, `the scratch file holds the preserved clusters (${before} bytes)`);
  await d.cmd('blockdev-add', { driver: 'file', 'node-name': 'final', filename: final });
  await d.cmd('blockdev-backup', { 'job-id': 'drain', device: 'snap', target: 'final', sync: 'full', 'discard-source': true });
  const end = await new Promise<Record<string, unknown>>((resolve) => {
    const on = (e: { event: string; data?: Record<string, unknown> }) => {
      if (e.event === 'BLOCK_JOB_COMPLETED' && e.data?.['device'] === 'drain') resolve(e.data);
    };
    d.qmp.on('event', on);
  });
  t.notOk(end['error'], 'the drain backup succeeded');
  await d.cmd('blockdev-del', { 'node-name': 'final' });
  t.ok(readFileSync(final).equals(snapshot), 'the slow target holds the disk as it was');
  const after = statSync(tmp).blocks * 512;
  t.ok(after < before / 4, `the preserved data was freed as it reached the target (${before} -> ${after} bytes)`);
  await d.cmd('blockdev-del', { 'node-name': 'snap' });
  await d.cmd('job-cancel', { id: 'fleece' });
});
