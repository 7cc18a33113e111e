import t from 'tap';
import { BlockGraph, MemoryDriver, PERM_ALL, PERM_CONSISTENT_READ, filterChildPerms, formatChildPerms, type BlockIO, type BlockStatusExtent, type ChildEdge } from '@shear/block';
import { RawClient, statusExtents } from './raw-client.fixture.js';
import { KiB, MiB, serve } from './setup.fixture.js';
import { bitmapExtents, exportContexts, listContexts, selectContexts } from './server/metadata.js';

/**
 * Metadata contexts: the query rules, bitmap extents (clipping, REQ_ONE, the extent cap), and
 * qemu:allocation-depth through a backing chain and a filter, checked against what qemu-nbd -A
 * 7.2 reports for the same layout (top cluster 0 → 1 "local", backing cluster 4 → 2, rest → 0).
 */

const C = 64 * KiB;

/** A format-like node: clusters written here are allocated here; the rest reads from `backing`. */
class Overlay implements BlockIO {
  readonly own = new Set<number>();
  readonly mem: MemoryDriver;
  constructor(readonly backing: ChildEdge | undefined, readonly length: number) {
    this.mem = new MemoryDriver({ length });
  }
  async read(o: number, b: Uint8Array) {
    return this.mem.read(o, b);
  }
  async write(o: number, b: Uint8Array) {
    for (let c = Math.floor(o / C); c * C < o + b.length; c++) this.own.add(c);
    return this.mem.write(o, b);
  }
  async writeZeroes(o: number, n: number) { return this.mem.writeZeroes(o, n); }
  async discard(o: number, n: number) { return this.mem.discard(o, n); }
  async flush() {}
  async blockStatus(o: number, n: number): Promise<BlockStatusExtent[]> {
    const out: BlockStatusExtent[] = [];
    for (let at = o; at < o + n; ) {
      const c = Math.floor(at / C);
      const to = Math.min(o + n, (c + 1) * C);
      const allocated = this.own.has(c);
      const last = out[out.length - 1];
      if (last && last.allocated === allocated) last.bytes += to - at;
      else out.push({ offset: at, bytes: to - at, data: allocated, zero: !allocated, allocated });
      at = to;
    }
    return out;
  }
  async close() {}
}

class PassThrough implements BlockIO {
  constructor(readonly file: ChildEdge) {}
  get length() { return this.file.length; }
  read(o: number, b: Uint8Array) { return this.file.read(o, b); }
  write(o: number, b: Uint8Array) { return this.file.write(o, b); }
  writeZeroes(o: number, n: number) { return this.file.writeZeroes(o, n); }
  discard(o: number, n: number) { return this.file.discard(o, n); }
  flush() { return this.file.flush(); }
  blockStatus(o: number, n: number) { return this.file.blockStatus(o, n); }
  async close() {}
}

t.test('qemu:allocation-depth through a backing chain and a filter, as qemu-nbd reports it', async (t) => {
  const g = new BlockGraph();
  const size = 1 * MiB;
  const base = await g.addNode({ name: 'base', info: { name: 'fmt', childPerms: formatChildPerms }, open: async () => new Overlay(undefined, size) });
  const top = await g.addNode({ name: 'top', info: { name: 'fmt', childPerms: formatChildPerms }, children: [{ role: 'backing', node: base }], open: async (c) => new Overlay(c.get('backing'), size) });
  const filter = await g.addNode({ name: 'filter', info: { name: 'pass', childPerms: filterChildPerms, isFilter: true }, children: [{ role: 'file', node: top }], open: async (c) => new PassThrough(c.get('file')!) });
  await (base.driver as Overlay).write(4 * C, Buffer.alloc(C, 1));
  await (top.driver as Overlay).write(0, Buffer.alloc(C, 2));
  const edge = g.attachUser({ kind: 'user', name: 'nbd' }, filter, PERM_CONSISTENT_READ, PERM_ALL);
  const s = await serve(t, { graph: g, node: filter, memory: (top.driver as Overlay).mem, content: Buffer.alloc(0) }, { edge, writable: false, allocationDepth: true });
  const c = await RawClient.connect(s.address);
  await c.go('disk', { meta: ['qemu:allocation-depth'] });
  c.sendReq(7, { offset: 0, length: size });
  t.same(statusExtents(await c.reply()).get(1), [[C, 1], [3 * C, 0], [C, 2], [size - 5 * C, 0]]);
  c.sendReq(7, { offset: 4 * C + 10, length: 100, flags: 8 });
  t.same(statusExtents(await c.reply()).get(1), [[100, 2]], 'REQ_ONE, clipped');
  c.close();
});

t.test('query rules and bitmap extents', async (t) => {
  const g = new BlockGraph();
  const node = await g.addNode({ name: 'n', info: { name: 'memory', childPerms: filterChildPerms }, open: async () => new MemoryDriver({ length: 1 * MiB }) });
  const a = node.bitmaps.add({ name: 'a', granularity: C, disabled: true });
  const b = node.bitmaps.add({ name: 'b', granularity: C, disabled: true });
  const all = exportContexts({ allocationDepth: false, bitmaps: [a, b] });
  t.same(all.map((c) => [c.id, c.name]), [[0, 'base:allocation'], [2, 'qemu:dirty-bitmap:a'], [3, 'qemu:dirty-bitmap:b']]);
  t.same(listContexts(all, ['qemu:']).map((c) => c.name), ['qemu:dirty-bitmap:a', 'qemu:dirty-bitmap:b'], 'no allocation-depth unless enabled');
  t.same(listContexts(all, ['qemu:allocation-depth']), []);
  t.same(selectContexts(all, ['qemu:dirty-bitmap:b', 'qemu:dirty-bitmap:']).map((c) => c.id), [3]);
  for (let i = 0; i < 16; i += 2) a.bits.set(i * C, C);
  t.same(bitmapExtents(a, 10, 4 * C, 1000), [[C - 10, 1], [C, 0], [C, 1], [C, 0], [10, 1]].map(([length, flags]) => ({ length, flags })));
  t.same(bitmapExtents(a, 10, 4 * C, 1), [{ length: C - 10, flags: 1 }], 'REQ_ONE');
  t.same(bitmapExtents(a, 0, 1 * MiB, 3).length, 3, 'capped at the extent limit: a prefix');
  t.same(bitmapExtents(b, 0, 1 * MiB, 10), [{ length: 1 * MiB, flags: 0 }]);
});
