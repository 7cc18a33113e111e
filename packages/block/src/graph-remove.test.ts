import t from 'tap';
import { BlockGraph } from './graph.js';
import { BlkdebugDriver } from './drivers/blkdebug.js';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { FileDriver } from './drivers/file.js';
import { filterChildPerms, formatChildPerms } from './permissions.js';
import type { BlockIO, BlockStatusExtent } from './io.js';
import type { ChildEdge } from './node.js';

/** A format-like driver that, like qcow2, writes its metadata back (and grows its file) on close. */
class WritesOnClose implements BlockIO {
  constructor(readonly file: ChildEdge) {}
  get length() { return 4096; }
  read(o: number, b: Uint8Array) { return this.file.read(o, b); }
  write(o: number, b: Uint8Array) { return this.file.write(o, b); }
  writeZeroes(o: number, n: number) { return this.file.writeZeroes(o, n); }
  discard(o: number, n: number) { return this.file.discard(o, n); }
  flush() { return this.file.flush(); }
  blockStatus(o: number, n: number): Promise<BlockStatusExtent[]> { return this.file.blockStatus(o, n); }
  async close() {
    await this.file.truncate(this.file.length + 4096);
    await this.file.write(0, new Uint8Array(512).fill(9));
    await this.file.flush();
  }
}

t.test('a node is closed before its edges give up their permissions: it may write through a filter below it', async (t) => {
  const g = new BlockGraph();
  const img = path.join(t.testdir(), 'img');
  writeFileSync(img, Buffer.alloc(8192));
  const file = await g.addNode({ name: 'file', info: { name: 'file', childPerms: filterChildPerms }, open: () => FileDriver.open(img) });
  const dbg = await g.addNode({
    name: 'dbg', info: { name: 'blkdebug', childPerms: filterChildPerms, isFilter: true },
    children: [{ role: 'image', node: file }],
    open: async (c) => new BlkdebugDriver({ image: c.get('image')! }),
  });
  await g.addNode({ name: 'fmt', info: { name: 'fmt', childPerms: formatChildPerms }, children: [{ role: 'file', node: dbg }], open: async (c) => new WritesOnClose(c.get('file')!) });
  await g.removeNode('fmt');
  t.equal(statSync(img).size, 12288, 'the resize went through blkdebug to the file');
  t.ok(readFileSync(img).subarray(0, 512).every((x) => x === 9), 'and the write on close landed');
  t.notOk(g.find('fmt'), 'the node is gone');
  await g.removeNode('dbg');
  t.equal([...file.parentEdges].length, 0, 'and its edges with it');
  await g.removeNode('file');
});

