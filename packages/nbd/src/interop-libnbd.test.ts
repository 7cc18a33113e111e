import t from 'tap';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ShearError } from '@shear/base';
import { BlockGraph, MemoryDriver, PERM_ALL, PERM_CONSISTENT_READ, PERM_WRITE, filterChildPerms, type BlockIO, type BlockStatusExtent, type WriteZeroesOptions } from '@shear/block';
import { requireLibnbdPython, requireTools } from '@shear/testkit';
import { nbdUri } from './address.js';
import { KiB, MiB, makeDisk, serve, shortDir } from './setup.fixture.js';
import { PYTHON, run, runOk } from './tools.fixture.js';

/**
 * libnbd's tools (nbdinfo, nbdcopy 1.14) and python3-libnbd scripts against our server. The
 * python scripts print JSON; every data result is compared byte for byte with the node.
 */

const SIZE = 16 * MiB;
const DATA = [0, 3, 4, 100, 255];

t.test('nbdinfo --list, --json, --map and --map=qemu:dirty-bitmap:NAME', async (t) => {
  if (!requireTools(t, 'nbdinfo')) return;
  const disk = await makeDisk(SIZE, { dataChunks: DATA });
  const bm = disk.node.bitmaps.add({ name: 'backup-vda', disabled: true, granularity: 64 * KiB });
  bm.bits.set(0, 64 * KiB);
  bm.bits.set(5 * MiB, 3 * MiB);
  bm.bits.set(SIZE - 1, 1);
  const s = await serve(t, disk, { writable: false, bitmaps: [bm], allocationDepth: true, description: 'Shear test disk' });
  const edge2 = s.disk.graph.attachUser({ kind: 'user', name: 'rw' }, disk.node, PERM_CONSISTENT_READ | PERM_WRITE, PERM_ALL);
  s.server.addExport({ name: 'rw', edge: edge2, writable: true });
  const uri = nbdUri(s.address, 'disk');

  const list = await runOk(t, 'nbdinfo', ['--list', '--json', nbdUri(s.address, '')]);
  if (list) {
    const exports = (JSON.parse(list) as { exports: { 'export-name': string; description?: string; contexts: string[]; 'export-size': number }[] }).exports;
    t.same(exports.map((e) => e['export-name']).sort(), ['disk', 'rw']);
    const d = exports.find((e) => e['export-name'] === 'disk')!;
    t.equal(d.description, 'Shear test disk');
    t.same(d.contexts, ['base:allocation', 'qemu:allocation-depth', 'qemu:dirty-bitmap:backup-vda']);
    t.equal(d['export-size'], SIZE);
  }
  const info = await runOk(t, 'nbdinfo', ['--json', uri]);
  if (info) {
    const e = (JSON.parse(info) as { exports: Record<string, unknown>[] }).exports[0]!;
    t.match(e, { 'export-size': SIZE, is_read_only: true, can_flush: true, can_fua: true, can_multi_conn: true, can_cache: true, can_df: true, can_trim: false, can_zero: false });
    t.same(e['block_size_minimum'], 1);
    t.same(e['block_size_preferred'], 4096);
    t.same(e['block_size_maximum'], 32 * MiB);
  }
  const rwInfo = await runOk(t, 'nbdinfo', ['--json', nbdUri(s.address, 'rw')]);
  if (rwInfo) t.match((JSON.parse(rwInfo) as { exports: Record<string, unknown>[] }).exports[0], { is_read_only: false, can_trim: true, can_zero: true, can_fast_zero: true });

  const map = await runOk(t, 'nbdinfo', ['--map', '--json', uri]);
  if (map) {
    const got = (JSON.parse(map) as { offset: number; length: number; type: number }[]).map((e) => [e.offset, e.length, e.type]);
    const want: number[][] = [];
    for (let c = 0; c < SIZE / (64 * KiB); c++) {
      const type = DATA.includes(c) ? 0 : 3;
      const last = want[want.length - 1];
      if (last && last[2] === type) last[1]! += 64 * KiB;
      else want.push([c * 64 * KiB, 64 * KiB, type]);
    }
    t.same(got, want, 'base:allocation map');
  }
  const dirty = await runOk(t, 'nbdinfo', ['--map=qemu:dirty-bitmap:backup-vda', '--json', uri]);
  if (dirty) {
    const got = (JSON.parse(dirty) as { offset: number; length: number; type: number }[]).map((e) => [e.offset, e.length, e.type]);
    t.same(got, [
      [0, 64 * KiB, 1],
      [64 * KiB, 5 * MiB - 64 * KiB, 0],
      [5 * MiB, 3 * MiB, 1],
      [8 * MiB, SIZE - 8 * MiB - 64 * KiB, 0],
      [SIZE - 64 * KiB, 64 * KiB, 1],
    ], 'dirty bitmap map equals the bitmap');
  }
  const depth = await runOk(t, 'nbdinfo', ['--map=qemu:allocation-depth', '--json', uri]);
  if (depth) t.same((JSON.parse(depth) as { type: number }[]).map((e) => e.type), [1], 'allocation depth: all local');
  const none = await run('nbdinfo', ['--map=qemu:dirty-bitmap:nosuch', uri]);
  t.equal(none.code, 1);
  t.match(none.stderr, /does not support metadata context/);
});

t.test('nbdcopy out of and into our server with its default connections and requests', async (t) => {
  if (!requireTools(t, 'nbdcopy')) return;
  const disk = await makeDisk(SIZE, { dataChunks: DATA });
  const s = await serve(t, disk, { writable: true });
  const dir = shortDir(t);
  const out = join(dir, 'out.raw');
  await runOk(t, 'nbdcopy', [nbdUri(s.address, 'disk'), out]);
  t.ok(readFileSync(out).equals(disk.content), 'nbdcopy read every byte');
  const src = Buffer.alloc(SIZE);
  for (let i = 0; i < 40; i++) randomBytes(100 * KiB).copy(src, (i * 397 * KiB) % (SIZE - 100 * KiB));
  writeFileSync(join(dir, 'src.raw'), src);
  await runOk(t, 'nbdcopy', ['--flush', join(dir, 'src.raw'), nbdUri(s.address, 'disk')]);
  const back = Buffer.alloc(SIZE);
  await disk.memory.read(0, back);
  t.ok(back.equals(src), 'nbdcopy wrote every byte (zeroes included)');
});

/** A node whose reads at `slowOffset` finish only after a read elsewhere, and that cannot zero fast. */
class GatedDriver implements BlockIO {
  readonly inner: MemoryDriver;
  #release: (() => void) | null = null;
  readonly #gate: Promise<void>;
  constructor(length: number, readonly slowOffset: number) {
    this.inner = new MemoryDriver({ length });
    this.#gate = new Promise((r) => (this.#release = r));
  }
  get length() { return this.inner.length; }
  async read(o: number, b: Uint8Array) {
    if (o === this.slowOffset) await this.#gate;
    await this.inner.read(o, b);
    if (o !== this.slowOffset) this.#release?.();
  }
  write(o: number, b: Uint8Array) { return this.inner.write(o, b); }
  async writeZeroes(o: number, n: number, opts?: WriteZeroesOptions) {
    if (opts?.fastOnly) throw new ShearError('ERR_NOT_IMPLEMENTED', 'Cannot write zeroes fast: this node has no cheap zeroing');
    return this.inner.writeZeroes(o, n, opts);
  }
  discard(o: number, n: number) { return this.inner.discard(o, n); }
  flush() { return this.inner.flush(); }
  blockStatus(o: number, n: number): Promise<BlockStatusExtent[]> { return this.inner.blockStatus(o, n); }
  close() { return this.inner.close(); }
}

const OUT_OF_ORDER_PY = `
import json, sys, nbd
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(sys.argv[1])
order = []
bufs = [nbd.Buffer(65536), nbd.Buffer(65536)]
def done(i):
    def cb(err):
        order.append(i)
        return 1
    return cb
h.aio_pread(bufs[0], 0, completion=done(0))
h.aio_pread(bufs[1], 65536, completion=done(1))
while len(order) < 2:
    h.poll(-1)
one = []
def ext(ctx, off, entries, err):
    one.append(list(entries))
    return 0
h.block_status(h.get_size(), 0, ext, nbd.CMD_FLAG_REQ_ONE)
res = {"order": order, "data0": bufs[0].to_bytearray().hex()[:64], "reqone": one}
try:
    h.zero(65536, 131072, flags=nbd.CMD_FLAG_FAST_ZERO)
    res["fastzero"] = "ok"
except nbd.Error as e:
    res["fastzero"] = e.errno
res["unchanged"] = h.pread(32, 131072).hex()
h.zero(65536, 131072)
res["after"] = h.pread(65536, 131072) == bytearray(65536)
h.shutdown()
print(json.dumps(res))
`;

t.test('python3-libnbd: out-of-order replies, REQ_ONE, FAST_ZERO refused with ENOTSUP', async (t) => {
  if (!requireLibnbdPython(t)) return;
  const graph = new BlockGraph();
  const driver = new GatedDriver(1 * MiB, 0);
  const content = randomBytes(1 * MiB);
  await driver.inner.write(0, content);
  await driver.inner.discard(512 * KiB, 512 * KiB);
  const node = await graph.addNode({ name: 'gated', info: { name: 'gated', childPerms: filterChildPerms }, open: async () => driver });
  const s = await serve(t, { graph, node, memory: driver.inner, content }, { writable: true });
  const dir = shortDir(t);
  const script = join(dir, 'ooo.py');
  writeFileSync(script, OUT_OF_ORDER_PY);
  const out = await runOk(t, PYTHON, [script, nbdUri(s.address, 'disk')]);
  if (!out) return;
  const res = JSON.parse(out) as { order: number[]; data0: string; reqone: number[][]; fastzero: string | number; unchanged: string; after: boolean };
  t.same(res.order, [1, 0], 'the second READ was answered first');
  t.equal(res.data0, content.subarray(0, 32).toString('hex'), 'and the delayed one still carries the right data');
  t.same(res.reqone, [[512 * KiB, 0]], 'REQ_ONE: exactly one extent');
  t.match(String(res.fastzero), /^(ENOTSUP|EOPNOTSUPP)$/, 'FAST_ZERO fails fast with ENOTSUP');
  t.equal(res.unchanged, content.subarray(131072, 131072 + 32).toString('hex'), 'without changing data');
  t.equal(res.after, true, 'a plain zero works');
  const back = Buffer.alloc(64 * KiB);
  await driver.inner.read(131072, back);
  t.ok(back.equals(Buffer.alloc(64 * KiB)));
});
