import t, { type Test } from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ShearError } from '@shear/base';
import { QmpClient, QmpCommandError } from './client.js';
import { QmpServer } from './server.js';
import { deferred } from './raw-conn.fixture.js';

async function startServer(t: Test): Promise<QmpServer> {
  const dir = mkdtempSync(join(tmpdir(), 'qmp-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const server = new QmpServer({ path: join(dir, 'qmp.sock') });
  server.registry.register('echo', (args) => args);
  server.registry.register('delay', async (args) => {
    const turns = args['turns'] as number;
    for (let i = 0; i < turns; i++) await new Promise((r) => setImmediate(r));
    return { turns };
  });
  server.registry.register('fail', () => {
    throw new ShearError('ERR_BITMAP_NOT_FOUND', "Dirty bitmap 'b' not found", { bitmap: 'b' });
  });
  await server.listen();
  t.teardown(() => server.close());
  return server;
}

async function connect(t: Test, server: QmpServer, negotiate = true): Promise<QmpClient> {
  const client = await QmpClient.connect(server.path as string, { negotiate });
  t.teardown(() => client.close());
  return client;
}

t.test('QmpClient: greeting, execute, error replies carry class and desc', async (t) => {
  const server = await startServer(t);
  const client = await connect(t, server);
  t.same(client.greeting.QMP.version.qemu, { micro: 0, minor: 2, major: 7 });
  t.same(client.greeting.QMP.capabilities, []);
  t.same(await client.execute('echo', { a: [1, 'x'], n: 12345678901234567890n }), { a: [1, 'x'], n: 12345678901234567890n });
  t.same(await client.execute('query-version'), { qemu: { micro: 0, minor: 2, major: 7 }, package: 'Shear 0.1.0' });
  const err = await client.execute('fail').catch((e: unknown) => e);
  t.ok(err instanceof QmpCommandError);
  t.match(err, { code: 'ERR_QMP_ERROR_REPLY', qmpClass: 'GenericError', desc: "Dirty bitmap 'b' not found", command: 'fail' });
  await t.rejects(client.execute('nope'), { code: 'ERR_QMP_ERROR_REPLY', qmpClass: 'CommandNotFound', desc: 'The command nope has not been found' });
});

t.test('QmpClient: without negotiation, commands other than qmp_capabilities fail', async (t) => {
  const server = await startServer(t);
  const client = await connect(t, server, false);
  await t.rejects(client.execute('query-version'), { code: 'ERR_QMP_ERROR_REPLY', qmpClass: 'CommandNotFound' });
  t.same(await client.execute('qmp_capabilities'), {});
  t.ok(await client.execute('query-version'));
});

t.test('QmpClient: pipelined executes resolve with their own replies', async (t) => {
  const server = await startServer(t);
  const client = await connect(t, server);
  const turns = [30, 0, 12, 3, 25, 1, 0, 7];
  const results = await Promise.all(turns.map((n) => client.execute<{ turns: number }>('delay', { turns: n })));
  t.same(results.map((r) => r.turns), turns);
});

t.test('QmpClient: waitEvent, events() and the event emitter', async (t) => {
  const server = await startServer(t);
  const client = await connect(t, server);
  const seen: string[] = [];
  client.on('event', (ev: { event: string }) => seen.push(ev.event));
  const iter = client.events();
  const wanted = client.waitEvent('JOB_STATUS_CHANGE', (d) => d['status'] === 'concluded', { timeoutMs: 5000 });
  server.emit('JOB_STATUS_CHANGE', { id: 'j', status: 'running' });
  server.emit('JOB_STATUS_CHANGE', { id: 'j', status: 'concluded' });
  const ev = await wanted;
  t.same(ev.data, { id: 'j', status: 'concluded' });
  t.same((await iter.next()).value?.data, { id: 'j', status: 'running' });
  t.same((await iter.next()).value?.data, { id: 'j', status: 'concluded' });
  await iter.return?.();
  t.same(seen, ['JOB_STATUS_CHANGE', 'JOB_STATUS_CHANGE']);
  t.equal(client.listenerCount('event'), 1, 'waitEvent and the iterator unsubscribed');

  await t.rejects(client.waitEvent('NEVER', undefined, { timeoutMs: 10 }), { code: 'ERR_TIMEOUT' });
  const ac = new AbortController();
  const aborted = client.waitEvent('NEVER', undefined, { signal: ac.signal });
  ac.abort();
  await t.rejects(aborted, { code: 'ERR_ABORTED' });
  t.equal(client.listenerCount('event'), 1);
});

t.test('QmpClient: sendRaw replies arrive as unmatched; close rejects what is pending', async (t) => {
  const server = await startServer(t);
  const gate = deferred();
  server.registry.register('block', async () => {
    await gate.promise;
    return {};
  });
  const client = await connect(t, server);
  const unmatched = new Promise((r) => client.once('unmatched', r));
  client.sendRaw('{"execute": }');
  t.same(await unmatched, { error: { class: 'GenericError', desc: 'JSON parse error, expecting value' } });

  const pending = t.rejects(client.execute('block'), { code: 'ERR_QMP_DISCONNECTED' });
  const ended = t.rejects(client.waitEvent('X'), { code: 'ERR_QMP_DISCONNECTED' });
  await client.close();
  await pending;
  await ended;
  await t.rejects(client.execute('query-version'), { code: 'ERR_QMP_DISCONNECTED' });
  gate.resolve();
});

t.test('QmpClient: connecting to nothing fails cleanly', async (t) => {
  await t.rejects(QmpClient.connect(join(tmpdir(), 'no-such-qmp.sock')), { code: 'ERR_QMP_DISCONNECTED' });
});

t.test('QmpClient: the server closing rejects pending commands', async (t) => {
  const server = await startServer(t);
  const entered = deferred();
  server.registry.register('until-cancel', async (_a, ctx) => {
    entered.resolve();
    await new Promise((_r, reject) => ctx.signal.addEventListener('abort', () => reject(ctx.signal.reason), { once: true }));
  });
  const client = await connect(t, server);
  const rejected = t.rejects(client.execute('until-cancel'), { code: 'ERR_QMP_ERROR_REPLY', qmpClass: 'GenericError', desc: 'Cannot finish QMP command: the server is closing' });
  await entered.promise;
  await server.close();
  await rejected;
  await new Promise((r) => (client.isClosed ? r(undefined) : client.once('close', r)));
  t.ok(client.isClosed);
});
