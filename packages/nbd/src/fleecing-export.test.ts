import t, { type Test } from 'tap';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { BlockGraph, MemoryDriver, PERM_ALL, PERM_CONSISTENT_READ, PERM_WRITE, filterChildPerms } from '@shear/block';
import { CBW_INFO, CopyBeforeWrite, SNAPSHOT_ACCESS_INFO, SnapshotAccess } from '@shear/fleecing';
import { requireLibnbdPython, requireTools } from '@shear/testkit';
import { nbdUri } from './address.js';
import { RawClient, readData, replyError, statusExtents } from './raw-client.fixture.js';
import { KiB, MiB, serve, shortDir } from './setup.fixture.js';
import { PYTHON, run, runOk } from './tools.fixture.js';

/**
 * The fleecing export (seed 002): a point-in-time view served without READ_ONLY and with TRIM,
 * so backup clients can say which clusters they have. Writes are refused (EPERM; ENOTSUP when
 * the export was added writable, as QEMU 7.2 answers) before they reach the node;
 * TRIM rounds inward to clusters; reads of trimmed clusters fail with EINVAL; a sub-cluster
 * TRIM is a successful no-op. The live disk is exported beside it and written meanwhile.
 */

const C = 64 * KiB;
const SIZE = 4 * MiB;
const EPERM = 1;
const EINVAL = 22;
const ENOTSUP = 95;

async function fleecing(t: Test, writable = false) {
  const graph = new BlockGraph();
  const info = { name: 'memory', childPerms: filterChildPerms };
  const source = new MemoryDriver({ length: SIZE });
  const original = Buffer.alloc(SIZE);
  // Data everywhere but clusters 10..19 (holes in the snapshot too).
  for (let c = 0; c < SIZE / C; c++) {
    if (c >= 10 && c < 20) continue;
    randomBytes(C).copy(original, c * C);
  }
  await source.write(0, original);
  await source.discard(10 * C, 10 * C);
  const src = await graph.addNode({ name: 'src', info, open: async () => source });
  const tgt = await graph.addNode({ name: 'tgt', info, open: async () => new MemoryDriver({ length: SIZE }) });
  const bm = src.bitmaps.add({ name: 'backup-vda', disabled: true, granularity: C });
  bm.bits.set(2 * C, 3 * C);
  bm.bits.set(40 * C, 1);
  const cbw = await graph.addNode({
    name: 'cbw', info: CBW_INFO,
    children: [{ role: 'file', node: src }, { role: 'target', node: tgt }],
    open: async (c) => new CopyBeforeWrite({ file: c.get('file')!, target: c.get('target')! }),
  });
  const guest = graph.attachUser({ kind: 'user', name: 'nbd-disk' }, cbw, PERM_WRITE | PERM_CONSISTENT_READ, PERM_ALL);
  const snap = await graph.addNode({ name: 'snap', info: SNAPSHOT_ACCESS_INFO, children: [{ role: 'file', node: cbw }], open: async (c) => new SnapshotAccess(c.get('file')!) });
  const reader = graph.attachUser({ kind: 'user', name: 'nbd-fleece' }, snap, PERM_CONSISTENT_READ | PERM_WRITE, PERM_ALL);
  const s = await serve(t, { graph, node: snap, memory: source, content: original }, { name: 'fleece', edge: reader, writable, fleecing: true, bitmaps: [bm] });
  s.server.addExport({ name: 'disk', edge: guest, writable: true });
  return { ...s, original, source, bm };
}

t.test('flags: not read-only, TRIM offered, no WRITE_ZEROES', async (t) => {
  const f = await fleecing(t);
  const c = await RawClient.connect(f.address);
  await c.go('fleece');
  t.equal(c.tflags, 0x05ad, 'HAS_FLAGS|FLUSH|FUA|TRIM|DF|MULTI_CONN|CACHE');
  c.close();
  t.same(f.server.listExports().map((e) => [e.name, e.nodeName, e.fleecing, e.writable]), [['fleece', 'snap', true, false], ['disk', 'cbw', false, true]]);
});

t.test('the snapshot stays as it was while the live disk is written over NBD; TRIM, EPERM, EINVAL', async (t) => {
  const f = await fleecing(t);
  const live = await RawClient.connect(f.address);
  await live.go('disk');
  const fl = await RawClient.connect(f.address);
  await fl.go('fleece', { meta: ['base:allocation', 'qemu:dirty-bitmap:backup-vda'] });
  const fresh = randomBytes(3 * C);
  live.sendReq(1, { offset: 5 * C + 17, payload: fresh });
  t.equal(replyError(await live.reply()).error, 0, 'guest write through the copy-before-write filter');
  live.sendReq(0, { offset: 5 * C + 17, length: fresh.length });
  t.ok(readData(await live.reply(), 5 * C + 17, fresh.length).equals(fresh), 'the live disk has it');
  fl.sendReq(0, { offset: 0, length: SIZE });
  t.ok(readData(await fl.reply(), 0, SIZE).equals(f.original), 'the fleecing export still serves the point in time');

  fl.sendReq(1, { offset: 0, payload: Buffer.alloc(512) });
  t.equal(replyError(await fl.reply()).error, EPERM, 'WRITE: EPERM (the export is read-only but for TRIM)');
  fl.sendReq(6, { offset: 0, length: 512 });
  t.equal(replyError(await fl.reply()).error, EPERM, 'WRITE_ZEROES (not offered, sent anyway): EPERM');

  // TRIM (C + 100, 3C) rounds inward to clusters 2 and 3.
  fl.sendReq(4, { offset: C + 100, length: 3 * C, flags: 1 });
  t.equal(replyError(await fl.reply()).error, 0, 'TRIM with FUA');
  for (const [cluster, ok] of [[1, true], [2, false], [3, false], [4, true]] as const) {
    fl.sendReq(0, { offset: cluster * C, length: C });
    const r = await fl.reply();
    if (ok) t.ok(readData(r, cluster * C, C).equals(f.original.subarray(cluster * C, (cluster + 1) * C)), `cluster ${cluster} still readable`);
    else t.equal(replyError(r).error, EINVAL, `cluster ${cluster} was trimmed: EINVAL`);
  }
  fl.sendReq(0, { offset: 3 * C - 10, length: 20 });
  t.equal(replyError(await fl.reply()).error, EINVAL, 'a read touching a trimmed cluster fails');
  // A trimmed hole must fail too, though block status says zero there.
  fl.sendReq(4, { offset: 12 * C, length: C });
  await fl.reply();
  fl.sendReq(0, { offset: 12 * C, length: C });
  t.equal(replyError(await fl.reply()).error, EINVAL, 'a trimmed hole: EINVAL, not zeroes');
  fl.sendReq(4, { offset: 20 * C + 100, length: 1000 });
  t.equal(replyError(await fl.reply()).error, 0, 'sub-cluster TRIM succeeds');
  fl.sendReq(0, { offset: 20 * C, length: C });
  t.ok(readData(await fl.reply(), 20 * C, C).equals(f.original.subarray(20 * C, 21 * C)), 'and changes nothing');

  fl.sendReq(7, { offset: 0, length: 6 * C });
  const st = statusExtents(await fl.reply());
  t.same(st.get(fl.contexts.get('qemu:dirty-bitmap:backup-vda')!), [[2 * C, 0], [3 * C, 1], [C, 0]], 'TRIM does not change the exported bitmap');
  live.close();
  fl.close();
});

t.test('added writable (as scripts for QEMU do): WRITE_ZEROES offered, writes ENOTSUP as QEMU 7.2 answers, TRIM works, nothing written', async (t) => {
  const f = await fleecing(t, true);
  const fl = await RawClient.connect(f.address);
  await fl.go('fleece');
  t.equal(fl.tflags, 0x0ded, 'HAS_FLAGS|FLUSH|FUA|TRIM|WRITE_ZEROES|DF|MULTI_CONN|CACHE|FAST_ZERO, not READ_ONLY');
  t.match(f.server.listExports()[0], { name: 'fleece', fleecing: true, writable: true });
  fl.sendReq(1, { offset: 0, payload: Buffer.alloc(C, 0x33) });
  t.equal(replyError(await fl.reply()).error, ENOTSUP, 'WRITE');
  fl.sendReq(1, { offset: 5 * C, payload: Buffer.alloc(512, 0x33), flags: 1 });
  t.equal(replyError(await fl.reply()).error, ENOTSUP, 'WRITE with FUA');
  for (const flags of [0, 2, 16]) {
    fl.sendReq(6, { offset: 6 * C, length: C, flags });
    t.equal(replyError(await fl.reply()).error, ENOTSUP, `WRITE_ZEROES flags ${flags}`);
  }
  fl.sendReq(4, { offset: 2 * C, length: C });
  t.equal(replyError(await fl.reply()).error, 0, 'TRIM');
  fl.sendReq(0, { offset: 2 * C, length: C });
  t.equal(replyError(await fl.reply()).error, EINVAL, 'the trimmed cluster left the view');
  fl.sendReq(0, { offset: 3 * C, length: SIZE - 3 * C });
  t.ok(readData(await fl.reply(), 3 * C, SIZE - 3 * C).equals(f.original.subarray(3 * C)), 'the view is unchanged');
  const src = Buffer.alloc(SIZE);
  await f.source.read(0, src);
  t.ok(src.equals(f.original), 'the source is unchanged');
  fl.close();
});

const FLEECE_PY = `
import json, sys, nbd
h = nbd.NBD()
h.add_meta_context("qemu:dirty-bitmap:backup-vda")
h.connect_uri(sys.argv[1])
res = {"can_trim": h.can_trim(), "ro": h.is_read_only(), "can_zero": h.can_zero()}
dirty = []
def cb(ctx, off, entries, err):
    dirty.extend(entries)
    return 0
h.block_status(h.get_size(), 0, cb)
res["dirty"] = dirty
res["c0"] = h.pread(65536, 0).hex()
h.trim(65536, 0)
try:
    h.pread(512, 0)
    res["after_trim"] = "ok"
except nbd.Error as e:
    res["after_trim"] = e.errno
h.trim(1000, 70000)
res["c1"] = h.pread(65536, 65536).hex()
h.set_strict_mode(0)
for name, fn in (("write", lambda: h.pwrite(b"x" * 512, 131072)), ("zero", lambda: h.zero(512, 131072))):
    try:
        fn()
        res[name] = "ok"
    except nbd.Error as e:
        res[name] = e.errno
h.shutdown()
print(json.dumps(res))
`;

t.test('python3-libnbd: TRIM on the fleecing export, then reads fail with EINVAL; writes EPERM', async (t) => {
  if (!requireLibnbdPython(t)) return;
  const f = await fleecing(t);
  const script = join(shortDir(t), 'fleece.py');
  writeFileSync(script, FLEECE_PY);
  const out = await runOk(t, PYTHON, [script, nbdUri(f.address, 'fleece')]);
  if (!out) return;
  const r = JSON.parse(out) as Record<string, unknown>;
  t.match(r, { can_trim: true, ro: false, can_zero: false, after_trim: 'EINVAL', write: 'EPERM', zero: 'EPERM' });
  t.equal(r['c0'], f.original.subarray(0, C).toString('hex'));
  t.equal(r['c1'], f.original.subarray(C, 2 * C).toString('hex'), 'the sub-cluster TRIM at 70000 left cluster 1 alone');
  t.same(r['dirty'], [2 * C, 0, 3 * C, 1, 35 * C, 0, C, 1, SIZE - 41 * C, 0], 'dirty bitmap as libnbd sees it');
});

t.test('qemu-img convert and nbdinfo --map of the fleecing export give the point in time and the bitmap', async (t) => {
  if (!requireTools(t, 'qemu-img', 'nbdinfo')) return;
  const f = await fleecing(t);
  const live = await RawClient.connect(f.address);
  await live.go('disk');
  for (let i = 0; i < 8; i++) live.sendReq(1, { cookie: BigInt(i), offset: i * 7 * C, payload: randomBytes(C) });
  for (let i = 0; i < 8; i++) t.equal(replyError(await live.reply()).error, 0);
  live.close();
  const out = join(shortDir(t), 'backup.raw');
  await runOk(t, 'qemu-img', ['convert', '-f', 'raw', '-O', 'raw', nbdUri(f.address, 'fleece'), out]);
  t.ok(readFileSync(out).equals(f.original), 'the backup is the disk as it was');
  const map = await runOk(t, 'nbdinfo', ['--map=qemu:dirty-bitmap:backup-vda', '--json', nbdUri(f.address, 'fleece')]);
  if (map) {
    const got = (JSON.parse(map) as { offset: number; length: number; type: number }[]).filter((e) => e.type === 1).map((e) => [e.offset, e.length]);
    t.same(got, [...f.bm.bits.dirtyExtents()].map((e) => [e.offset, e.bytes]));
  }
});
