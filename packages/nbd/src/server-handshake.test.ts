import t, { type Test } from 'tap';
import { RawClient, goData, nameQueries, u32 } from './raw-client.fixture.js';
import { KiB, MiB, makeDisk, serve, until } from './setup.fixture.js';
import { encodeTruncated } from './protocol/strings.js';

/**
 * The handshake rows (H01–H25) of the checklist's robustness table, each against the answer it
 * lists, plus what the table leaves to us (default export, meta context rules, INFO = GO).
 */

const ACK = 1;
const SERVER = 2;
const INFO = 3;
const META = 4;
const ERR_UNSUP = 0x80000001;
const ERR_POLICY = 0x80000002;
const ERR_INVALID = 0x80000003;
const ERR_UNKNOWN = 0x80000006;

async function setup(t: Test) {
  const disk = await makeDisk(4 * MiB, { dataChunks: [0, 3] });
  const bm = disk.node.bitmaps.add({ name: 'bitmap0', disabled: true });
  const s = await serve(t, disk, { bitmaps: [bm], allocationDepth: true, description: 'the test disk' });
  return { ...s, client: async () => RawClient.connect(s.address) };
}

t.test('greeting: fixed newstyle with NO_ZEROES', async (t) => {
  const s = await setup(t);
  const c = await s.client();
  t.equal(await c.greet(), 3);
  c.close();
});

t.test('H01 unknown client flag bit: close', async (t) => {
  const s = await setup(t);
  const c = await s.client();
  await c.greet(0x7);
  await c.closedByServer();
  t.pass('closed');
});

t.test('H02 client flags 0 then LIST: close; H03 client flags 0 then EXPORT_NAME works', async (t) => {
  const s = await setup(t);
  const c = await s.client();
  await c.greet(0);
  c.sendOpt(3);
  await c.closedByServer();
  const d = await s.client();
  await d.greet(0);
  d.sendOpt(1, Buffer.from('disk'));
  const r = await d.read(10 + 124);
  t.equal(Number(r.readBigUInt64BE(0)), 4 * MiB);
  t.equal(r.readUInt16BE(8), 0x0d6d, 'flags as qemu-nbd rw without structured replies');
  t.ok(r.subarray(10).equals(Buffer.alloc(124)), '124 zero bytes');
  d.close();
});

t.test('H04 bad option magic: close', async (t) => {
  const s = await setup(t);
  const c = await s.client();
  await c.greet();
  c.sendOpt(3, undefined, { magic: 0x1122334455667788n });
  await c.closedByServer();
  t.pass();
});

t.test('H05 unknown option with payload: ERR_UNSUP, then LIST works', async (t) => {
  const s = await setup(t);
  const c = await s.client();
  await c.greet();
  const r = await c.opt(0x7654321, Buffer.from('abcd'));
  t.equal(r.length, 1);
  t.equal(r[0]!.type, ERR_UNSUP);
  t.equal(r[0]!.option, 0x7654321);
  t.ok(r[0]!.data.length > 0, 'with a message');
  const list = await c.opt(3);
  t.same(list.map((x) => x.type), [SERVER, ACK]);
  t.equal(list[0]!.data.subarray(4, 4 + list[0]!.data.readUInt32BE(0)).toString(), 'disk');
  t.equal(list[0]!.data.subarray(8).toString(), 'the test disk', 'description after the name');
  // Extended headers (libnbd >= 1.18, QEMU >= 8.2) must get an error, not a hang-up.
  t.equal((await c.opt(11))[0]!.type, ERR_UNSUP);
  // PEEK_EXPORT was withdrawn.
  t.equal((await c.opt(4))[0]!.type, ERR_UNSUP);
  c.close();
});

t.test('H06 option length over the cap: close', async (t) => {
  const s = await setup(t);
  const c = await s.client();
  await c.greet();
  c.sendOpt(3, undefined, { length: 0x7fffffff });
  await c.closedByServer();
  t.pass();
});

t.test('H07 LIST with payload: ERR_INVALID; H08 STARTTLS: ERR_POLICY and continue', async (t) => {
  const s = await setup(t);
  const c = await s.client();
  await c.greet();
  t.equal((await c.opt(3, Buffer.from('xx')))[0]!.type, ERR_INVALID);
  const tls = await c.opt(5);
  t.equal(tls[0]!.type, ERR_POLICY);
  t.equal(tls[0]!.data.toString(), 'TLS not configured');
  t.equal((await c.opt(5, Buffer.from('x')))[0]!.type, ERR_INVALID, 'STARTTLS with data');
  t.same((await c.opt(3)).map((x) => x.type), [SERVER, ACK]);
  c.close();
});

t.test('H09 GO unknown export: ERR_UNKNOWN with message, retry works; default export explained', async (t) => {
  const s = await setup(t);
  const c = await s.client();
  await c.greet();
  const r = await c.opt(7, goData('nosuchx', []));
  t.equal(r[0]!.type, ERR_UNKNOWN);
  t.equal(r[0]!.data.toString(), "export 'nosuchx' not present");
  const d = await c.opt(7, goData('', []));
  t.equal(d[0]!.type, ERR_UNKNOWN);
  t.match(d[0]!.data.toString(), /no default export.*'disk'/);
  await c.go('disk', { greet: false, structured: false, infos: [] });
  t.equal(c.size, 4 * MiB);
  c.close();
});

t.test('H10 INFO name length past the option: ERR_INVALID; H22 5000-byte name: ERR_INVALID', async (t) => {
  const s = await setup(t);
  const c = await s.client();
  await c.greet();
  t.equal((await c.opt(6, Buffer.concat([u32(100), Buffer.from('disk')])))[0]!.type, ERR_INVALID);
  t.equal((await c.opt(7, goData('a'.repeat(5000), [])))[0]!.type, ERR_INVALID);
  // Info count that disagrees with the bytes sent.
  const bad = goData('disk', [3]);
  t.equal((await c.opt(6, bad.subarray(0, bad.length - 1)))[0]!.type, ERR_INVALID);
  t.equal((await c.opt(6, Buffer.alloc(3)))[0]!.type, ERR_INVALID, 'too short for a name length');
  t.equal((await c.opt(6, Buffer.concat([u32(2), Buffer.from([0xc3, 0x28]), Buffer.alloc(2)])))[0]!.type, ERR_INVALID, 'invalid UTF-8');
  t.same((await c.opt(3)).map((x) => x.type), [SERVER, ACK], 'still negotiating');
  c.close();
});

t.test('H11 SET_META_CONTEXT before STRUCTURED_REPLY: ERR_INVALID; H12 unknown export: ERR_UNKNOWN', async (t) => {
  const s = await setup(t);
  const c = await s.client();
  await c.greet();
  t.equal((await c.opt(10, nameQueries('disk', ['base:allocation'])))[0]!.type, ERR_INVALID);
  t.equal((await c.opt(9, nameQueries('disk', [])))[0]!.type, ERR_INVALID, 'LIST_META_CONTEXT too');
  await c.opt(8);
  t.equal((await c.opt(10, nameQueries('nosuchx', ['base:allocation'])))[0]!.type, ERR_UNKNOWN);
  t.equal((await c.opt(9, nameQueries('nosuchx', [])))[0]!.type, ERR_UNKNOWN);
  t.equal((await c.opt(10, Buffer.concat([nameQueries('disk', ['base:allocation']), Buffer.from('x')])))[0]!.type, ERR_INVALID, 'trailing bytes');
  t.equal((await c.opt(10, Buffer.concat([u32(4), Buffer.from('disk'), u32(1000)])))[0]!.type, ERR_INVALID, 'more queries than bytes');
  c.close();
});

t.test('H13 STRUCTURED_REPLY twice: ACK then ERR_INVALID; H14 with payload: ERR_INVALID', async (t) => {
  const s = await setup(t);
  const c = await s.client();
  await c.greet();
  t.equal((await c.opt(8, Buffer.from('zz')))[0]!.type, ERR_INVALID);
  t.equal((await c.opt(8))[0]!.type, ACK);
  t.equal((await c.opt(8))[0]!.type, ERR_INVALID);
  c.close();
});

t.test('H15 ABORT: ACK, then the server closes', async (t) => {
  const s = await setup(t);
  const c = await s.client();
  await c.greet();
  t.equal((await c.opt(2))[0]!.type, ACK);
  await c.closedByServer();
});

t.test('H16 EXPORT_NAME unknown: close; H17 without NO_ZEROES: 124 zeroes', async (t) => {
  const s = await setup(t);
  const c = await s.client();
  await c.greet();
  c.sendOpt(1, Buffer.from('nosuchx'));
  await c.closedByServer();
  const d = await s.client();
  await d.greet(1);
  d.sendOpt(1, Buffer.from('disk'));
  const r = await d.read(134);
  t.equal(Number(r.readBigUInt64BE(0)), 4 * MiB);
  t.ok(r.subarray(10).equals(Buffer.alloc(124)));
  // With NO_ZEROES the transmission phase starts right after the flags: a READ proves it.
  const e = await s.client();
  await e.greet(3);
  e.sendOpt(1, Buffer.from('disk'));
  await e.read(10);
  e.sendReq(0, { length: 512, cookie: 9n });
  const rep = await e.reply(512);
  t.equal(rep.kind, 'simple');
  t.ok(rep.kind === 'simple' && rep.data?.equals(s.disk.content.subarray(0, 512)));
  d.close();
  e.close();
});

t.test('H18 LIST_META_CONTEXT queries as QEMU answers them', async (t) => {
  const s = await setup(t);
  const c = await s.client();
  await c.greet();
  await c.opt(8);
  const names = async (q: string[]) => {
    const r = await c.opt(9, nameQueries('disk', q));
    t.equal(r[r.length - 1]!.type, ACK);
    for (const x of r.slice(0, -1)) {
      t.equal(x.type, META);
      t.equal(x.data.readUInt32BE(0), 0, 'LIST ids are 0');
    }
    return r.slice(0, -1).map((x) => x.data.subarray(4).toString());
  };
  t.same(await names(['base:']), ['base:allocation']);
  t.same(await names(['qemu:']), ['qemu:allocation-depth', 'qemu:dirty-bitmap:bitmap0']);
  t.same(await names(['qemu:dirty-bitmap:']), ['qemu:dirty-bitmap:bitmap0']);
  t.same(await names(['x-foo:bar']), []);
  t.same(await names(['base:nosuch']), []);
  t.same(await names(['nocolon']), []);
  t.same(await names([]), ['base:allocation', 'qemu:allocation-depth', 'qemu:dirty-bitmap:bitmap0']);
  t.same(await names(['qemu:dirty-bitmap:bitmap0', 'base:allocation', 'base:allocation']), ['base:allocation', 'qemu:dirty-bitmap:bitmap0'], 'deduplicated');
  c.close();
});

t.test('H19 SET_META_CONTEXT with wildcards selects nothing; exact names get unique ids', async (t) => {
  const s = await setup(t);
  const c = await s.client();
  await c.greet();
  await c.opt(8);
  t.same((await c.opt(10, nameQueries('disk', ['base:', 'qemu:', 'qemu:dirty-bitmap:']))).map((x) => x.type), [ACK]);
  const r = await c.opt(10, nameQueries('disk', ['qemu:dirty-bitmap:bitmap0', 'base:allocation', 'qemu:allocation-depth', 'nope:x']));
  t.same(r.map((x) => x.type), [META, META, META, ACK]);
  const ids = r.slice(0, 3).map((x) => x.data.readUInt32BE(0));
  t.equal(new Set(ids).size, 3, 'unique ids');
  c.close();
});

t.test('H20 client closes mid-option: the server survives', async (t) => {
  const s = await setup(t);
  const c = await s.client();
  await c.greet();
  c.socket.write(Buffer.concat([Buffer.from('IHAVEOPT'), u32(7), u32(100), Buffer.alloc(2)]));
  c.close();
  await c.closedPromise;
  const d = await s.client();
  await d.greet();
  t.same((await d.opt(3)).map((x) => x.type), [SERVER, ACK]);
  d.close();
});

t.test('H21 GO with an unknown info type and duplicates: ignored; NAME and DESCRIPTION when asked', async (t) => {
  const s = await setup(t);
  const c = await s.client();
  await c.greet();
  const r = await c.opt(7, goData('disk', [0x7fff, 3, 3, 1, 2]));
  const infos = r.filter((x) => x.type === INFO).map((x) => x.data.readUInt16BE(0));
  t.same(infos, [1, 2, 3, 0], 'NAME, DESCRIPTION, BLOCK_SIZE, EXPORT');
  t.equal(r[r.length - 1]!.type, ACK);
  const bs = r.find((x) => x.type === INFO && x.data.readUInt16BE(0) === 3)!.data;
  t.same([bs.readUInt32BE(2), bs.readUInt32BE(6), bs.readUInt32BE(10)], [1, 4096, 32 * MiB]);
  t.equal(r[0]!.data.subarray(2).toString(), 'disk');
  t.equal(r[1]!.data.subarray(2).toString(), 'the test disk');
  c.close();
});

t.test('H23 INFO then GO agree on size and flags (with and without structured replies)', async (t) => {
  const s = await setup(t);
  for (const sr of [false, true]) {
    const c = await s.client();
    await c.greet();
    if (sr) await c.opt(8);
    const body = goData('disk', [3]);
    const exportInfo = (r: { type: number; data: Buffer }[]) => r.find((x) => x.type === INFO && x.data.readUInt16BE(0) === 0)!.data;
    const info = exportInfo(await c.opt(6, body));
    const go = exportInfo(await c.opt(7, body));
    t.ok(info.equals(go), `identical export info (structured ${sr})`);
    t.equal(go.readUInt16BE(10), sr ? 0x0ded : 0x0d6d, 'qemu-nbd rw flags');
    c.close();
  }
});

t.test('H25 bytes after GO are read as requests: an option header there is a bad request, close', async (t) => {
  const s = await setup(t);
  const c = await s.client();
  await c.go('disk');
  c.sendOpt(3, Buffer.alloc(12));
  await c.closedByServer();
  t.pass();
});

t.test('meta context selection applies only to the export named in GO', async (t) => {
  const disk = await makeDisk(1 * MiB, { dataChunks: [0] });
  const s = await serve(t, disk);
  const edge2 = s.disk.graph.attachUser({ kind: 'user', name: 'other' }, s.disk.node, 1, 15);
  s.server.addExport({ name: 'other', edge: edge2, writable: false });
  const c = await RawClient.connect(s.address);
  await c.greet();
  await c.opt(8);
  t.equal((await c.opt(10, nameQueries('other', ['base:allocation'])))[0]!.type, META);
  await c.go('disk', { greet: false, structured: false });
  c.sendReq(7, { length: 4096 });
  const r = await c.reply();
  t.equal(r.kind, 'chunks');
  t.ok(r.kind === 'chunks' && r.chunks[0]!.type === 0x8001, 'EINVAL: no context for this export');
  c.close();
});

t.test('a SET_META_CONTEXT that fails clears the earlier selection', async (t) => {
  const disk = await makeDisk(1 * MiB, { dataChunks: [0] });
  const s = await serve(t, disk);
  const c = await RawClient.connect(s.address);
  await c.greet();
  await c.opt(8);
  await c.opt(10, nameQueries('disk', ['base:allocation']));
  t.equal((await c.opt(10, nameQueries('nosuch', ['base:allocation'])))[0]!.type, ERR_UNKNOWN);
  await c.go('disk', { greet: false, structured: false });
  c.sendReq(7, { length: 4096 });
  const r = await c.reply();
  t.ok(r.kind === 'chunks' && r.chunks[0]!.type === 0x8001, 'block status refused');
  c.close();
});

t.test('a client that never finishes the handshake is dropped after the timeout', async (t) => {
  const disk = await makeDisk(64 * KiB);
  const s = await serve(t, disk, { server: { handshakeTimeoutMs: 50 } });
  const c = await RawClient.connect(s.address);
  await c.greet();
  await c.closedByServer();
  await until(() => s.server.connectionCount === 0, 'the server to forget the connection');
  t.equal(s.server.connectionCount, 0);
});

t.test('error messages are cut to a safe length on a character boundary', async (t) => {
  const cut = encodeTruncated('é'.repeat(200), 255);
  t.equal(cut.length, 254);
  t.equal(cut.toString(), 'é'.repeat(127));
});
