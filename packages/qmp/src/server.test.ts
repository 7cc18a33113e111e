import t, { type Test } from 'tap';
import { mkdtempSync, rmSync, statSync, writeFileSync, readFileSync, existsSync, linkSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ShearError, isShearError } from '@shear/base';
import { QmpServer, type QmpServerOptions } from './server.js';
import { withQmpClass } from './errors.js';
import { RawConn, deferred, recordingLogger, until } from './raw-conn.fixture.js';

/** A short private directory (t.testdir() paths can exceed the 107 bytes of a socket path). */
function sockDir(t: Test): string {
  const dir = mkdtempSync(join(tmpdir(), 'qmp-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

async function startServer(t: Test, opts: Partial<QmpServerOptions> = {}): Promise<QmpServer> {
  const server = new QmpServer({ path: join(sockDir(t), 'qmp.sock'), ...opts });
  await server.listen();
  t.teardown(() => server.close());
  return server;
}

/** Connects, reads the greeting, and negotiates unless told not to. */
async function connect(t: Test, server: QmpServer, negotiate = true): Promise<RawConn> {
  const c = await RawConn.connect(server.path as string);
  t.teardown(() => c.close());
  await c.nextLine();
  if (negotiate) {
    c.send('{"execute":"qmp_capabilities"}');
    t.equal(await c.nextLine(), '{"return": {}}');
  }
  return c;
}

t.test('greeting has QEMU 7.2 shape, no capabilities, CRLF framing', async (t) => {
  const server = await startServer(t);
  const c = await RawConn.connect(server.path as string);
  t.teardown(() => c.close());
  t.equal(
    await c.nextLine(),
    '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "Shear 0.1.0"}, "capabilities": []}}',
  );
  const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string };
  t.equal(pkg.version, '0.1.0', 'greeting carries the package version');
});

t.test('protocol errors: exact classes and descs as qemu-storage-daemon 7.2', async (t) => {
  const server = await startServer(t);
  const c = await connect(t, server, false);
  const rows: Array<[string, string]> = [
    ['{"execute":"query-version"}', '{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with \'qmp_capabilities\'"}}'],
    ['{"execute":"nope","id":1}', '{"id": 1, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with \'qmp_capabilities\'"}}'],
    ['{"execute":"query-version","arguments":[],"id":2}', '{"id": 2, "error": {"class": "GenericError", "desc": "QMP input member \'arguments\' must be an object"}}'],
    ['{"exec-oob":"qmp_capabilities","id":0}', '{"id": 0, "error": {"class": "GenericError", "desc": "QMP input member \'exec-oob\' is unexpected"}}'],
    ['{"execute":"qmp_capabilities","arguments":{"enable":["foo"]},"id":3}', '{"id": 3, "error": {"class": "GenericError", "desc": "Parameter \'enable[0]\' does not accept value \'foo\'"}}'],
    ['{"execute":"qmp_capabilities","arguments":{"enable":"oob"},"id":4}', '{"id": 4, "error": {"class": "GenericError", "desc": "Invalid parameter type for \'enable\', expected: array"}}'],
    ['{"execute":"qmp_capabilities","arguments":{"enable":[1]},"id":5}', '{"id": 5, "error": {"class": "GenericError", "desc": "Invalid parameter type for \'enable[0]\', expected: string"}}'],
    ['{"execute":"qmp_capabilities","arguments":{"x":1},"id":6}', '{"id": 6, "error": {"class": "GenericError", "desc": "Parameter \'x\' is unexpected"}}'],
    // Shear offers no capability (QEMU offers oob); QEMU's message for one it does not offer:
    ['{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":7}', '{"id": 7, "error": {"class": "GenericError", "desc": "Capability oob not available"}}'],
    ['{"execute":"qmp_capabilities","arguments":{"enable":[]},"id":8}', '{"return": {}, "id": 8}'],
    ['{"execute":"qmp_capabilities","id":9}', '{"id": 9, "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}'],
    ['{"execute":"qmp_capabilities","arguments":{"x":1},"id":10}', '{"id": 10, "error": {"class": "GenericError", "desc": "Parameter \'x\' is unexpected"}}'],
    ['{ "execute": }', '{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}'],
    ['[1,2]', '{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}'],
    ['"str" ', '{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}'],
    ['null\n', '{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}'],
    ['{}', '{"error": {"class": "GenericError", "desc": "QMP input lacks member \'execute\'"}}'],
    ['{"id":5}', '{"id": 5, "error": {"class": "GenericError", "desc": "QMP input lacks member \'execute\'"}}'],
    ['{"execute":1,"id":6}', '{"id": 6, "error": {"class": "GenericError", "desc": "QMP input member \'execute\' must be a string"}}'],
    ['{"execute":"query-version","foo":1,"id":7}', '{"id": 7, "error": {"class": "GenericError", "desc": "QMP input member \'foo\' is unexpected"}}'],
    ['{"execute":"query-version","control":{},"id":"c"}', '{"id": "c", "error": {"class": "GenericError", "desc": "QMP input member \'control\' is unexpected"}}'],
    ['{"foo":1,"id":5}', '{"id": 5, "error": {"class": "GenericError", "desc": "QMP input member \'foo\' is unexpected"}}'],
    ['{"arguments":[],"id":13}', '{"id": 13, "error": {"class": "GenericError", "desc": "QMP input member \'arguments\' must be an object"}}'],
    ['{"execute":"query-version","arguments":[],"id":8}', '{"id": 8, "error": {"class": "GenericError", "desc": "QMP input member \'arguments\' must be an object"}}'],
    ['{"execute":"query-version","arguments":null,"id":11}', '{"id": 11, "error": {"class": "GenericError", "desc": "QMP input member \'arguments\' must be an object"}}'],
    ['{"execute":"query-version","arguments":{"x":1},"id":9}', '{"id": 9, "error": {"class": "GenericError", "desc": "Parameter \'x\' is unexpected"}}'],
    ['{"execute":"nope","id":10}', '{"id": 10, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}'],
    ['{"execute":"nope","arguments":[],"id":10}', '{"id": 10, "error": {"class": "GenericError", "desc": "QMP input member \'arguments\' must be an object"}}'],
    ['{"execute":"query-version","id":1,"id":2}', '{"error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}}'],
    ['{"execute":"query-version","arguments":{},"id":12}', '{"return": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "Shear 0.1.0"}, "id": 12}'],
  ];
  for (const [input, reply] of rows) {
    c.send(input);
    t.equal(await c.nextLine(), reply, input);
  }
});

t.test('the parser recovers: a lexical error resynchronises, later commands run', async (t) => {
  const server = await startServer(t);
  const c = await connect(t, server);
  // An unfinished object, then a control character (the QMP spec's way to reset the parser).
  c.send('{"execute":"query-version","id":1');
  c.send('\u0004');
  c.send('{"execute":"query-commands","id":2}');
  t.same(await c.next(), { error: { class: 'GenericError', desc: "JSON parse error, stray '\u0004'" } });
  const reply = await c.next();
  t.equal(reply['id'], 2);
  t.same(
    (reply['return'] as Array<{ name: string }>).map((x) => x.name),
    ['qmp_capabilities', 'query-version', 'query-commands', 'quit'],
  );
});

t.test('ids are echoed as given, of every JSON type', async (t) => {
  const server = await startServer(t);
  const c = await connect(t, server);
  const ids = ['"s"', '{"a": [1, 2.5, null, true]}', '[1, "x"]', 'null', '-1500', 'false', '12345678901234567890', '"\\u00E9\\u2603"', '{}', '[]', '0'];
  for (const id of ids) {
    c.send(`{"execute":"query-commands","id":${id}}`);
    const line = await c.nextLine();
    t.ok(line.endsWith(`, "id": ${id}}`), `id ${id} echoed in ${line.slice(-60)}`);
  }
  c.send('{"execute":"query-version","id":-1.5e3}');
  t.match(await c.nextLine(), /, "id": -1500\}$/, 'numbers are re-written the way QEMU does (-1.5e3 -> -1500)');
});

t.test('pipelined commands are answered in order even when earlier ones are slower', async (t) => {
  const server = await startServer(t);
  const started: number[] = [];
  server.registry.register('sleep', async (args) => {
    const n = args['n'] as number;
    started.push(n);
    // Later commands finish faster, so any reordering would show.
    for (let i = 0; i < 20 - n; i++) await new Promise((r) => setImmediate(r));
    return { n };
  });
  const c = await connect(t, server);
  const count = 20;
  c.send(Array.from({ length: count }, (_, n) => `{"execute":"sleep","arguments":{"n":${n}},"id":${n}}`).join(''));
  const replies = [];
  for (let n = 0; n < count; n++) replies.push(await c.next());
  t.same(replies.map((r) => r['id']), Array.from({ length: count }, (_, n) => n));
  t.same(replies.map((r) => (r['return'] as { n: number }).n), Array.from({ length: count }, (_, n) => n));
  t.same(started, Array.from({ length: count }, (_, n) => n), 'one command at a time, in order');
});

t.test('an object split byte by byte is reassembled', async (t) => {
  const server = await startServer(t);
  const c = await connect(t, server);
  const msg = '{"execute":"query-version","id":"split-\u00c3\u00a9"}';
  for (const ch of msg) {
    c.send(ch);
    await new Promise((r) => setImmediate(r));
  }
  t.match(await c.nextLine(), /"id": "split-\\u00E9"\}$/);
});

t.test('events reach negotiated sessions only, with sane timestamps', async (t) => {
  const server = await startServer(t);
  const negotiated = await connect(t, server);
  const fresh = await connect(t, server, false);
  const before = Date.now();
  t.equal(server.emit('JOB_STATUS_CHANGE', { status: 'created', id: 'j' }), 1, 'sent to one session');
  t.equal(server.emit('SHUTDOWN'), 1);
  const ev = await negotiated.next();
  const after = Date.now();
  t.same(Object.keys(ev), ['timestamp', 'event', 'data'], 'member order as QEMU writes it');
  t.equal(ev['event'], 'JOB_STATUS_CHANGE');
  t.same(ev['data'], { status: 'created', id: 'j' });
  const ts = ev['timestamp'] as { seconds: number; microseconds: number };
  t.ok(Number.isInteger(ts.seconds) && Number.isInteger(ts.microseconds));
  t.ok(ts.microseconds >= 0 && ts.microseconds < 1_000_000);
  const ms = ts.seconds * 1000 + ts.microseconds / 1000;
  t.ok(ms >= before - 1 && ms <= after + 1, 'timestamp is the time of emission');
  const ev2 = await negotiated.next();
  t.same(Object.keys(ev2), ['timestamp', 'event'], 'an event without data has no data member');
  const ts2 = ev2['timestamp'] as { seconds: number; microseconds: number };
  t.ok(ts2.seconds * 1e6 + ts2.microseconds >= ts.seconds * 1e6 + ts.microseconds, 'timestamps do not go back');

  // Had the event reached the un-negotiated session, it would come before this reply.
  fresh.send('{"execute":"qmp_capabilities","id":"neg"}');
  t.equal(await fresh.nextLine(), '{"return": {}, "id": "neg"}', 'no event before negotiation, none queued for later');
  t.throws(() => server.emit(''), { code: 'ERR_INVALID_ARGUMENT' });
});

t.test('the socket is created 0600; a regular file or a live socket at the path is refused', async (t) => {
  const dir = sockDir(t);
  const path = join(dir, 'qmp.sock');
  const server = new QmpServer({ path });
  await server.listen();
  t.equal(statSync(path).mode & 0o777, 0o600);
  t.ok(statSync(path).isSocket());
  t.equal(server.path, path);

  const second = new QmpServer({ path });
  await t.rejects(second.listen(), { code: 'ERR_QMP_SOCKET_IN_USE' }, 'a live server is not displaced');
  await server.close();
  t.notOk(existsSync(path), 'socket file removed on close');

  const file = join(dir, 'plain');
  writeFileSync(file, 'keep me');
  await t.rejects(new QmpServer({ path: file }).listen(), { code: 'ERR_QMP_SOCKET_IN_USE' });
  t.equal(readFileSync(file, 'utf8'), 'keep me', 'the file is untouched');
});

t.test('a stale socket (nobody listening) is replaced', async (t) => {
  const dir = sockDir(t);
  const path = join(dir, 'qmp.sock');
  // A second name for a socket outlives its server, as after a crash.
  const other = net.createServer();
  await new Promise<void>((r) => other.listen(join(dir, 'orig.sock'), r));
  linkSync(join(dir, 'orig.sock'), path);
  await new Promise<void>((r) => other.close(() => r()));
  t.ok(statSync(path).isSocket());
  const server = await startServer(t, { path });
  const c = await connect(t, server);
  c.send('{"execute":"query-version","id":1}');
  t.match(await c.nextLine(), /"id": 1\}$/);
});

t.test('several clients at once: a slow command in one session does not hold up another', async (t) => {
  const server = await startServer(t);
  const gate = deferred();
  const entered = deferred();
  server.registry.register('wait-gate', async () => {
    entered.resolve();
    await gate.promise;
    return { waited: true };
  });
  const a = await connect(t, server);
  const b = await connect(t, server);
  const c = await connect(t, server);
  a.send('{"execute":"wait-gate","id":"a"}');
  await entered.promise;
  b.send('{"execute":"query-version","id":"b"}');
  c.send('{"execute":"query-commands","id":"c"}');
  t.match(await b.nextLine(), /"id": "b"\}$/);
  t.match(await c.nextLine(), /"id": "c"\}$/);
  t.equal(a.lines.length, 0, 'a is still waiting');
  gate.resolve();
  t.equal(await a.nextLine(), '{"return": {"waited": true}, "id": "a"}');
  t.equal(server.sessionCount, 3);
});

t.test('a client disconnecting mid-command: the command sees its signal fire, the server goes on', async (t) => {
  const server = await startServer(t);
  const entered = deferred();
  const release = deferred();
  let abortReason: unknown;
  server.registry.register('hang', async (_args, ctx) => {
    entered.resolve();
    await new Promise<void>((r) => ctx.signal.addEventListener('abort', () => r(), { once: true }));
    abortReason = ctx.signal.reason;
    await release.promise;
    return {};
  });
  const a = await connect(t, server);
  a.send('{"execute":"hang","id":1}');
  await entered.promise;
  a.socket.destroy();
  await until(() => abortReason !== undefined);
  t.ok(isShearError(abortReason, 'ERR_QMP_DISCONNECTED'));
  t.equal(server.sessionCount, 1, 'the session lives until its command settles');
  release.resolve();
  await until(() => server.sessionCount === 0);
  const b = await connect(t, server);
  b.send('{"execute":"query-version","id":2}');
  t.match(await b.nextLine(), /"id": 2\}$/);
});

t.test('oversized input: error, that connection closes, others keep working', async (t) => {
  const server = await startServer(t, { limits: { maxMessageBytes: 4096 } });
  const big = await connect(t, server);
  const other = await connect(t, server);
  big.send(`{"execute":"query-version","id":1}{"execute":"x","arguments":{"s":"${'a'.repeat(10_000)}"}}`);
  t.match(await big.nextLine(), /"id": 1\}$/, 'what came before the oversized message is answered');
  t.equal(await big.nextLine(), '{"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}');
  await big.closed;
  t.ok(big.isClosed);
  other.send('{"execute":"query-version","id":2}');
  t.match(await other.nextLine(), /"id": 2\}$/);
});

t.test('handler errors map to QMP classes; unexpected ones are logged and hidden', async (t) => {
  const log = recordingLogger();
  const server = await startServer(t, { log });
  server.registry.register('missing-node', () => {
    throw new ShearError('ERR_BLOCK_NODE_NOT_FOUND', "Cannot find node 'x'", { node: 'x' });
  });
  server.registry.register('missing-block-job', () => {
    throw new ShearError('ERR_JOB_NOT_FOUND', "Block job 'j' not found", { job: 'j' });
  }, { notFoundClass: 'DeviceNotActive' });
  server.registry.register('explicit', () => {
    throw withQmpClass(new ShearError('ERR_INVALID_ARGUMENT', 'Device is missing'), 'DeviceNotFound');
  });
  server.registry.register('bug', () => {
    throw new TypeError('x is not a function');
  });
  server.registry.register('bad-result', () => ({ f: 1n, self: undefined, cyc: (() => { const o: Record<string, unknown> = {}; o['o'] = o; return o; })() }));
  server.registry.register('sync-value', () => [1, 'two']);
  server.registry.register('async-void', async () => undefined);
  const c = await connect(t, server);
  const ask = async (cmd: string): Promise<string> => {
    c.send(`{"execute":"${cmd}","id":"${cmd}"}`);
    return c.nextLine();
  };
  t.equal(await ask('missing-node'), `{"id": "missing-node", "error": {"class": "GenericError", "desc": "Cannot find node 'x'"}}`);
  t.equal(await ask('missing-block-job'), `{"id": "missing-block-job", "error": {"class": "DeviceNotActive", "desc": "Block job 'j' not found"}}`);
  t.equal(await ask('explicit'), `{"id": "explicit", "error": {"class": "DeviceNotFound", "desc": "Device is missing"}}`);
  t.equal(await ask('bug'), `{"id": "bug", "error": {"class": "GenericError", "desc": "Cannot run command 'bug': internal error (details are in the daemon log)"}}`);
  t.equal(await ask('bad-result'), `{"id": "bad-result", "error": {"class": "GenericError", "desc": "Cannot run command 'bad-result': internal error (details are in the daemon log)"}}`);
  t.equal(await ask('sync-value'), '{"return": [1, "two"], "id": "sync-value"}');
  t.equal(await ask('async-void'), '{"return": {}, "id": "async-void"}');
  const errors = log.records.filter((r) => r.level === 'error');
  t.equal(errors.length, 2, 'the bug and the unwritable result were logged');
  t.match(errors[0]?.obj, { component: 'qmp', command: 'bug', qmpId: 'bug', err: TypeError });
  t.throws(() => server.registry.register('bug', () => 1), { code: 'ERR_QMP_COMMAND_EXISTS' });
  t.throws(() => server.registry.register('bad name', () => 1), { code: 'ERR_INVALID_ARGUMENT' });
});

t.test('quit replies first, then runs the hook', async (t) => {
  const quitCalled = deferred();
  const server = await startServer(t, { onQuit: () => quitCalled.resolve() });
  const c = await connect(t, server);
  c.send('{"execute":"quit","id":"q"}');
  t.equal(await c.nextLine(), '{"return": {}, "id": "q"}');
  await quitCalled.promise;
  t.pass('hook ran');
});

t.test('quit without a hook closes the server', async (t) => {
  const server = await startServer(t);
  const c = await connect(t, server);
  c.send('{"execute":"quit","id":"q"}');
  t.equal(await c.nextLine(), '{"return": {}, "id": "q"}');
  await c.closed;
  await until(() => !existsSync(server.path as string));
  t.pass('closed and socket removed');
});

t.test('close(): running commands are cancelled through their signal, replies flushed, all released', async (t) => {
  const dir = sockDir(t);
  const server = new QmpServer({ path: join(dir, 'q.sock') });
  const entered = deferred();
  server.registry.register('long', async (_args, ctx) => {
    entered.resolve();
    await new Promise<void>((_r, reject) => ctx.signal.addEventListener('abort', () => reject(ctx.signal.reason), { once: true }));
  });
  await server.listen();
  const a = await connect(t, server);
  const idle = await connect(t, server);
  a.send('{"execute":"long","id":"L"}{"execute":"query-version","id":"dropped"}');
  await entered.promise;
  await server.close();
  t.equal(await a.nextLine(), '{"id": "L", "error": {"class": "GenericError", "desc": "Cannot finish QMP command: the server is closing"}}');
  await a.closed;
  t.equal(a.lines.length, 0, 'queued commands are dropped');
  await idle.closed;
  t.equal(server.sessionCount, 0);
  t.notOk(existsSync(join(dir, 'q.sock')));
  await server.close();
  t.pass('close is idempotent');
  await t.rejects(RawConn.connect(join(dir, 'q.sock')), { code: 'ENOENT' });
});

t.test('close() gives up on a command that ignores its signal after closeTimeoutMs', async (t) => {
  const server = new QmpServer({ path: join(sockDir(t), 'q.sock'), closeTimeoutMs: 50 });
  const entered = deferred();
  server.registry.register('stuck', async () => {
    entered.resolve();
    await new Promise(() => {});
  });
  await server.listen();
  const a = await connect(t, server);
  a.send('{"execute":"stuck"}');
  await entered.promise;
  await server.close();
  await a.closed;
  t.pass('closed anyway');
});

t.test('TCP: loopback only', async (t) => {
  t.throws(() => new QmpServer({ tcp: { port: 0, host: '0.0.0.0' } }), { code: 'ERR_INVALID_ARGUMENT' });
  t.throws(() => new QmpServer({}), { code: 'ERR_INVALID_ARGUMENT' });
  const server = new QmpServer({ tcp: { port: 0 } });
  await server.listen();
  t.teardown(() => server.close());
  const addr = server.tcpAddress;
  t.equal(addr?.address, '127.0.0.1');
  const c = await RawConn.connect({ port: addr?.port as number });
  t.teardown(() => c.close());
  t.match(await c.nextLine(), /^\{"QMP": /);
  c.send('{"execute":"qmp_capabilities"}');
  t.equal(await c.nextLine(), '{"return": {}}');
});

t.test('a client that reads nothing is dropped once its output exceeds maxOutputBytes', async (t) => {
  const server = await startServer(t, { maxOutputBytes: 64 * 1024 });
  const lazy = await connect(t, server);
  lazy.socket.pause();
  const big = 'x'.repeat(16 * 1024);
  // The kernel buffers some output before Node's does; keep emitting until the session goes.
  for (let i = 0; i < 10_000 && server.sessionCount > 0; i++) {
    server.emit('BIG', { big });
    await new Promise((r) => setImmediate(r));
  }
  t.equal(server.sessionCount, 0);
});

t.test('closed while still starting (a client quit as soon as the socket appeared): nothing is left listening', async (t) => {
  // The socket file appears before listen() returns; close() in that window used to miss the
  // listener, which then kept the daemon alive after quit. Forced: close as soon as the file exists.
  let forced = 0;
  for (let attempt = 0; attempt < 100 && forced < 3; attempt++) {
    const path = join(sockDir(t), 'qmp.sock');
    const server = new QmpServer({ path });
    let listened = false;
    const listening = server.listen().then(() => (listened = true));
    while (!existsSync(path) && !listened) await new Promise((r) => setImmediate(r));
    if (listened) {
      await server.close();
      continue;
    }
    forced++;
    await server.close();
    await listening;
    t.equal(server.path, undefined, 'the listener that arrived after close was closed');
    t.notOk(existsSync(path), 'and its socket file removed');
    await t.rejects(RawConn.connect(path), 'nobody answers on it');
  }
  t.ok(forced > 0, `the window was hit (${forced} times)`);
});
