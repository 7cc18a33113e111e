import t from 'tap';
import fc from 'fast-check';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { NbdServer } from './server/server.js';
import { NbdClientDriver } from './client/driver.js';
import { RawClient, deadline, goData, nameQueries, readData, replyError } from './raw-client.fixture.js';
import { MiB, attach, makeDisk, openHandles, serve, shortDir, until } from './setup.fixture.js';
import { isLoopbackHost } from './address.js';
import { encodeExportRequest, encodeOption, encodeRequest } from './protocol/index.js';

/**
 * The server's life: listening (loopback only by default), max-connections, exports added and
 * removed while it runs (QEMU's safe and hard modes, the deleted callback), bitmaps marked busy
 * while exported, close() ending everything without leaks, and a fuzz of whole byte streams
 * thrown at a live server.
 */

t.test('TCP refuses non-loopback addresses unless allowRemote', async (t) => {
  for (const h of ['127.0.0.1', '127.1.2.3', 'localhost', '::1', '[::1]', '::ffff:127.0.0.1']) t.ok(isLoopbackHost(h), h);
  for (const h of ['0.0.0.0', '::', '10.0.0.1', 'example.com', '128.0.0.1', '::ffff:10.0.0.1']) t.notOk(isLoopbackHost(h), h);
  const s = new NbdServer();
  await t.rejects(s.listen({ type: 'inet', host: '0.0.0.0', port: 0 }), { code: 'ERR_NBD_ADDRESS' });
  await t.rejects(s.listen({ type: 'inet', host: '127.0.0.1', port: 'x' }), { code: 'ERR_INVALID_ARGUMENT' });
  const bound = await s.listen({ type: 'inet', host: '127.0.0.1', port: '0' });
  t.equal(bound.type, 'inet');
  t.ok(bound.type === 'inet' && bound.port > 0);
  await t.rejects(s.listen({ type: 'inet', host: '127.0.0.1', port: 0 }), { code: 'ERR_INVALID_ARGUMENT' }, 'one address per server');
  await s.close();
  await t.rejects(s.listen({ type: 'inet', host: '127.0.0.1', port: 0 }), { code: 'ERR_CLOSED' });
  const remote = new NbdServer({ allowRemote: true });
  const b = await remote.listen({ type: 'inet', host: '0.0.0.0', port: 0 });
  t.ok(b.type === 'inet' && b.host === '0.0.0.0', 'allowed when asked');
  await remote.close();
});

t.test('UNIX sockets: a stale socket is replaced, another file is not touched', async (t) => {
  const dir = shortDir(t);
  const path = join(dir, 's.sock');
  const a = new NbdServer();
  await a.listen({ type: 'unix', path });
  // A crashed server leaves its socket file behind; simulate by listening on a fresh server's path.
  const b = new NbdServer();
  await b.listen({ type: 'unix', path });
  await a.close();
  await b.close();
  writeFileSync(join(dir, 'file'), 'x');
  await t.rejects(new NbdServer().listen({ type: 'unix', path: join(dir, 'file') }), { code: 'ERR_INVALID_ARGUMENT' });
});

t.test('maxConnections: extra connections are closed at once', async (t) => {
  const disk = await makeDisk(1 * MiB, { dataChunks: [0] });
  const s = await serve(t, disk, { server: { maxConnections: 2 } });
  const a = await RawClient.connect(s.address);
  await a.go('disk');
  const b = await RawClient.connect(s.address);
  await b.greet();
  const c = await RawClient.connect(s.address);
  await c.closedByServer();
  a.sendReq(0, { length: 512 });
  t.ok(readData(await a.reply(), 0, 512).equals(disk.content.subarray(0, 512)), 'the first two still work');
  b.close();
  await until(() => s.server.connectionCount === 1, 'b to be gone');
  const d = await RawClient.connect(s.address);
  await d.go('disk');
  t.pass('a slot freed up');
  a.close();
  d.close();
});

t.test('export ids are well formed as QEMU requires; an empty export name is fine', async (t) => {
  // Found by the fuzz campaign: mutated ids ("f[o", "", "\fzo") were accepted; qemu-storage-daemon 7.2
  // answers block-export-add and nbd-server-add with "Invalid block export id".
  const disk = await makeDisk(1 * MiB, { dataChunks: [0] });
  const s = await serve(t, disk);
  for (const id of ['', 'f[o', "fz'", "'fzo", '\fzo', '1abc', '-x', '_x', 'a b', 'é', 'a/b']) {
    t.throws(() => s.server.addExport({ name: `n-${id}`, id, edge: attach(disk, `e-${id}`, false), writable: false }), { code: 'ERR_INVALID_ARGUMENT', message: 'Invalid block export id' }, JSON.stringify(id));
  }
  t.same(s.server.listExports().map((e) => e.name), ['disk'], 'none was added');
  s.server.addExport({ name: '', id: 'ok1', edge: attach(disk, 'ok1', false), writable: false });
  s.server.addExport({ name: 'dotted', id: 'a-b.c_D9', edge: attach(disk, 'dotted', false), writable: false });
  t.same(s.server.listExports().map((e) => e.name).sort(), ['', 'disk', 'dotted'], 'well-formed ids are added, the empty name included');
  const c = await RawClient.connect(s.address);
  await c.go('');
  t.pass('a client reaches the export with the empty name');
  c.close();
});

t.test('exports: duplicates refused; safe removal refused while in use; hard removal drops clients', async (t) => {
  const disk = await makeDisk(1 * MiB, { dataChunks: [0] });
  const s = await serve(t, disk);
  t.throws(() => s.server.addExport({ name: 'disk', edge: attach(disk, 'x', false), writable: false }), { code: 'ERR_NBD_EXPORT_EXISTS' });
  t.throws(() => s.server.addExport({ name: 'y', id: 'disk', edge: attach(disk, 'y', false), writable: false }), { code: 'ERR_NBD_EXPORT_EXISTS' }, 'ids are unique too');
  t.throws(() => s.server.addExport({ name: 'z', edge: attach(disk, 'z', false), writable: true }), { code: 'ERR_INVALID_ARGUMENT' }, 'writable needs a writing edge');
  t.throws(() => s.server.removeExport('nosuch'), { code: 'ERR_NBD_EXPORT_NOT_FOUND' });
  const c = await RawClient.connect(s.address);
  await c.go('disk');
  t.same(s.server.listExports().map((e) => [e.name, e.connections, e.shuttingDown]), [['disk', 1, false]]);
  t.throws(() => s.server.removeExport('disk', 'safe'), { code: 'ERR_NBD_EXPORT_IN_USE' });
  // A request in flight is answered... or dropped; either way the export is gone only after it finished.
  c.sendReq(0, { length: 512 });
  const gone = s.server.removeExport('disk', 'hard');
  t.same(s.server.listExports().map((e) => [e.name, e.shuttingDown]), [['disk', true]], 'listed as shutting down');
  const other = await RawClient.connect(s.address);
  await other.greet();
  t.equal((await other.opt(7, goData('disk', [])))[0]!.type, 0x80000006, 'new clients cannot reach it');
  t.same((await other.opt(3)).map((r) => r.type), [1], 'LIST no longer shows it');
  await deadline(gone, 'the export to be gone');
  await c.closedByServer();
  t.same(s.deleted.map((i) => i.name), ['disk'], 'onExportDeleted fired once');
  t.same(s.server.listExports(), []);
  // The name can be used again; the caller may detach the old edge now.
  s.disk.graph.detachUser(s.edge);
  s.server.addExport({ name: 'disk', edge: attach(disk, 'again', true), writable: true });
  await other.go('disk', { greet: false, structured: false });
  t.pass('re-added');
  other.close();
});

t.test('safe removal of an idle export; per-export onDeleted; clients mid-handshake are unaffected', async (t) => {
  const disk = await makeDisk(1 * MiB);
  const s = await serve(t, disk);
  const seen: string[] = [];
  s.server.addExport({ name: 'two', edge: attach(disk, 'two', false), writable: false, onDeleted: (i) => seen.push(i.name) });
  const c = await RawClient.connect(s.address);
  await c.greet();
  await s.server.removeExport('two');
  t.same(seen, ['two']);
  t.same((await c.opt(3)).length, 2, 'the handshake goes on (one export left)');
  c.close();
});

t.test('exported bitmaps are busy while exported; recording bitmaps are refused on read-only exports', async (t) => {
  const disk = await makeDisk(1 * MiB);
  const bm = disk.node.bitmaps.add({ name: 'b', disabled: true });
  const live = disk.node.bitmaps.add({ name: 'live' });
  const s = await serve(t, disk, { bitmaps: [bm], writable: false });
  t.ok(bm.busy, 'busy while exported');
  t.throws(() => disk.node.bitmaps.remove('b'), { code: 'ERR_BITMAP_BUSY' });
  t.throws(() => s.server.addExport({ name: 'again', edge: attach(disk, 'a', false), writable: false, bitmaps: [bm] }), { code: 'ERR_BITMAP_BUSY' });
  t.throws(() => s.server.addExport({ name: 'ro', edge: attach(disk, 'r', false), writable: false, bitmaps: [live] }), { code: 'ERR_INVALID_ARGUMENT', message: /still recording/ });
  t.notOk(live.busy, 'a refused export marks nothing busy');
  s.server.addExport({ name: 'rw', edge: attach(disk, 'w', true), writable: true, bitmaps: [live] });
  await s.server.removeExport('disk');
  t.notOk(bm.busy, 'free again once the export is gone');
  await s.server.close();
  t.notOk(live.busy, 'close removes every export');
  t.same(s.deleted.map((i) => i.name).sort(), ['disk', 'rw']);
});

t.test('close() ends handshakes, transmissions and requests in flight; nothing is left open', async (t) => {
  const before = openHandles();
  const disk = await makeDisk(4 * MiB, { dataChunks: [0, 1, 2] });
  const server = new NbdServer({ maxConnections: 50 });
  const address = await server.listen({ type: 'unix', path: join(shortDir(t), 'c.sock') });
  server.addExport({ name: 'disk', edge: attach(disk, 'nbd', true), writable: true });
  const idle = await RawClient.connect(address);
  const greeted = await RawClient.connect(address);
  await greeted.greet();
  const busy = await RawClient.connect(address);
  await busy.go('disk');
  for (let i = 0; i < 20; i++) busy.sendReq(0, { cookie: BigInt(i), length: 4 * MiB });
  const driver = await NbdClientDriver.connect({ address, exportName: 'disk' });
  const pending = driver.read(0, Buffer.alloc(4 * MiB)).catch((e: unknown) => e);
  await server.close();
  t.equal(server.connectionCount, 0);
  await Promise.all([idle.closedByServer(), greeted.closedByServer(), busy.closedByServer()]);
  const r = await pending;
  t.ok(r === undefined || (r as { code?: string }).code === 'ERR_NBD_DISCONNECTED', 'the driver read finished or failed cleanly');
  await driver.close();
  await until(() => openHandles() <= before, `handles back to ${before}`);
  t.pass('no socket, server or timer left');
  await server.close();
  t.pass('close is idempotent');
});

t.test('fuzz: random and mutated byte streams never crash the server or disturb other clients', async (t) => {
  const disk = await makeDisk(1 * MiB, { dataChunks: [0, 5] });
  const bm = disk.node.bitmaps.add({ name: 'b', disabled: true });
  const s = await serve(t, disk, { bitmaps: [bm], server: { handshakeTimeoutMs: 2000 } });
  const witness = await RawClient.connect(s.address);
  await witness.go('disk', { meta: ['base:allocation'] });
  // Valid openings to mutate: handshake + options + requests.
  const greetAndGo = Buffer.concat([
    Buffer.from([0, 0, 0, 3]),
    encodeOption(8),
    encodeOption(10, nameQueries('disk', ['base:allocation', 'qemu:dirty-bitmap:b'])),
    encodeOption(7, encodeExportRequest({ name: 'disk', infos: [3] })),
  ]);
  const requests = Buffer.concat([
    encodeRequest({ flags: 0, type: 0, cookie: 1n, offset: 0n, length: 4096 }),
    encodeRequest({ flags: 1, type: 1, cookie: 2n, offset: 4096n, length: 16 }, randomBytes(16)),
    encodeRequest({ flags: 8, type: 7, cookie: 3n, offset: 0n, length: 65536 }),
    encodeRequest({ flags: 0, type: 4, cookie: 4n, offset: 8192n, length: 4096 }),
    encodeRequest({ flags: 0, type: 3, cookie: 5n, offset: 0n, length: 0 }),
  ]);
  const stream = fc.oneof(
    fc.uint8Array({ maxLength: 300 }).map((b) => Buffer.from(b)),
    fc.tuple(fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 3 }), fc.boolean()).map(([edits, tail]) => {
      const b = Buffer.concat([greetAndGo, tail ? requests : Buffer.alloc(0)]);
      for (const [at, v] of edits) b[at % b.length] = v;
      return b;
    }),
  );
  let runs = 0;
  await fc.assert(
    fc.asyncProperty(stream, fc.boolean(), async (bytes, hangUp) => {
      runs++;
      const c = await RawClient.connect(s.address);
      await c.read(18);
      c.socket.write(bytes);
      // Either hang up right away, or let the server answer whatever it can and drop us.
      if (hangUp) c.close();
      else {
        await new Promise((r) => setImmediate(r));
        c.close();
      }
      await c.closedPromise;
      return true;
    }),
    { numRuns: 60 },
  );
  await until(() => s.server.connectionCount === 1, 'fuzz connections to close');
  witness.sendReq(0, { length: 4096, cookie: 99n });
  const r = await witness.reply();
  t.equal(replyError(r).error, 0);
  // Mutated WRITE and TRIM requests may have changed the disk: compare with what it holds now.
  const now = Buffer.alloc(4096);
  await disk.memory.read(0, now);
  t.ok(readData(r, 0, 4096).equals(now), `the witness connection still works after ${runs} hostile ones`);
  witness.close();
});
