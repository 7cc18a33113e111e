import t from 'tap';
import fc from 'fast-check';
import { randomBytes } from 'node:crypto';
import { ShearError } from '@shear/base';
import {
  BlockGraph,
  MemoryDriver,
  PERM_ALL,
  PERM_CONSISTENT_READ,
  PERM_WRITE,
  filterChildPerms,
  type BlockIO,
  type BlockStatusExtent,
  type ChildEdge,
} from '@shear/block';
import { CBW_INFO, CopyBeforeWrite, type CopyBeforeWriteOptions } from './copy-before-write.js';
import { SNAPSHOT_ACCESS_INFO, SnapshotAccess } from './snapshot-access.js';

const C = 64 * 1024;
const user = (name: string) => ({ kind: 'user' as const, name });

/** A BlockIO wrapper whose every call first awaits `hook` (a scheduler or a gate). */
class Hooked implements BlockIO {
  constructor(readonly inner: BlockIO, public hook: (op: string, offset: number) => Promise<void> = async () => {}) {}
  get length() { return this.inner.length; }
  async read(o: number, b: Uint8Array) { await this.hook('read', o); return this.inner.read(o, b); }
  async write(o: number, b: Uint8Array) { await this.hook('write', o); return this.inner.write(o, b); }
  async writeZeroes(o: number, n: number) { await this.hook('zero', o); return this.inner.writeZeroes(o, n); }
  async discard(o: number, n: number) { await this.hook('discard', o); return this.inner.discard(o, n); }
  flush() { return this.inner.flush(); }
  blockStatus(o: number, n: number): Promise<BlockStatusExtent[]> { return this.inner.blockStatus(o, n); }
  async close() {}
}

async function setup(clusters: number, opts: { source?: Hooked; target?: Hooked; cbw?: Partial<CopyBeforeWriteOptions> } = {}) {
  const g = new BlockGraph();
  const original = randomBytes(clusters * C);
  const srcMem = new MemoryDriver({ length: clusters * C });
  await srcMem.write(0, original);
  const source = opts.source ?? new Hooked(srcMem);
  if (opts.source) await opts.source.inner.write(0, original);
  const target = opts.target ?? new Hooked(new MemoryDriver({ length: clusters * C }));
  const info = { name: 'test', childPerms: filterChildPerms };
  const src = await g.addNode({ name: 'src', info, open: async () => source });
  const tgt = await g.addNode({ name: 'tgt', info, open: async () => target });
  const cbwNode = await g.addNode({
    name: 'cbw', info: CBW_INFO,
    children: [{ role: 'file', node: src }, { role: 'target', node: tgt }],
    open: async (c) => new CopyBeforeWrite({ file: c.get('file')!, target: c.get('target')!, ...opts.cbw }),
  });
  const guest = g.attachUser(user('guest'), cbwNode, PERM_WRITE | PERM_CONSISTENT_READ, PERM_ALL);
  const snapNode = await g.addNode({ name: 'snap', info: SNAPSHOT_ACCESS_INFO, children: [{ role: 'file', node: cbwNode }], open: async (c) => new SnapshotAccess(c.get('file')!) });
  // Like a fleecing export: it takes write so that it may send discards (TRIM); writes are refused by the node.
  const reader: ChildEdge = g.attachUser(user('reader'), snapNode, PERM_CONSISTENT_READ | PERM_WRITE, PERM_ALL);
  return { g, original, source, target, srcMem, cbw: cbwNode.driver as CopyBeforeWrite, guest, reader };
}

/** Holds the first read that reaches `source`: `arrived` resolves when it is held, `release` lets it go. */
function holdFirstRead(source: Hooked) {
  let release!: () => void;
  let arrive!: () => void;
  const arrived = new Promise<void>((r) => (arrive = r));
  let gateNext = true;
  source.hook = async (op) => {
    if (op === 'read' && gateNext) {
      gateNext = false;
      arrive();
      await new Promise<void>((r) => (release = r));
    }
  };
  return { arrived, release: () => release() };
}

function slice(b: Buffer, offset: number, bytes: number) {
  return b.subarray(offset, offset + bytes);
}

t.test('the source is protected: no writer can bypass the filter', async (t) => {
  const s = await setup(4);
  t.throws(() => s.g.attachUser(user('rogue'), 'src', PERM_WRITE, PERM_ALL), { code: 'ERR_BLOCK_PERMISSION_CONFLICT' });
});

t.test('snapshot reads see the disk as it was, before and after guest writes', async (t) => {
  const s = await setup(16);
  const data = randomBytes(3 * C);
  await s.guest.write(2 * C + 100, data);
  const now = Buffer.alloc(3 * C);
  await s.guest.read(2 * C + 100, now);
  t.ok(now.equals(data), 'the guest sees its write');
  const snap = Buffer.alloc(16 * C);
  await s.reader.read(0, snap);
  t.ok(snap.equals(s.original), 'the snapshot is unchanged');
  t.equal(s.cbw.done.countBits(), 4, 'the four touched clusters were preserved');
  await t.rejects(s.reader.write(0, Buffer.alloc(512)), { code: 'ERR_READ_ONLY', context: { errno: 'EPERM' } }, 'writes to the view are refused');
  await t.rejects(s.reader.writeZeroes(0, 512), { code: 'ERR_READ_ONLY' });
});

t.test('seed 001: a snapshot read from the source and a guest write to the same cluster, forced interleaving', async (t) => {
  // The read reaches the source and stops there; the guest write arrives, copies the old data,
  // and must not write the source before the read has finished.
  const source = new Hooked(new MemoryDriver({ length: 4 * C }));
  const s = await setup(4, { source });
  const gate = holdFirstRead(source);
  const buf = Buffer.alloc(C);
  const read = s.reader.read(C, buf);
  await gate.arrived;
  let writeDone = false;
  const newData = randomBytes(C);
  const write = s.guest.write(C, newData).then(() => (writeDone = true));
  // Give the write every chance to run ahead.
  for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
  t.notOk(writeDone, 'the guest write waits for the snapshot read');
  const onSource = Buffer.alloc(C);
  await source.inner.read(C, onSource);
  t.ok(onSource.equals(slice(s.original, C, C)), 'the source still holds the old data');
  gate.release();
  await read;
  await write;
  t.ok(buf.equals(slice(s.original, C, C)), 'the reader got the old data');
  const after = Buffer.alloc(C);
  await s.reader.read(C, after);
  t.ok(after.equals(slice(s.original, C, C)), 'and later snapshot reads too (from the target)');
});

t.test('property: under any interleaving of guest writes and snapshot reads, every snapshot read returns the original data', async (t) => {
  await fc.assert(
    fc.asyncProperty(
      fc.scheduler(),
      fc.array(fc.record({ kind: fc.constantFrom('write', 'read'), cluster: fc.nat(7), offsetIn: fc.nat(C - 1), len: fc.integer({ min: 1, max: 2 * C }) }), { minLength: 2, maxLength: 12 }),
      async (sched, ops) => {
        const source = new Hooked(new MemoryDriver({ length: 8 * C }));
        const target = new Hooked(new MemoryDriver({ length: 8 * C }));
        const s = await setup(8, { source, target });
        source.hook = () => sched.schedule(Promise.resolve());
        target.hook = () => sched.schedule(Promise.resolve());
        const reads: { offset: number; buf: Buffer; p: Promise<void> }[] = [];
        const writes: Promise<void>[] = [];
        for (const op of ops) {
          const offset = Math.min(op.cluster * C + op.offsetIn, 8 * C - 1);
          const len = Math.min(op.len, 8 * C - offset);
          if (op.kind === 'write') writes.push(s.guest.write(offset, randomBytes(len)));
          else {
            const buf = Buffer.alloc(len);
            reads.push({ offset, buf, p: s.reader.read(offset, buf) });
          }
        }
        await sched.waitFor(Promise.all([...writes, ...reads.map((r) => r.p)]));
        return reads.every((r) => r.buf.equals(slice(s.original, r.offset, r.buf.length)));
      },
    ),
    { numRuns: 150 },
  );
  t.pass('150 random interleavings');
});

t.test('discard: rounds inward, drops clusters from the view and from copying, later reads fail', async (t) => {
  const s = await setup(8);
  t.equal(await s.cbw.snapshotDiscard(C + 1, C), 0, 'less than a whole cluster: nothing');
  t.equal(await s.cbw.snapshotDiscard(C - 10, 3 * C), 2 * C, 'clusters 1 and 2');
  await t.rejects(s.reader.read(C, Buffer.alloc(10)), { code: 'ERR_SNAPSHOT_DISCARDED', context: { errno: 'EINVAL' } });
  await s.reader.read(0, Buffer.alloc(C));
  await s.reader.read(3 * C, Buffer.alloc(C));
  // A guest write to a discarded cluster copies nothing.
  const before = s.cbw.copy.progress.copiedBytes;
  await s.guest.write(C, randomBytes(C));
  t.equal(s.cbw.copy.progress.copiedBytes, before, 'no copy-before-write for clusters the reader has');
  await s.guest.write(4 * C, randomBytes(10));
  t.equal(s.cbw.copy.progress.copiedBytes, before + C, 'other clusters are still preserved');
  // Discard through the snapshot-access node (what an NBD TRIM does).
  await s.reader.discard(5 * C, C);
  await t.rejects(s.reader.read(5 * C, Buffer.alloc(1)), { code: 'ERR_SNAPSHOT_DISCARDED' });
});

/** A target that fails or stalls writes on demand. */
function failingTarget(mode: { fail: boolean; stallMs: number }) {
  return new Hooked(new MemoryDriver({ length: 8 * C }), async (op) => {
    if (op !== 'write' && op !== 'zero') return;
    if (mode.stallMs) await new Promise((r) => setTimeout(r, mode.stallMs));
    if (mode.fail) throw new ShearError('ERR_IO', 'Cannot write: injected', { errno: 'EIO' });
  });
}

t.test('on-cbw-error=break-guest-write: the guest write fails and the source keeps its old data', async (t) => {
  const mode = { fail: true, stallMs: 0 };
  const s = await setup(8, { target: failingTarget(mode), cbw: { copy: { retryAttempts: 0 } } });
  await t.rejects(s.guest.write(0, randomBytes(C)), { code: 'ERR_CBW_FAILED', context: { errno: 'EIO' } });
  const onSource = Buffer.alloc(C);
  await s.srcMem.read(0, onSource);
  t.ok(onSource.equals(slice(s.original, 0, C)), 'the write did not reach the source');
  const snap = Buffer.alloc(C);
  await s.reader.read(0, snap);
  t.ok(snap.equals(slice(s.original, 0, C)), 'the snapshot is intact');
});

t.test('on-cbw-error=break-snapshot: the guest write succeeds and the snapshot fails from then on', async (t) => {
  const mode = { fail: true, stallMs: 0 };
  const s = await setup(8, { target: failingTarget(mode), cbw: { onCbwError: 'break-snapshot', copy: { retryAttempts: 0 } } });
  const data = randomBytes(C);
  await s.guest.write(0, data);
  const now = Buffer.alloc(C);
  await s.guest.read(0, now);
  t.ok(now.equals(data), 'the write went through');
  await t.rejects(s.reader.read(4 * C, Buffer.alloc(1)), { code: 'ERR_SNAPSHOT_BROKEN' }, 'every snapshot read fails, not just the cluster written');
  mode.fail = false;
  await s.guest.write(C, randomBytes(10));
  t.pass('later writes go straight through');
});

t.test('cbw-timeout bounds how long a guest write waits for a slow target', async (t) => {
  const mode = { fail: false, stallMs: 1500 };
  const s = await setup(8, { target: failingTarget(mode), cbw: { cbwTimeoutSec: 1 } });
  const t0 = Date.now();
  await t.rejects(s.guest.write(0, randomBytes(10)), { code: 'ERR_CBW_FAILED', message: /cbw-timeout 1 s/ });
  const waited = Date.now() - t0;
  t.ok(waited >= 900 && waited < 1450, `failed after about a second (${waited} ms)`);
  t.throws(() => new CopyBeforeWrite({ file: s.guest, target: s.guest, cbwTimeoutSec: -1 }), { code: 'ERR_INVALID_ARGUMENT' });
  // 45 s (Proxmox's setting) is held exactly, not truncated.
  const c = new CopyBeforeWrite({ file: s.guest, target: s.guest, cbwTimeoutSec: 45 });
  t.equal(c.cbwTimeoutSec, 45);
  await new Promise((r) => setTimeout(r, 1600)); // let the stalled copy finish before teardown
});

t.test('a guest write whose preserving copy is cancelled by a reader discarding that range succeeds: nothing is left to preserve', async (t) => {
  // The copy is held at its first source read; the reader discards the range meanwhile (a pull
  // with TRIM, or a drain with discard-source), which cancels the copy. The guest write used to
  // fail with EIO then.
  const source = new Hooked(new MemoryDriver({ length: 64 * C }));
  const s = await setup(64, { source, cbw: { copy: { maxChunkBytes: 32 * C } } });
  const gate = holdFirstRead(source);
  const data = randomBytes(32 * C);
  const write = s.guest.write(0, data);
  await gate.arrived;
  t.equal(await s.cbw.snapshotDiscard(0, 32 * C), 32 * C, 'the reader is done with the range');
  gate.release();
  await t.resolves(write, 'the guest write succeeds');
  const now = Buffer.alloc(32 * C);
  await s.guest.read(0, now);
  t.ok(now.equals(data), 'and reached the disk');
  await t.rejects(s.reader.read(0, Buffer.alloc(C)), { code: 'ERR_SNAPSHOT_DISCARDED' }, 'the discarded range is gone from the view');
  const rest = Buffer.alloc(32 * C);
  await s.reader.read(32 * C, rest);
  t.ok(rest.equals(slice(s.original, 32 * C, 32 * C)), 'the rest of the view is intact');
});

/** Holds every read that reaches `io` until released, in arrival order. */
function holdReads(io: Hooked) {
  const held: { offset: number; release: () => void }[] = [];
  let arrivedOne: (() => void) | undefined;
  io.hook = async (op, offset) => {
    if (op !== 'read') return;
    await new Promise<void>((release) => {
      held.push({ offset, release });
      arrivedOne?.();
    });
  };
  const settle = async () => { for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r)); };
  return { held, settle };
}

t.test('guest first: snapshot reads take at most two slots, a guest write never waits for a slot, and while one is under way readers get one', async (t) => {
  const source = new Hooked(new MemoryDriver({ length: 16 * C }));
  const target = new Hooked(new MemoryDriver({ length: 16 * C }));
  const s = await setup(16, { source, target });
  const h = holdReads(source);
  const bufs = [0, 1, 2, 3].map(() => Buffer.alloc(C));
  const reads = bufs.map((b, i) => s.reader.read(i * C, b));
  await h.settle();
  t.equal(h.held.length, 2, 'two snapshot reads reached the source');
  t.same(s.cbw.snapshotReads, { reading: 2, waiting: 2 });
  // The guest writes cluster 8 while both slots are taken: its copy reads the source (held too,
  // but not behind the gate), then the target is written and the guest's data lands.
  let gateTarget!: () => void;
  target.hook = async (op) => {
    if (op === 'write') await new Promise<void>((r) => (gateTarget = r));
  };
  const data = randomBytes(C);
  let written = false;
  const write = s.guest.write(8 * C, data).then(() => (written = true));
  await h.settle();
  t.equal(h.held.length, 3, "the guest's copy read the source without waiting for a slot");
  h.held[2]!.release();
  await h.settle();
  // The copy now waits in the target write (gated); a slot frees up meanwhile.
  h.held[0]!.release();
  await h.settle();
  t.same(s.cbw.snapshotReads, { reading: 1, waiting: 2 }, 'with a guest write under way, readers get one slot: none admitted');
  t.notOk(written);
  target.hook = async () => {};
  gateTarget();
  await write;
  t.ok(written, 'the guest write finished while readers waited');
  await h.settle();
  t.same(s.cbw.snapshotReads, { reading: 2, waiting: 1 }, 'the guest write is done: two slots again, the next reader in arrival order');
  t.equal(h.held.at(-1)!.offset, 2 * C, 'cluster 2 was admitted before cluster 3');
  source.hook = async () => {};
  for (const x of h.held.slice(1)) x.release();
  await Promise.all(reads);
  t.same(s.cbw.snapshotReads, { reading: 0, waiting: 0 });
  bufs.forEach((b, i) => t.ok(b.equals(slice(s.original, i * C, C)), `snapshot read ${i} returned the original data`));
  const snap = Buffer.alloc(C);
  await s.reader.read(8 * C, snap);
  t.ok(snap.equals(slice(s.original, 8 * C, C)), 'the written cluster still reads as it was in the view');
});

t.test('a snapshot read refused (discarded range) or failing gives its slot back', async (t) => {
  const source = new Hooked(new MemoryDriver({ length: 8 * C }));
  const s = await setup(8, { source });
  await s.cbw.snapshotDiscard(0, 2 * C);
  for (let i = 0; i < 3; i++) await t.rejects(s.reader.read(0, Buffer.alloc(C)), { code: 'ERR_SNAPSHOT_DISCARDED' });
  source.hook = async (op) => {
    if (op === 'read') throw new ShearError('ERR_IO', 'Cannot read: injected', { errno: 'EIO' });
  };
  for (let i = 0; i < 3; i++) await t.rejects(s.reader.read(4 * C, Buffer.alloc(C)), { code: 'ERR_IO' });
  t.same(s.cbw.snapshotReads, { reading: 0, waiting: 0 });
  source.hook = async () => {};
  const buf = Buffer.alloc(C);
  await s.reader.read(4 * C, buf);
  t.ok(buf.equals(slice(s.original, 4 * C, C)));
});
