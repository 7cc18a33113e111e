import t from 'tap';
import { randomBytes } from 'node:crypto';
import { BlockGraph, MemoryDriver, PERM_ALL, PERM_CONSISTENT_READ, PERM_WRITE, filterChildPerms, type ChildEdge, type WriteOptions } from '@shear/block';
import { CBW_INFO, CopyBeforeWrite } from './copy-before-write.js';
import { CACHE_CHUNK_BYTES as C, FLEECING_CACHE_INFO, FleecingCache, type FleecingCacheOptions } from './fleecing-cache.js';
import { SNAPSHOT_ACCESS_INFO, SnapshotAccess } from './snapshot-access.js';

const INFO = { name: 'memory', childPerms: filterChildPerms };
const user = (name: string) => ({ kind: 'user' as const, name });

/** A cache on a spill file in memory, with its events recorded. */
async function cacheWith(chunks: number, opts: Partial<FleecingCacheOptions> & { fileChunks?: number }) {
  const g = new BlockGraph();
  const spill = await g.addNode({ name: 'spill', info: INFO, open: async () => new MemoryDriver({ length: chunks * C }) });
  const events: { event: string; data: Record<string, unknown> }[] = [];
  const node = await g.addNode({
    name: 'cache',
    info: FLEECING_CACHE_INFO,
    children: opts.fileChunks ? [{ role: 'file', node: spill }] : [],
    open: async (c) =>
      new FleecingCache({
        length: chunks * C,
        ramBytes: 0,
        stateEventIntervalMs: 0,
        ...opts,
        ...(opts.fileChunks ? { file: c.get('file')!, fileBytes: opts.fileChunks * C } : {}),
        onEvent: (event, data) => events.push({ event, data }),
      }),
  });
  // The cache's owner (a copy-before-write filter) is what gives it write on its spill file.
  g.attachUser(user('cbw'), node, PERM_WRITE | PERM_CONSISTENT_READ, PERM_ALL);
  return { cache: node.driver as FleecingCache, events, states: () => events.filter((e) => e.event === 'X_SHEAR_CACHE_STATE').map((e) => e.data['state']) };
}

const chunk = (fill: number) => new Uint8Array(C).fill(fill);

t.test('RAM first, then the spill file; full refuses at once without a wait; states are reported on change only', async (t) => {
  const { cache, events, states } = await cacheWith(8, { ramBytes: 2 * C, fileChunks: 2 });
  for (let c = 0; c < 4; c++) await cache.write(c * C, chunk(c + 1));
  t.match(cache.stats, { ramBytes: 2 * C, fileBytes: 2 * C, spills: 2, state: 'spilling' });
  const back = new Uint8Array(4 * C);
  await cache.read(0, back);
  for (let c = 0; c < 4; c++) t.equal(back[c * C], c + 1, `chunk ${c} reads back from ${c < 2 ? 'RAM' : 'the file'}`);
  await t.rejects(cache.write(4 * C, chunk(9)), { code: 'ERR_NO_SPACE', message: /fleecing cache is full/ });
  await t.rejects(cache.write(5 * C, chunk(9)), { code: 'ERR_NO_SPACE' });
  t.match(cache.stats, { failures: 2, waits: 0, state: 'full' });
  t.equal(events.filter((e) => e.event === 'X_SHEAR_CACHE_WRITE_FAILED').length, 1, 'one failure event per full period');
  await cache.discard(2 * C, C);
  await cache.discard(0, 2 * C);
  t.same(states(), ['spilling', 'full', 'spilling'], 'RAM only -> spilling -> full -> space again');
  await cache.discard(3 * C, C);
  t.same(states(), ['spilling', 'full', 'spilling', 'ram'], 'back to RAM only once the file is empty');
  t.match(cache.stats, { ramBytes: 0, fileBytes: 0, drained: 4 });
  t.match(events.at(-1)!.data, { 'ram-used': 0, 'file-used': 0, waiting: 0 });
});

t.test('a full cache makes a write wait for a drain, which frees space and lets it through', async (t) => {
  const { cache, states } = await cacheWith(8, { ramBytes: C, fileChunks: 1 });
  cache.spaceWaitMs = 30_000;
  await cache.write(0, chunk(1));
  await cache.write(C, chunk(2));
  let settled = false;
  const third = cache.write(2 * C, chunk(3)).finally(() => (settled = true));
  await new Promise((r) => setTimeout(r, 20));
  t.notOk(settled, 'the write waits');
  t.match(cache.stats, { state: 'full', waiting: 1, waits: 1 });
  await cache.discard(0, C);
  await third;
  const b = new Uint8Array(C);
  await cache.read(2 * C, b);
  t.equal(b[0], 3, 'and landed once a chunk was drained');
  t.match(cache.stats, { waiting: 0, failures: 0 });
  t.same(states(), ['spilling', 'full'], 'still full: the freed chunk was taken at once');
  await cache.discard(C, C);
  t.same(states(), ['spilling', 'full', 'ram']);
});

t.test('a wait that sees no space come free fails with ERR_NO_SPACE after spaceWaitMs; close fails waiters at once', async (t) => {
  const { cache } = await cacheWith(4, { ramBytes: C });
  cache.spaceWaitMs = 50;
  await cache.write(0, chunk(1));
  const t0 = performance.now();
  await t.rejects(cache.write(C, chunk(2)), { code: 'ERR_NO_SPACE', message: /no space came free within 50 ms/ });
  t.ok(performance.now() - t0 >= 45, 'it waited');
  cache.spaceWaitMs = 60_000;
  const waiting = cache.write(2 * C, chunk(3));
  await new Promise((r) => setTimeout(r, 10));
  await cache.close();
  await t.rejects(waiting, { code: 'ERR_CLOSED' }, 'closing ends the wait');
});

t.test('state events are limited to one per interval, and the last state always goes out', async (t) => {
  const { cache, states } = await cacheWith(4, { ramBytes: C, stateEventIntervalMs: 100 });
  await cache.write(0, chunk(1));
  for (let i = 0; i < 20; i++) {
    await t.rejects(cache.write(C, chunk(2)), { code: 'ERR_NO_SPACE' });
    await cache.discard(0, C);
    await cache.write(0, chunk(1));
  }
  await cache.discard(0, C);
  t.same(states(), ['full'], 'one event within the interval');
  // The timer is due 100 ms after the first event; a busy machine may run it late.
  for (let i = 0; i < 200 && states().length < 2; i++) await new Promise((r) => setTimeout(r, 25));
  t.same(states(), ['full', 'ram'], 'the state at the end of the interval is reported');
  await cache.close();
});

t.test('concurrent writes never overbook the spill file', async (t) => {
  const { cache } = await cacheWith(8, { ramBytes: 0, fileChunks: 2 });
  const results = await Promise.allSettled([0, 1, 2, 3].map((c) => cache.write(c * C, chunk(c + 1))));
  t.equal(results.filter((r) => r.status === 'fulfilled').length, 2);
  t.equal(cache.stats.fileBytes, 2 * C);
});

/** A guest writing through copy-before-write into a fleecing cache whose writes can be held. */
async function fleecing(chunks: number, ramChunks: number, cbwTimeoutSec: number) {
  const g = new BlockGraph();
  const original = randomBytes(chunks * C);
  const disk = new MemoryDriver({ length: chunks * C });
  await disk.write(0, original);
  let gate: Promise<void> | undefined;
  class GatedCache extends FleecingCache {
    override async write(o: number, b: Uint8Array, opts?: WriteOptions) {
      await gate;
      return super.write(o, b, opts);
    }
  }
  const events: string[] = [];
  const src = await g.addNode({ name: 'disk', info: INFO, open: async () => disk });
  const cacheNode = await g.addNode({ name: 'cache', info: FLEECING_CACHE_INFO, open: async () => new GatedCache({ length: chunks * C, ramBytes: ramChunks * C, stateEventIntervalMs: 0, onEvent: (e, d) => events.push(`${e}:${d['state'] ?? ''}`) }) });
  const cbwNode = await g.addNode({
    name: 'cbw', info: CBW_INFO,
    children: [{ role: 'file', node: src }, { role: 'target', node: cacheNode }],
    open: async (c) => new CopyBeforeWrite({ file: c.get('file')!, target: c.get('target')!, cbwTimeoutSec, onEvent: (e, d) => events.push(`${e}:${d['action']}`) }),
  });
  const guest = g.attachUser(user('guest'), cbwNode, PERM_WRITE | PERM_CONSISTENT_READ, PERM_ALL);
  const snapNode = await g.addNode({ name: 'snap', info: SNAPSHOT_ACCESS_INFO, children: [{ role: 'file', node: cbwNode }], open: async (c) => new SnapshotAccess(c.get('file')!) });
  const reader: ChildEdge = g.attachUser(user('reader'), snapNode, PERM_CONSISTENT_READ | PERM_WRITE, PERM_ALL);
  return { original, cache: cacheNode.driver as GatedCache, cbw: cbwNode.driver as CopyBeforeWrite, guest, reader, events, hold: (p: Promise<void> | undefined) => (gate = p) };
}

t.test('cbw-timeout: a guest write into a full cache waits for the drain instead of failing, and the view stays exact', async (t) => {
  const f = await fleecing(8, 2, 30);
  t.equal(f.cache.spaceWaitMs, 30_000, 'the filter gives the cache its cbw-timeout');
  await f.guest.write(0, chunk(0xa1));
  await f.guest.write(C, chunk(0xa2));
  let done = false;
  const third = f.guest.write(2 * C, chunk(0xa3)).then(() => (done = true));
  await new Promise((r) => setTimeout(r, 20));
  t.notOk(done, 'the third write waits for space');
  // The drain: a backup reads a preserved cluster and discards it (discard-source).
  const view = Buffer.alloc(C);
  await f.reader.read(0, view);
  t.ok(view.equals(f.original.subarray(0, C)), 'the drained cluster is the old data');
  await f.reader.discard(0, C);
  await third;
  const all = Buffer.alloc(7 * C);
  await f.reader.read(C, all);
  t.ok(all.equals(f.original.subarray(C, 8 * C)), 'the rest of the view is the disk as it was');
  t.notOk(f.events.some((e) => e.startsWith('X_SHEAR_CBW_ERROR')), 'no guest write failed');
  t.ok(f.events.includes('X_SHEAR_CACHE_STATE:full'), 'the full state was reported');
});

t.test('break-guest-write with no space in time: the write fails, the disk keeps its data, one event per run of failures', async (t) => {
  const f = await fleecing(8, 1, 0);
  await f.guest.write(0, chunk(0xb1));
  await t.rejects(f.guest.write(C, chunk(0xb2)), { code: 'ERR_CBW_FAILED', message: /fleecing cache is full/ });
  await t.rejects(f.guest.write(2 * C, chunk(0xb3)), { code: 'ERR_CBW_FAILED' });
  const b = Buffer.alloc(2 * C);
  await f.guest.read(C, b);
  t.ok(b.equals(f.original.subarray(C, 3 * C)), 'the failed writes changed nothing');
  t.equal(f.events.filter((e) => e === 'X_SHEAR_CBW_ERROR:guest-write-failed').length, 1);
  await f.reader.discard(0, C);
  await f.guest.write(C, chunk(0xb2));
  await t.rejects(f.guest.write(2 * C, chunk(0xb3)), { code: 'ERR_CBW_FAILED' });
  t.equal(f.events.filter((e) => e === 'X_SHEAR_CBW_ERROR:guest-write-failed').length, 2, 'a new run of failures is reported again');
});

t.test('a cluster discarded while its copy runs is freed from the cache once the copy lands', async (t) => {
  const f = await fleecing(8, 8, 0);
  let release!: () => void;
  f.hold(new Promise<void>((r) => (release = r)));
  const write = f.guest.write(3 * C, chunk(0xc1));
  await new Promise((r) => setTimeout(r, 10));
  // The reader is done with cluster 3 while its preserving copy is still on its way.
  await f.reader.discard(3 * C, C);
  release();
  f.hold(undefined);
  await write;
  await new Promise((r) => setTimeout(r, 10));
  t.equal(f.cache.stats.ramBytes, 0, 'nothing of the discarded cluster stays in the cache');
  t.notOk(f.cbw.done.get(3 * C), 'and it is not counted as preserved');
});

t.test('a write waiting for space gives up when its copy is called off: a discard of its range lets the guest write through at once', async (t) => {
  const f = await fleecing(8, 1, 30);
  await f.guest.write(0, chunk(0xd1));
  const t0 = performance.now();
  const second = f.guest.write(C, chunk(0xd2));
  await new Promise((r) => setTimeout(r, 20));
  t.equal(f.cache.stats.waiting, 1, 'the copy for cluster 1 waits for space');
  // The reader is done with cluster 1: its old data is no longer needed.
  await f.reader.discard(C, C);
  await t.resolves(second, 'the guest write goes on');
  t.ok(performance.now() - t0 < 5000, 'without waiting out cbw-timeout');
  t.equal(f.cache.stats.waiting, 0);
  t.equal(f.cache.stats.failures, 0, 'and it counts as no refused write');
  const b = Buffer.alloc(C);
  await f.guest.read(C, b);
  t.ok(b.every((x) => x === 0xd2), 'the disk has the new data');
  t.equal(f.cache.stats.ramBytes, C, 'the cache still holds only cluster 0');
});
