import t from 'tap';
import { EventEmitter } from 'node:events';
import type { Socket } from 'node:net';
import { QmpSession, MAX_QUEUED_REQUESTS, type SessionHost } from './session.js';
import { CommandRegistry } from './registry.js';
import { silentLogger } from '@shear/base';
import { deferred, until } from './raw-conn.fixture.js';

/** The part of a socket a session uses, with every call visible to the test. */
class FakeSocket extends EventEmitter {
  written: string[] = [];
  paused = false;
  pauses = 0;
  destroyed = false;
  writableLength = 0;
  write(s: string): boolean {
    this.written.push(s);
    return true;
  }
  end(s?: string, cb?: () => void): void {
    if (s) this.written.push(s);
    cb?.();
    this.destroy();
  }
  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    queueMicrotask(() => this.emit('close'));
  }
  pause(): void {
    this.paused = true;
    this.pauses++;
  }
  resume(): void {
    this.paused = false;
  }
}

function makeSession(registry = new CommandRegistry()): { session: QmpSession; socket: FakeSocket; ended: Promise<void> } {
  const socket = new FakeSocket();
  const ended = deferred();
  const host: SessionHost = {
    registry,
    greetingLine: '{"QMP": {}}',
    limits: {},
    maxOutputBytes: 1024,
    log: silentLogger,
    sessionEnded: () => ended.resolve(),
  };
  const session = new QmpSession(host, socket as unknown as Socket, 1, 'test');
  session.start();
  return { session, socket, ended: ended.promise };
}

t.test('QmpSession stops reading while requests pile up behind a running command', async (t) => {
  const registry = new CommandRegistry();
  const gate = deferred();
  let runs = 0;
  registry.register('gated', async () => {
    runs++;
    await gate.promise;
    return {};
  });
  registry.register('qmp_capabilities', (_a, ctx) => {
    (ctx.session as QmpSession).completeNegotiation();
    return {};
  });
  const { socket, ended } = makeSession(registry);
  socket.emit('data', Buffer.from('{"execute":"qmp_capabilities"}'));
  await until(() => socket.written.length === 2);
  const count = MAX_QUEUED_REQUESTS * 3;
  socket.emit('data', Buffer.from('{"execute":"gated"}'.repeat(count)));
  await until(() => runs === 1);
  t.ok(socket.paused, 'reading paused while the queue is full');
  gate.resolve();
  await until(() => socket.written.length === 2 + count);
  t.notOk(socket.paused, 'reading resumed once the queue drained');
  t.equal(runs, count);
  socket.destroy();
  await ended;
});

t.test('QmpSession: events go only to negotiated sessions; a client that reads nothing is dropped', async (t) => {
  const registry = new CommandRegistry();
  registry.register('qmp_capabilities', (_a, ctx) => {
    (ctx.session as QmpSession).completeNegotiation();
    return {};
  });
  const { session, socket, ended } = makeSession(registry);
  t.notOk(session.sendEvent('{"event": "E"}'), 'not negotiated: dropped');
  socket.emit('data', Buffer.from('{"execute":"qmp_capabilities"}'));
  await until(() => session.negotiated);
  t.ok(session.sendEvent('{"event": "E"}'));
  t.equal(socket.written.at(-1), '{"event": "E"}\r\n');
  socket.writableLength = 4096;
  t.notOk(session.sendEvent('{"event": "E"}'), 'over maxOutputBytes');
  t.ok(socket.destroyed);
  await ended;
});

t.test('QmpSession: a session ends only when its socket is closed and its command settled', async (t) => {
  const registry = new CommandRegistry();
  const gate = deferred();
  const entered = deferred();
  registry.register('qmp_capabilities', async (_a, ctx) => {
    entered.resolve();
    await gate.promise;
    t.ok(ctx.signal.aborted, 'the signal fired when the socket went away');
    return {};
  });
  const { session, socket, ended } = makeSession(registry);
  let done = false;
  void ended.then(() => (done = true));
  socket.emit('data', Buffer.from('{"execute":"qmp_capabilities"}'));
  await entered.promise;
  socket.destroy();
  await until(() => socket.listenerCount('close') > 0 && socket.destroyed);
  await new Promise((r) => setImmediate(r));
  t.notOk(done);
  t.ok(session.busy);
  gate.resolve();
  await ended;
  t.equal(socket.written.length, 1, 'only the greeting: the reply had nobody to go to');
});
