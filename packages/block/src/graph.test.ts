import t from 'tap';
import { ShearError } from '@shear/base';
import { BlockGraph } from './graph.js';
import { BlockNode, type BlockUser, type ChildEdge, type DriverInfo } from './node.js';
import type { BlockIO } from './io.js';
import { MemoryDriver } from './drivers/memory.js';
import {
  PERM_ALL,
  PERM_CONSISTENT_READ,
  PERM_WRITE,
  PERM_WRITE_UNCHANGED,
  filterChildPerms,
  formatChildPerms,
} from './permissions.js';

const MiB = 2 ** 20;
const PROTOCOL: DriverInfo = { name: 'memory', childPerms: filterChildPerms };
const FORMAT: DriverInfo = { name: 'fmt', childPerms: formatChildPerms };
const FILTER: DriverInfo = { name: 'counting-filter', childPerms: filterChildPerms, isFilter: true };
const user = (name: string): BlockUser => ({ kind: 'user', name });
/** A point-in-time reader: needs consistent reads, lets no one write underneath it. */
const PIT_PERM = PERM_CONSISTENT_READ;
const PIT_SHARED = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED;

function memoryNode(graph: BlockGraph, name: string, opts: { readOnly?: boolean } = {}) {
  return graph.addNode({ name, info: PROTOCOL, readOnly: opts.readOnly ?? false, open: async () => new MemoryDriver({ length: 4 * MiB }) });
}

/** A pass-through driver on its `file` child that counts writes. */
class CountingFilter implements BlockIO {
  writes = 0;
  constructor(readonly file: ChildEdge) {}
  get length() { return this.file.length; }
  read(o: number, b: Uint8Array) { return this.file.read(o, b); }
  write(o: number, b: Uint8Array) { this.writes++; return this.file.write(o, b); }
  writeZeroes(o: number, n: number) { return this.file.writeZeroes(o, n); }
  discard(o: number, n: number) { return this.file.discard(o, n); }
  flush() { return this.file.flush(); }
  blockStatus(o: number, n: number) { return this.file.blockStatus(o, n); }
  async close() {}
}

function filterNode(graph: BlockGraph, name: string, below: BlockNode, readOnly = false) {
  return graph.addNode({
    name, info: FILTER, readOnly, children: [{ role: 'file', node: below }],
    open: async (c) => new CountingFilter(c.get('file')!),
  });
}

/** Everything that must not change when an edit is refused. */
function shape(graph: BlockGraph) {
  return JSON.stringify(graph.nodes().map((n) => ({
    name: n.name,
    parents: [...n.parentEdges].map((e) => `${'name' in e.parent ? e.parent.name : '?'}:${e.role}:${e.perm}:${e.shared}`).sort(),
    children: n.childEdges.map((e) => `${e.role}->${e.child.name}`),
  })));
}

t.test('node names follow QEMU rules and are unique', async (t) => {
  const g = new BlockGraph();
  await memoryNode(g, 'disk0');
  await t.rejects(memoryNode(g, 'disk0'), { code: 'ERR_BLOCK_NODE_EXISTS' });
  for (const bad of ['0disk', '', 'a b', '#block1', 'x'.repeat(32)]) {
    await t.rejects(memoryNode(g, bad), { code: 'ERR_BLOCK_NODE_NAME' }, JSON.stringify(bad));
  }
  const anon = await g.addNode({ info: PROTOCOL, open: async () => new MemoryDriver({ length: MiB }) });
  t.match(anon.name, /^#block\d+$/, 'generated names cannot collide with user names');
  t.equal(g.nodes().length, 2);
});

t.test('a failed open leaves the graph as it was and frees the name', async (t) => {
  const g = new BlockGraph();
  const file = await memoryNode(g, 'file0');
  const before = shape(g);
  await t.rejects(
    g.addNode({ name: 'fmt0', info: FORMAT, children: [{ role: 'file', node: file }], open: async () => { throw new ShearError('ERR_IO', 'boom'); } }),
    { code: 'ERR_IO' },
  );
  t.equal(shape(g), before);
  t.equal(file.parentEdges.size, 0);
  const ok = await g.addNode({ name: 'fmt0', info: FORMAT, children: [{ role: 'file', node: file }], open: async (c) => new CountingFilter(c.get('file')!) });
  t.equal(ok.child('file')!.child, file);
});

t.test('two writable formats on one file conflict; the refusal changes nothing', async (t) => {
  const g = new BlockGraph();
  const file = await memoryNode(g, 'file0');
  await g.addNode({ name: 'fmt0', info: FORMAT, children: [{ role: 'file', node: file }], open: async (c) => new CountingFilter(c.get('file')!) });
  const before = shape(g);
  await t.rejects(
    g.addNode({ name: 'fmt1', info: FORMAT, children: [{ role: 'file', node: file }], open: async (c) => new CountingFilter(c.get('file')!) }),
    { code: 'ERR_BLOCK_PERMISSION_CONFLICT', message: /does not allow \[.*write/ },
  );
  t.equal(shape(g), before);
  // A read-only format beside a writable one is refused too: the writer does not share writes
  // with it and it must not see metadata change underneath.
  await t.rejects(
    g.addNode({ name: 'fmt2', info: FORMAT, readOnly: true, children: [{ role: 'file', node: file }], open: async (c) => new CountingFilter(c.get('file')!) }),
    { code: 'ERR_BLOCK_PERMISSION_CONFLICT' },
  );
  t.equal(shape(g), before);
});

t.test('a point-in-time reader and a writer can never share a node, in either order', async (t) => {
  const g = new BlockGraph();
  const disk = await memoryNode(g, 'disk');
  const reader = g.attachUser(user('pit-reader'), disk, PIT_PERM, PIT_SHARED);
  const before = shape(g);
  t.throws(() => g.attachUser(user('guest'), disk, PERM_WRITE | PERM_CONSISTENT_READ, PERM_ALL), { code: 'ERR_BLOCK_PERMISSION_CONFLICT' });
  t.equal(shape(g), before);
  g.detachUser(reader);
  g.attachUser(user('guest'), disk, PERM_WRITE | PERM_CONSISTENT_READ, PERM_ALL);
  t.throws(() => g.attachUser(user('pit-reader'), disk, PIT_PERM, PIT_SHARED), { code: 'ERR_BLOCK_PERMISSION_CONFLICT' });
  // Nor through a filter: permissions pass through it.
  const f = await filterNode(g, 'f', disk);
  const before2 = shape(g);
  t.throws(() => g.attachUser(user('pit-reader'), f, PIT_PERM, PIT_SHARED), { code: 'ERR_BLOCK_PERMISSION_CONFLICT' });
  t.equal(shape(g), before2);
  // Readers that allow writes coexist with writers (an ordinary read-only export).
  g.attachUser(user('export'), disk, PERM_CONSISTENT_READ, PERM_ALL);
});

t.test('read-only nodes refuse writers; edges refuse I/O they hold no permission for', async (t) => {
  const g = new BlockGraph();
  const ro = await memoryNode(g, 'ro', { readOnly: true });
  t.throws(() => g.attachUser(user('w'), ro, PERM_WRITE, PERM_ALL), { code: 'ERR_BLOCK_PERMISSION_CONFLICT', message: /read-only/ });
  const rw = await memoryNode(g, 'rw');
  const readerEdge = g.attachUser(user('r'), rw, PERM_CONSISTENT_READ, PERM_ALL);
  t.throws(() => readerEdge.write(0, new Uint8Array(512)), { code: 'ERR_BLOCK_PERMISSION_MISSING' });
  await readerEdge.read(0, new Uint8Array(512));
  t.pass('reads allowed');
});

t.test('inserting a filter moves every parent onto it; removing it moves them back', async (t) => {
  const g = new BlockGraph();
  const disk = await memoryNode(g, 'disk');
  const guest = g.attachUser(user('guest'), disk, PERM_WRITE | PERM_CONSISTENT_READ, PERM_ALL);
  const exp = g.attachUser(user('export'), disk, PERM_CONSISTENT_READ, PERM_ALL);
  const f = await filterNode(g, 'cbw', disk);
  g.insertFilter(f, disk);
  t.equal(guest.child, f, 'the guest edge now points at the filter');
  t.equal(exp.child, f, 'so does the export');
  t.same([...disk.parentEdges].map((e) => e.parent), [f], 'only the filter is left on the disk');
  t.ok((f.child('file')!.perm & PERM_WRITE) !== 0, 'the filter passes the guest write permission down');
  await guest.write(0, new Uint8Array(4096).fill(7));
  t.equal((f.driver as CountingFilter).writes, 1, 'guest writes pass through the filter');
  await g.removeFilter(f);
  t.equal(guest.child, disk);
  t.equal(exp.child, disk);
  t.notOk(g.find('cbw'), 'the filter node is gone');
  const buf = new Uint8Array(1);
  await exp.read(0, buf);
  t.equal(buf[0], 7);
});

t.test('a filter insertion that would break permissions is undone completely', async (t) => {
  const g = new BlockGraph();
  const disk = await memoryNode(g, 'disk');
  g.attachUser(user('guest'), disk, PERM_WRITE | PERM_CONSISTENT_READ, PERM_ALL);
  const roFilter = await filterNode(g, 'ro-filter', disk, true);
  const before = shape(g);
  t.throws(() => g.insertFilter(roFilter, disk), { code: 'ERR_BLOCK_PERMISSION_CONFLICT', message: /read-only/ });
  t.equal(shape(g), before, 'the guest is still attached to the disk with its old permissions');
  // Replacing a node by its own parent would create a cycle: refused and undone.
  const f = await filterNode(g, 'f', disk);
  const before2 = shape(g);
  t.throws(() => g.replaceNode(disk, f), { code: 'ERR_BLOCK_GRAPH', message: /cycle/ });
  t.equal(shape(g), before2);
});

t.test('nodes in use cannot be removed', async (t) => {
  const g = new BlockGraph();
  const disk = await memoryNode(g, 'disk');
  const f = await filterNode(g, 'f', disk);
  await t.rejects(g.removeNode('disk'), { code: 'ERR_BLOCK_NODE_IN_USE', message: /node "f" as "file"/ });
  await g.removeNode(f.name);
  await g.removeNode('disk');
  t.equal(g.nodes().length, 0);
  await t.rejects(g.removeNode('disk'), { code: 'ERR_BLOCK_NODE_NOT_FOUND' });
});

t.test('every write marks the recording bitmaps before it completes, also when it fails', async (t) => {
  const g = new BlockGraph();
  const disk = await memoryNode(g, 'disk');
  const bm = disk.bitmaps.add({ name: 'b', granularity: 65536 });
  const off = disk.bitmaps.add({ name: 'off', granularity: 65536, disabled: true });
  await disk.write(100, new Uint8Array(10));
  await disk.writeZeroes(MiB, 65536);
  await disk.discard(2 * MiB, 1);
  t.same([...bm.bits.dirtyExtents()], [{ offset: 0, bytes: 65536 }, { offset: MiB, bytes: 65536 }, { offset: 2 * MiB, bytes: 65536 }]);
  t.equal(off.bits.countBits(), 0);

  // A driver that writes half the range and then fails: the bits are still set.
  const half: BlockIO = Object.assign(new MemoryDriver({ length: MiB }), {
    async write(this: MemoryDriver, o: number, b: Uint8Array) {
      await MemoryDriver.prototype.write.call(this, o, b.subarray(0, b.length / 2));
      throw new ShearError('ERR_IO', 'Cannot write: injected');
    },
  });
  const flaky = await g.addNode({ name: 'flaky', info: PROTOCOL, open: async () => half });
  const fb = flaky.bitmaps.add({ name: 'b', granularity: 4096 });
  await t.rejects(flaky.write(0, new Uint8Array(3 * 4096)), { code: 'ERR_IO' });
  t.equal(fb.bits.countBits(), 3, 'all three granules touched by the failed write are dirty');
  const before = bm.bits.countBits();
  await t.rejects(disk.write(4 * MiB - 1, new Uint8Array(2)), { code: 'ERR_OUT_OF_BOUNDS' });
  t.equal(bm.bits.countBits(), before, 'a refused out-of-range write marks nothing');
});

t.test('removing a filter drains it: a request inside finishes, one arriving meanwhile goes to the node below', async (t) => {
  const g = new BlockGraph();
  const disk = await memoryNode(g, 'disk');
  const guest = g.attachUser(user('guest'), disk, PERM_WRITE | PERM_CONSISTENT_READ, PERM_ALL);
  let open!: () => void;
  const gate = new Promise<void>((r) => (open = r));
  const f = await g.addNode({
    name: 'slow', info: FILTER, children: [{ role: 'file', node: disk }],
    open: async (c) => {
      const inner = new CountingFilter(c.get('file')!);
      const write = inner.write.bind(inner);
      inner.write = async (o: number, b: Uint8Array) => {
        await gate;
        return write(o, b);
      };
      return inner;
    },
  });
  g.insertFilter(f, disk);
  const inside = guest.write(0, new Uint8Array(512).fill(1)); // waits inside the filter
  await new Promise((r) => setImmediate(r));
  const removal = g.removeFilter(f);
  await new Promise((r) => setImmediate(r));
  const arriving = guest.write(4096, new Uint8Array(512).fill(2)); // held back by the drain
  await new Promise((r) => setImmediate(r));
  t.equal(g.find('slow')?.name, 'slow', 'the filter stays until the request inside it is done');
  open();
  await Promise.all([inside, removal, arriving]);
  t.notOk(g.find('slow'));
  t.equal((f as unknown as { isOpen: boolean }).isOpen, false);
  const buf = new Uint8Array(1);
  await guest.read(4096, buf);
  t.equal(buf[0], 2, 'the held-back write reached the disk directly');
  await guest.read(0, buf);
  t.equal(buf[0], 1, 'the write inside the filter completed');
});
