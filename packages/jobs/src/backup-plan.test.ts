import t from 'tap';
import { randomBytes } from 'node:crypto';
import { inflateRawSync } from 'node:zlib';
import { BlockGraph, MemoryDriver, PERM_ALL, PERM_CONSISTENT_READ, PERM_WRITE, filterChildPerms, type BlockIO, type BlockStatusExtent } from '@shear/block';
import { BlockCopy } from '@shear/block-copy';
import { planBackup, type BackupPlanParams } from './backup-plan.js';

const C = 64 * 1024;
const CLUSTERS = 32;
const SIZE = CLUSTERS * C;
const INFO = { name: 'memory', childPerms: filterChildPerms };

/** A qcow2-like target: clusters of its own size, and compressed clusters kept as written. */
class DeflatingDisk extends MemoryDriver {
  readonly deflated = new Map<number, Uint8Array>();
  constructor(readonly clusterBytes: number) {
    super({ length: SIZE });
  }
  async writeDeflated(offset: number, packed: Uint8Array): Promise<void> {
    this.deflated.set(offset, Uint8Array.from(packed));
  }
}

/** A top layer over an (absent) backing file: only clusters written to it are allocated. */
class TopLayer extends MemoryDriver {
  readonly own = new Set<number>();
  constructor() {
    super({ length: SIZE });
  }
  override async write(offset: number, buf: Uint8Array): Promise<void> {
    await super.write(offset, buf);
    for (let c = Math.floor(offset / C); c * C < offset + buf.length; c++) this.own.add(c);
  }
  override async blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    // One extent per cluster, as small as a driver may answer, to exercise the caller's loop.
    const c = Math.floor(offset / C);
    const end = Math.min(offset + bytes, (c + 1) * C);
    const allocated = this.own.has(c);
    return [{ offset, bytes: end - offset, data: allocated, zero: !allocated, allocated }];
  }
}

async function setup(target: BlockIO = new MemoryDriver({ length: SIZE }), source: BlockIO = new MemoryDriver({ length: SIZE })) {
  const g = new BlockGraph();
  const src = await g.addNode({ name: 'src', info: INFO, open: async () => source });
  const tgt = await g.addNode({ name: 'tgt', info: INFO, open: async () => target });
  const user = { kind: 'user' as const, name: 'test' };
  const srcEdge = g.attachUser(user, src, PERM_WRITE | PERM_CONSISTENT_READ, PERM_ALL);
  const tgtEdge = g.attachUser(user, tgt, PERM_WRITE | PERM_CONSISTENT_READ, PERM_ALL);
  const close = async () => {
    g.detachUser(srcEdge);
    g.detachUser(tgtEdge);
    await g.removeNode('src');
    await g.removeNode('tgt');
  };
  return { g, src, tgt, srcEdge, tgtEdge, close };
}

type Setup = Awaited<ReturnType<typeof setup>>;

function copyFor(s: Setup, plan: ReturnType<typeof planBackup>): BlockCopy {
  return new BlockCopy({ ...plan.copyOptions, source: { io: s.srcEdge }, target: { io: s.tgtEdge }, length: SIZE });
}

function dirtyClusters(bits: { get(offset: number): boolean }): number[] {
  const out: number[] = [];
  for (let c = 0; c < CLUSTERS; c++) if (bits.get(c * C)) out.push(c);
  return out;
}

const base = (s: Setup, p: Partial<BackupPlanParams> = {}): BackupPlanParams => ({ source: s.src, target: s.tgt, sync: 'full', partialTargetKept: true, ...p });

t.test('the copy options: cluster at least 64 KiB and the target\'s, chunk at least a cluster, limits passed on', async (t) => {
  const s = await setup();
  t.teardown(s.close);
  const plain = planBackup(base(s, { maxTasks: 3, speed: 1000, retries: 2, singleTask: true, targetIsZero: true }));
  t.equal(plain.clusterBytes, C, 'a target without clusters: 64 KiB');
  t.same(plain.copyOptions, { clusterBytes: C, maxTasks: 3, singleTask: true, speed: 1000, retryAttempts: 2, skipUnallocated: false, targetIsZero: true });
  const big = await setup(new DeflatingDisk(1 << 20));
  t.teardown(big.close);
  const p = planBackup(base(big, { maxChunk: 256 * 1024, sync: 'top' }));
  t.equal(p.clusterBytes, 1 << 20, 'the target\'s 1 MiB cluster');
  t.match(p.copyOptions, { clusterBytes: 1 << 20, maxChunkBytes: 1 << 20, skipUnallocated: true, speed: 0, retryAttempts: 0 });
  t.notOk('compress' in p.copyOptions, 'no compression unless asked');
});

t.test('compression: refused for a target that cannot store deflated clusters; otherwise every cluster arrives deflated', async (t) => {
  const s = await setup();
  t.teardown(s.close);
  t.throws(() => planBackup(base(s, { compress: true })), { code: 'ERR_INVALID_ARGUMENT', message: 'Cannot start backup: compression is not supported by target node "tgt" (it needs a qcow2 target)' });
  const disk = new DeflatingDisk(C);
  const d = await setup(disk);
  t.teardown(d.close);
  const content = randomBytes(SIZE);
  for (let c = 0; c < CLUSTERS; c += 2) content.fill(0x41, c * C, (c + 1) * C); // compressible half
  await d.srcEdge.write(0, content);
  const plan = planBackup(base(d, { compress: true }));
  const copy = copyFor(d, plan);
  plan.takePointInTime(copy.copyBitmap);
  await copy.run({ signal: new AbortController().signal });
  t.ok(disk.deflated.size > 0, 'compressible clusters were written deflated');
  for (const [offset, packed] of disk.deflated) {
    t.ok(Buffer.from(inflateRawSync(packed)).equals(content.subarray(offset, offset + C)), `cluster at ${offset} inflates to the source`);
  }
});

t.test('the point in time: the bitmap freezes behind a successor; sync=bitmap copies its clusters, others everything; undo restores', async (t) => {
  const s = await setup();
  t.teardown(s.close);
  const bm = s.src.bitmaps.add({ name: 'b0', granularity: C });
  for (const c of [1, 4, 9]) await s.srcEdge.write(c * C, randomBytes(10));
  const plan = planBackup(base(s, { sync: 'bitmap', bitmap: bm, bitmapMode: 'on-success' }));
  const copy = copyFor(s, plan);
  const undo = plan.takePointInTime(copy.copyBitmap);
  t.ok(bm.frozen, 'frozen');
  t.same(dirtyClusters(copy.copyBitmap), [1, 4, 9], 'the copy takes the bitmap\'s clusters');
  await s.srcEdge.write(20 * C, randomBytes(10));
  t.same(dirtyClusters(bm.successor!.bits), [20], 'a later write goes to the successor');
  undo();
  t.notOk(bm.frozen);
  t.same(dirtyClusters(copy.copyBitmap), [], 'the copy bitmap is empty again');
  t.same(dirtyClusters(s.src.bitmaps.find('b0')!.bits), [1, 4, 9, 20], 'the bitmap has its bits and the later write');

  const full = planBackup(base(s, { sync: 'full', bitmap: s.src.bitmaps.find('b0'), bitmapMode: 'on-success' }));
  const copy2 = copyFor(s, full);
  full.takePointInTime(copy2.copyBitmap);
  t.equal(copy2.copyBitmap.countBytes(), SIZE, 'sync=full copies everything, even with a bitmap');
  full.settle('cancel', copy2.copyBitmap);
  t.throws(() => planBackup(base(s, { sync: 'bitmap' })), { code: 'ERR_INVALID_ARGUMENT' }, 'sync=bitmap needs a bitmap');
  t.throws(() => planBackup(base(s, { bitmap: s.src.bitmaps.find('b0') })), { code: 'ERR_INVALID_ARGUMENT' }, 'a bitmap needs a mode');
});

/** An incremental whose copy got clusters 1 and 4 out of 1, 4, 9 before failing; 20 written meanwhile. */
async function failedAlways(partialTargetKept: boolean) {
  const s = await setup();
  const bm = s.src.bitmaps.add({ name: 'b0', granularity: C });
  for (const c of [1, 4, 9]) await s.srcEdge.write(c * C, randomBytes(10));
  const plan = planBackup(base(s, { sync: 'bitmap', bitmap: bm, bitmapMode: 'always', partialTargetKept }));
  const copy = copyFor(s, plan);
  plan.takePointInTime(copy.copyBitmap);
  await s.srcEdge.write(20 * C, randomBytes(10));
  copy.copyBitmap.reset(1 * C, C);
  copy.copyBitmap.reset(4 * C, C);
  plan.settle('failure', copy.copyBitmap);
  plan.settle('failure', copy.copyBitmap); // a second settle changes nothing
  const after = dirtyClusters(s.src.bitmaps.find('b0')!.bits);
  await s.close();
  return after;
}

t.test('settling under `always` after a failure: a kept target leaves only the rest; a deleted one keeps every bit', async (t) => {
  t.same(await failedAlways(true), [9, 20], 'not copied, plus written during the job');
  t.same(await failedAlways(false), [1, 4, 9, 20], 'the partial target is gone: all bits stay');
  const s = await setup();
  t.teardown(s.close);
  const bm = s.src.bitmaps.add({ name: 'b0', granularity: C });
  await s.srcEdge.write(3 * C, randomBytes(10));
  const plan = planBackup(base(s, { sync: 'bitmap', bitmap: bm, bitmapMode: 'always', partialTargetKept: false }));
  const copy = copyFor(s, plan);
  plan.takePointInTime(copy.copyBitmap);
  await s.srcEdge.write(7 * C, randomBytes(10));
  await copy.run({ signal: new AbortController().signal });
  plan.settle('success', copy.copyBitmap);
  t.same(dirtyClusters(s.src.bitmaps.find('b0')!.bits), [7], 'success: the bitmap holds what was written during the copy');
});

t.test('sync=top leaves the clusters the top layer does not allocate out of the copy', async (t) => {
  const top = new TopLayer();
  const s = await setup(undefined, top);
  t.teardown(s.close);
  await s.srcEdge.write(2 * C, randomBytes(C));
  await s.srcEdge.write(5 * C + 100, randomBytes(10));
  const plan = planBackup(base(s, { sync: 'top' }));
  const copy = copyFor(s, plan);
  plan.takePointInTime(copy.copyBitmap);
  const left = await plan.leaveOutUnallocated(copy.copyBitmap, new AbortController().signal);
  t.same(dirtyClusters(copy.copyBitmap), [2, 5], 'only the allocated clusters stay, a partly written one whole');
  t.equal(left, SIZE - 2 * C, 'the rest is reported as left out');
  const full = planBackup(base(s, { sync: 'full' }));
  const copy2 = copyFor(s, full);
  full.takePointInTime(copy2.copyBitmap);
  t.equal(await full.leaveOutUnallocated(copy2.copyBitmap, new AbortController().signal), 0, 'sync=full leaves nothing out');
  t.equal(copy2.copyBitmap.countBytes(), SIZE);
});
