import t from 'tap';
import { NodeBitmaps } from './node-bitmaps.js';
import { defaultGranularity } from './limits.js';

const MiB = 1024 * 1024;

function snapshot(node: NodeBitmaps) {
  return JSON.stringify(node.list().map((b) => ({ ...b.info(), extents: [...b.bits.dirtyExtents()] })));
}

t.test('add validates name, uniqueness and granularity before creating anything', async (t) => {
  const node = new NodeBitmaps('disk0', 16 * MiB);
  node.add({ name: 'b0' });
  const before = snapshot(node);
  t.throws(() => node.add({ name: 'b0' }), { code: 'ERR_BITMAP_EXISTS', message: /already exists/ });
  t.throws(() => node.add({ name: '' }), { code: 'ERR_BITMAP_NAME' });
  t.throws(() => node.add({ name: 'x'.repeat(1024) }), { code: 'ERR_BITMAP_NAME' });
  t.throws(() => node.add({ name: 'g', granularity: 256 }), { code: 'ERR_BITMAP_GRANULARITY' });
  t.throws(() => node.add({ name: 'g', granularity: 3000 }), { code: 'ERR_BITMAP_GRANULARITY' });
  t.throws(() => node.add({ name: 'g', granularity: 2 ** 32 }), { code: 'ERR_BITMAP_GRANULARITY' });
  t.equal(snapshot(node), before, 'refusals changed nothing');
  t.ok(node.add({ name: 'x'.repeat(1023), granularity: 2 ** 31 }), 'the limits themselves are allowed');
  t.equal(node.get('b0').granularity, 65536, 'default granularity 64 KiB');
  t.equal(defaultGranularity(2 * MiB), 65536);
  t.equal(defaultGranularity(512), 4096);
  t.equal(new NodeBitmaps('q', MiB, { clusterBytes: 16384 }).add({ name: 'a' }).granularity, 16384);
});

t.test('writes reach recording bitmaps only', async (t) => {
  const node = new NodeBitmaps('disk0', MiB);
  const on = node.add({ name: 'on', granularity: 4096 });
  const off = node.add({ name: 'off', granularity: 4096, disabled: true });
  node.markDirty(5000, 10_000);
  t.same([...on.bits.dirtyExtents()], [{ offset: 4096, bytes: 12288 }]);
  t.equal(off.bits.countBits(), 0);
  node.enable('off');
  node.disable('on');
  node.markDirty(0, 1);
  t.equal(off.bits.countBits(), 1);
  t.equal(on.bits.countBits(), 3);
  t.same(on.info(), { name: 'on', count: 12288, granularity: 4096, recording: false, busy: false, persistent: false });
});

t.test('a busy bitmap refuses every change, and the refusal changes nothing', async (t) => {
  const node = new NodeBitmaps('disk0', MiB);
  const bm = node.add({ name: 'b', granularity: 4096 });
  node.add({ name: 'other', granularity: 4096 }).bits.set(0, 4096);
  bm.bits.set(8192, 4096);
  node.createSuccessor(bm);
  const before = snapshot(node);
  for (const op of [() => node.clear('b'), () => node.enable('b'), () => node.disable('b'), () => node.remove('b'), () => node.merge('b', [node.get('other')])]) {
    t.throws(op, { code: 'ERR_BITMAP_BUSY', message: /currently in use/ });
  }
  t.throws(() => node.createSuccessor(bm), { code: 'ERR_BITMAP_HAS_SUCCESSOR' });
  t.equal(snapshot(node), before);
  t.equal(node.list().length, 3, 'the anonymous successor is listed');
  t.same(node.list()[2]!.info(), { count: 0, granularity: 4096, recording: true, busy: false, persistent: false }, 'anonymous and recording');
  // A frozen bitmap may still be a merge source.
  node.merge('other', [bm]);
  t.equal(node.get('other').bits.countBits(), 2);
});

t.test('inconsistent bitmaps can only be removed; read-only ones cannot be changed', async (t) => {
  const node = new NodeBitmaps('disk0', MiB);
  const bad = node.add({ name: 'bad', persistent: true });
  bad.markLoaded({ inconsistent: true });
  t.equal(bad.recording, false, 'an inconsistent bitmap does not record');
  for (const op of [() => node.clear('bad'), () => node.enable('bad'), () => node.createSuccessor(bad), () => node.merge('bad', [])]) {
    t.throws(op, { code: 'ERR_BITMAP_INCONSISTENT', message: /block-dirty-bitmap-remove/ });
  }
  node.add({ name: 'target' });
  t.throws(() => node.merge('target', [bad]), { code: 'ERR_BITMAP_INCONSISTENT' }, 'nor be a merge source');
  t.same(node.get('bad').info().inconsistent, true);
  node.remove('bad');
  t.notOk(node.find('bad'));

  const ro = node.add({ name: 'ro' });
  ro.markLoaded({ readonly: true });
  t.throws(() => node.clear('ro'), { code: 'ERR_BITMAP_READONLY' });
  t.throws(() => node.remove('ro'), { code: 'ERR_BITMAP_READONLY' });
  node.disable('ro');
  t.equal(ro.recording, false, 'enable/disable allowed on read-only');
});

t.test('merge ORs sources of any granularity and refuses mismatched sizes before changing anything', async (t) => {
  const a = new NodeBitmaps('a', MiB);
  const b = new NodeBitmaps('b', MiB);
  const c = new NodeBitmaps('c', 2 * MiB);
  const dst = a.add({ name: 'dst', granularity: 65536 });
  const s1 = a.add({ name: 's1', granularity: 512 });
  const s2 = b.add({ name: 's2', granularity: 4096 });
  const wrong = c.add({ name: 'wrong' });
  s1.bits.set(1000, 1);
  s2.bits.set(200_000, 5000);
  t.throws(() => a.merge('dst', [s1, wrong]), { code: 'ERR_BITMAP_SIZE_MISMATCH' });
  t.equal(dst.bits.countBits(), 0, 'no source was merged');
  a.merge('dst', [s1, s2]);
  t.same([...dst.bits.dirtyExtents()], [{ offset: 0, bytes: 65536 }, { offset: 196608, bytes: 65536 }]);
  t.throws(() => a.merge('nope', [s1]), { code: 'ERR_BITMAP_NOT_FOUND' });
});

t.test('clear and remove', async (t) => {
  const node = new NodeBitmaps('disk0', MiB);
  const bm = node.add({ name: 'b' });
  bm.bits.set(0, MiB);
  node.clear('b');
  t.equal(bm.bits.countBits(), 0);
  t.equal(node.remove('b'), bm);
  t.ok(bm.released);
  t.throws(() => node.remove('b'), { code: 'ERR_BITMAP_NOT_FOUND' });
});
