import t from 'tap';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { BlockGraph } from './graph.js';
import type { BlockNode } from './node.js';
import type { BlockIO } from './io.js';
import type { HostMappable } from './host-mapping.js';
import { MemoryDriver } from './drivers/memory.js';
import { FileDriver } from './drivers/file.js';
import { filterChildPerms } from './permissions.js';
import {
  hasHostFile,
  hasHostMappingSource,
  hasPersistentBitmapStore,
  isBoundedCache,
  isPointInTimeView,
  isResizable,
  isSnapshotSource,
} from './capabilities.js';

const PROTOCOL = { name: 'plain', childPerms: filterChildPerms };

/** A driver that is no class of Shear's: a plain object over a memory device, plus `extra`. */
function plainDriver<T extends object>(length: number, extra: T): BlockIO & T {
  const mem = new MemoryDriver({ length });
  const base: BlockIO = {
    length,
    read: (o, b) => mem.read(o, b),
    write: (o, b) => mem.write(o, b),
    writeZeroes: (o, n) => mem.writeZeroes(o, n),
    discard: (o, n) => mem.discard(o, n),
    flush: () => mem.flush(),
    blockStatus: (o, n) => mem.blockStatus(o, n),
    close: () => mem.close(),
  };
  // Descriptors, not a spread: a getter in `extra` stays a getter.
  return Object.defineProperties(base, Object.getOwnPropertyDescriptors(extra)) as BlockIO & T;
}

const noop = async (): Promise<never> => {
  throw new Error('not called');
};

t.test('each guard recognises a plain object that offers the capability, and nothing that lacks part of it', async (t) => {
  const node = {} as BlockNode;
  const cases: Array<[string, (io: unknown) => boolean, object, object[]]> = [
    ['hasHostFile', hasHostFile, { path: '/img', direct: false }, [{ path: '/img' }, { direct: true }, { path: 1, direct: false }]],
    ['isResizable', isResizable, { truncate: noop }, [{ truncate: 1 }]],
    ['hasHostMappingSource', hasHostMappingSource, { hostMapping: () => undefined }, [{ mapRead: noop }]],
    [
      'hasPersistentBitmapStore',
      hasPersistentBitmapStore,
      { storedBitmaps: noop, storeBitmaps: noop, removeBitmaps: noop },
      [{ storedBitmaps: noop, storeBitmaps: noop }, { image: {} }],
    ],
    [
      'isSnapshotSource',
      isSnapshotSource,
      { length: 0, snapshotRead: noop, snapshotDiscard: noop, snapshotBlockStatus: noop, targetEdge: {} },
      [{ snapshotRead: noop, snapshotDiscard: noop, snapshotBlockStatus: noop }, { targetEdge: {} }],
    ],
    ['isPointInTimeView', isPointInTimeView, { preservedDataNode: () => node }, [{ filter: {} }]],
    ['isBoundedCache', isBoundedCache, { spaceWaitMs: 0, heldRanges: () => [], info: () => ({}) }, [{ heldRanges: () => [], info: () => ({}) }, { spaceWaitMs: 0, info: () => ({}) }]],
  ];
  for (const [name, guard, offers, lacks] of cases) {
    t.ok(guard(plainDriver(4096, offers)), `${name}: a plain driver object that offers it`);
    t.notOk(guard(new MemoryDriver({ length: 4096 })), `${name}: the memory driver does not offer it`);
    for (const l of lacks) t.notOk(guard(plainDriver(4096, l)), `${name}: not ${JSON.stringify(Object.keys(l))}`);
    for (const v of [undefined, null, 0, 'path']) t.notOk(guard(v), `${name}: not ${String(v)}`);
  }
});

t.test('the file driver offers a host file, resizing and a host mapping', async (t) => {
  const img = path.join(t.testdir(), 'img');
  writeFileSync(img, Buffer.alloc(8192));
  const f = await FileDriver.open(img);
  t.teardown(() => f.close());
  t.ok(hasHostFile(f) && f.path === img && f.direct === false);
  t.ok(isResizable(f));
  t.ok(hasHostMappingSource(f));
  t.notOk(isPointInTimeView(f) || isSnapshotSource(f) || isBoundedCache(f) || hasPersistentBitmapStore(f));
  t.same(await f.hostMapping()!.mapRead!(0, 4096), [{ kind: 'fd', fd: f.fd, hostOffset: 0, bytes: 4096 }]);
});

t.test('the graph resizes and maps any driver that offers it, and refuses with a typed error one that does not', async (t) => {
  const g = new BlockGraph();
  t.teardown(async () => {
    for (const n of g.nodes()) await g.removeNode(n.name);
  });
  let length = 4096;
  const extents = [{ kind: 'zero' as const, bytes: 512 }];
  const mapping: HostMappable = { mapRead: async () => extents };
  const resizable = await g.addNode({
    name: 'r',
    info: PROTOCOL,
    open: async () =>
      plainDriver(4096, {
        get length() {
          return length;
        },
        truncate: async (n: number) => void (length = n),
        hostMapping: () => mapping,
      }),
  });
  await resizable.truncate(8192);
  t.equal(resizable.length, 8192, 'the node took the new length');
  t.equal(resizable.bitmaps.add({ name: 'b', granularity: 512 }).bits.size, 8192, 'bitmaps cover the new length');
  t.same(await resizable.hostMapping()!.mapRead!(0, 512), extents, 'the mapping the driver gave');
  t.equal(resizable.hostMapping()!.mapWrite, undefined, 'no write direction where the driver offers none');

  const fixed = await g.addNode({ name: 'm', info: PROTOCOL, open: async () => new MemoryDriver({ length: 4096 }) });
  await t.rejects(fixed.truncate(8192), { code: 'ERR_NOT_IMPLEMENTED', message: /driver "plain" cannot resize/ });
  t.equal(fixed.hostMapping(), undefined, 'no mapping from a driver that offers none');
});
