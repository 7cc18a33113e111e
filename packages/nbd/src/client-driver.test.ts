import t, { type Test } from 'tap';
import { randomBytes } from 'node:crypto';
import { closeSync, ftruncateSync, openSync } from 'node:fs';
import { join } from 'node:path';
import { isShearError } from '@shear/base';
import { BlockGraph, MemoryDriver, filterChildPerms, type BlockIO, type BlockStatusExtent } from '@shear/block';
import { haveTool, requireTools, runBlockIOConformance } from '@shear/testkit';
import { NbdClientDriver } from './client/driver.js';
import { KiB, MiB, makeDisk, openHandles, serve, shortDir, until } from './setup.fixture.js';
import { startDaemon } from './tools.fixture.js';

/**
 * The NBD client driver as a BlockIO: the block layer's conformance suite against our own
 * server, nbdkit (also with a 4 KiB minimum block, so unaligned I/O goes through
 * read-modify-write) and qemu-nbd; then pipelining, error mapping and lost connections.
 */

let serial = 0;

async function ownServer(t: Test, length: number): Promise<BlockIO> {
  const disk = await makeDisk(length, { name: `d${serial++}` });
  const s = await serve(t, disk, { writable: true });
  const io = await NbdClientDriver.connect({ address: s.address, exportName: 'disk' });
  t.teardown(() => io.close());
  return io;
}

/** nbdkit's memory plugin; `extra` holds --filter options and key=value parameters (which follow the plugin). */
async function nbdkit(t: Test, length: number, extra: string[] = []): Promise<NbdClientDriver> {
  const sock = join(shortDir(t), 'k.sock');
  const filters = extra.filter((a) => a.startsWith('--'));
  const params = extra.filter((a) => !a.startsWith('--'));
  await startDaemon(t, 'nbdkit', ['-f', '-U', sock, '-e', 'disk', ...filters, 'memory', `size=${length}`, ...params], sock);
  const io = await NbdClientDriver.connect({ address: { type: 'unix', path: sock }, exportName: 'disk' });
  t.teardown(() => io.close());
  return io;
}

async function qemuNbd(t: Test, length: number): Promise<NbdClientDriver> {
  const dir = shortDir(t);
  const img = join(dir, 'img.raw');
  const fd = openSync(img, 'w');
  ftruncateSync(fd, length);
  closeSync(fd);
  const sock = join(dir, 'q.sock');
  await startDaemon(t, 'qemu-nbd', ['-t', '-k', sock, '-x', 'disk', '-f', 'raw', '--discard=unmap', '--cache=writeback', '-e', '0', img], sock);
  const io = await NbdClientDriver.connect({ address: { type: 'unix', path: sock }, exportName: 'disk' });
  t.teardown(() => io.close());
  return io;
}

void runBlockIOConformance(t, 'nbd client on our server', { open: ownServer, persistsData: true, discardReadsZero: true });

if (haveTool('nbdkit')) {
  void runBlockIOConformance(t, 'nbd client on nbdkit memory', { open: (t, n) => nbdkit(t, n), persistsData: true, discardReadsZero: true });
  void runBlockIOConformance(t, 'nbd client on nbdkit with a 4 KiB minimum block', {
    open: (t, n) => nbdkit(t, n, ['--filter=blocksize-policy', 'blocksize-minimum=4096', 'blocksize-preferred=4096', 'blocksize-maximum=65536', 'blocksize-error-policy=error']),
    persistsData: true,
    // TRIM is rounded inward to whole blocks, so partly covered blocks keep their data.
    discardReadsZero: false,
    lengthAlignment: 4096,
  });
}
if (haveTool('qemu-nbd')) {
  void runBlockIOConformance(t, 'nbd client on qemu-nbd', { open: qemuNbd, persistsData: true, discardReadsZero: false, lengthAlignment: 512 });
}

t.test('what the driver learns from the handshake', async (t) => {
  if (!requireTools(t, 'nbdkit', 'qemu-nbd')) return;
  const k = await nbdkit(t, 4 * MiB, ['--filter=blocksize-policy', 'blocksize-minimum=4096', 'blocksize-error-policy=error']);
  t.equal(k.length, 4 * MiB);
  t.equal(k.blockSizes.minimum, 4096);
  t.ok(k.structured && k.hasBlockStatus && !k.readOnly);
  const q = await qemuNbd(t, 1 * MiB);
  t.equal(q.length, 1 * MiB);
  t.ok(q.hasBlockStatus);
  const disk = await makeDisk(1 * MiB);
  const s = await serve(t, disk, { writable: false });
  const own = await NbdClientDriver.connect({ address: s.address, exportName: 'disk' });
  t.ok(own.readOnly);
  t.equal(own.transmissionFlags, 0x058f);
  await t.rejects(own.write(0, new Uint8Array(1)), { code: 'ERR_READ_ONLY', context: { errno: 'EPERM' } });
  await own.close();
});

t.test('unknown export, refused connection, wrong protocol', async (t) => {
  const disk = await makeDisk(1 * MiB);
  const s = await serve(t, disk);
  await t.rejects(NbdClientDriver.connect({ address: s.address, exportName: 'nosuch' }), { code: 'ERR_NBD_EXPORT_NOT_FOUND', message: /export 'nosuch' not present/ });
  await t.rejects(NbdClientDriver.connect({ address: { type: 'unix', path: join(shortDir(t), 'none.sock') }, exportName: 'x' }), { code: 'ERR_IO' });
  // A server that never speaks: the connect deadline applies.
  const { createServer } = await import('node:net');
  const mute = createServer((c) => c.on('error', () => {}));
  const path = join(shortDir(t), 'mute.sock');
  await new Promise<void>((r) => mute.listen(path, r));
  t.teardown(() => new Promise<void>((r) => mute.close(() => r())));
  await t.rejects(NbdClientDriver.connect({ address: { type: 'unix', path }, exportName: 'x', connectTimeoutMs: 50 }), { code: 'ERR_TIMEOUT' });
  // A server that says something else.
  const http = createServer((c) => c.end('HTTP/1.1 400 Bad Request\r\n\r\n'));
  const hpath = join(shortDir(t), 'http.sock');
  await new Promise<void>((r) => http.listen(hpath, r));
  t.teardown(() => new Promise<void>((r) => http.close(() => r())));
  const err = await NbdClientDriver.connect({ address: { type: 'unix', path: hpath }, exportName: 'x' }).then(() => null, (e: unknown) => e);
  t.ok(isShearError(err) && /NBD_PROTOCOL|NBD_DISCONNECTED/.test(err.code), `a clean error (${String(err)})`);
});

/** Holds the first `n` reads until all `n` are waiting, so only a client that pipelines can finish. */
class BarrierDriver implements BlockIO {
  readonly inner: MemoryDriver;
  #waiting: (() => void)[] = [];
  #open = false;
  constructor(length: number, readonly n: number) {
    this.inner = new MemoryDriver({ length });
  }
  get length() { return this.inner.length; }
  async read(o: number, b: Uint8Array) {
    if (!this.#open && this.#waiting.length + 1 < this.n) {
      await new Promise<void>((r) => this.#waiting.push(r));
    } else {
      this.#open = true;
      for (const w of this.#waiting.splice(0)) w();
    }
    return this.inner.read(o, b);
  }
  write(o: number, b: Uint8Array) { return this.inner.write(o, b); }
  writeZeroes(o: number, n: number) { return this.inner.writeZeroes(o, n); }
  discard(o: number, n: number) { return this.inner.discard(o, n); }
  flush() { return this.inner.flush(); }
  blockStatus(o: number, n: number): Promise<BlockStatusExtent[]> { return this.inner.blockStatus(o, n); }
  close() { return this.inner.close(); }
}

t.test('many requests in flight on one connection, matched by cookie', async (t) => {
  const graph = new BlockGraph();
  const driver = new BarrierDriver(8 * MiB, 24);
  const content = randomBytes(8 * MiB);
  await driver.inner.write(0, content);
  const node = await graph.addNode({ name: 'barrier', info: { name: 'barrier', childPerms: filterChildPerms }, open: async () => driver });
  const s = await serve(t, { graph, node, memory: driver.inner, content }, { writable: true });
  const io = await NbdClientDriver.connect({ address: s.address, exportName: 'disk' });
  // 24 reads: the server answers none until all 24 are in, so they must all be in flight at once.
  const bufs = Array.from({ length: 24 }, () => Buffer.alloc(100 * KiB));
  await Promise.all(bufs.map((b, i) => io.read(i * 333 * KiB, b)));
  bufs.forEach((b, i) => {
    if (!b.equals(content.subarray(i * 333 * KiB, i * 333 * KiB + 100 * KiB))) t.fail(`read ${i}`);
  });
  // A read over the server's maximum payload is split and reassembled.
  const big = Buffer.alloc(8 * MiB - 3);
  await io.read(3, big);
  t.ok(big.equals(content.subarray(3)), 'large unaligned read');
  await io.close();
  await io.close();
  await t.rejects(io.read(0, Buffer.alloc(1)), { code: 'ERR_CLOSED' });
});

t.test('remote errors map to ShearError codes with the errno', async (t) => {
  if (!requireTools(t, 'nbdkit')) return;
  const eio = await nbdkit(t, 1 * MiB, ['--filter=error', 'error-pread=EIO', 'error-pread-rate=100%', 'error-pwrite=ENOSPC', 'error-pwrite-rate=100%', 'error-trim=EPERM', 'error-trim-rate=100%']);
  await t.rejects(eio.read(0, Buffer.alloc(4096)), { code: 'ERR_IO', context: { errno: 'EIO', op: 'read' } });
  await t.rejects(eio.write(0, Buffer.alloc(4096)), { code: 'ERR_NO_SPACE', context: { errno: 'ENOSPC' } });
  await t.rejects(eio.discard(0, 4096), { code: 'ERR_PERMISSION_DENIED', context: { errno: 'EPERM' } });
  await eio.flush();
  t.pass('the connection survives request errors');
});

t.test('FAST_ZERO: refused fast by a server that cannot, done by one that can', async (t) => {
  if (!requireTools(t, 'nbdkit')) return;
  const slow = await nbdkit(t, 1 * MiB, ['--filter=nozero', 'zeromode=notrim', 'fastzeromode=slow']);
  await t.rejects(slow.writeZeroes(0, 64 * KiB, { fastOnly: true }), { code: 'ERR_NOT_IMPLEMENTED' });
  await slow.write(0, Buffer.alloc(64 * KiB, 1));
  await slow.writeZeroes(0, 64 * KiB);
  const back = Buffer.alloc(64 * KiB, 9);
  await slow.read(0, back);
  t.ok(back.equals(Buffer.alloc(64 * KiB)));
  const disk = await makeDisk(1 * MiB, { dataChunks: [0] });
  const s = await serve(t, disk);
  const own = await NbdClientDriver.connect({ address: s.address, exportName: 'disk' });
  await own.writeZeroes(0, 64 * KiB, { fastOnly: true });
  await own.read(0, back.fill(9));
  t.ok(back.equals(Buffer.alloc(64 * KiB)), 'zeroed');
  await own.close();
});

t.test('a lost connection fails requests in flight and later ones with ERR_NBD_DISCONNECTED', async (t) => {
  const disk = await makeDisk(4 * MiB, { dataChunks: [0, 1] });
  const s = await serve(t, disk);
  const before = openHandles();
  const io = await NbdClientDriver.connect({ address: s.address, exportName: 'disk' });
  const pending = io.read(0, Buffer.alloc(4 * MiB));
  await s.server.removeExport('disk', 'hard');
  await t.rejects(pending, { code: 'ERR_NBD_DISCONNECTED' });
  await t.rejects(io.read(0, Buffer.alloc(1)), { code: 'ERR_NBD_DISCONNECTED' });
  await io.close();
  await until(() => openHandles() <= before, 'handles to be released');
  t.pass('no handle left');
});
