import t from 'tap';
import fc from 'fast-check';
import { getEventListeners } from 'node:events';
import { isShearError } from '@shear/base';
import { RequestTable, type InFlightRequest } from './request-table.js';
import { REQUEST_KINDS, kindsConflict, type RequestKind } from './request-kind.js';
import { flush, track } from './async.fixture.js';

t.test('waitOne resolves false at once when nothing conflicts', async (t) => {
  const table = new RequestTable();
  t.equal(await table.waitOne(0, 10, 'guest-write'), false, 'empty table');
  table.add(0, 10, 'snapshot-read');
  t.equal(await table.waitOne(5, 10, 'snapshot-read'), false, 'overlapping readers do not wait for each other');
  t.equal(await table.waitOne(10, 10, 'guest-write'), false, 'touching is not overlapping');
  t.equal(table.waiterCount, 0);
});

t.test('waitOne resolves true when the request is removed', async (t) => {
  const table = new RequestTable();
  const r = table.add(0, 10, 'copy-task');
  const w = track(table.waitOne(5, 10, 'guest-write'));
  await flush();
  t.notOk(w.settled, 'blocked while the request is in flight');
  t.equal(table.waiterCount, 1);
  t.equal(r.waiterCount, 1);
  r.remove();
  t.equal(table.waiterCount, 0, 'the waiter is unregistered synchronously by remove');
  await flush();
  t.ok(w.settled);
  t.equal(w.value, true);
  r.remove();
  t.equal(table.size, 0, 'remove is idempotent');
});

t.test('waitOne and shrink: only a shrink that leaves the range wakes the waiter', async (t) => {
  const table = new RequestTable();
  const r = table.add(0, 100, 'copy-task');
  const w = track(table.waitOne(60, 10, 'guest-write'));
  await flush();
  r.shrink(80);
  await flush();
  t.notOk(w.settled, 'shrunk to (0, 80): still overlaps (60, 10)');
  t.equal(table.waiterCount, 1);
  r.shrink(61);
  await flush();
  t.notOk(w.settled, 'shrunk to (0, 61): still shares byte 60');
  r.shrink(60);
  await flush();
  t.equal(w.value, true, 'shrunk to (0, 60): ends where the waiter starts, so it is released');
  t.equal(table.waiterCount, 0);
  t.equal(table.size, 1, 'the request itself stays registered');
});

t.test('one shrink wakes only the waiters it releases; remove wakes the rest', async (t) => {
  const table = new RequestTable();
  const r = table.add(0, 100, 'cbw-copy');
  const early = track(table.waitOne(0, 10, 'guest-write'));
  const middle = track(table.waitOne(40, 10, 'snapshot-read'));
  const late = track(table.waitOne(90, 20, 'copy-task'));
  await flush();
  t.equal(r.waiterCount, 3);
  r.shrink(45);
  await flush();
  t.equal(late.value, true, 'the waiter past the new end is released');
  t.notOk(early.settled);
  t.notOk(middle.settled);
  t.equal(table.waiterCount, 2);
  r.remove();
  await flush();
  t.equal(early.value, true);
  t.equal(middle.value, true);
  t.equal(table.waiterCount, 0);
});

t.test('aborting a wait rejects with ERR_ABORTED and leaves no waiter behind', async (t) => {
  const table = new RequestTable();
  const r = table.add(0, 10, 'guest-write');
  const controller = new AbortController();
  const reason = new Error('client went away');
  const w = track(table.waitOne(0, 10, 'snapshot-read', { signal: controller.signal }));
  await flush();
  t.equal(table.waiterCount, 1);
  t.equal(getEventListeners(controller.signal, 'abort').length, 1);
  controller.abort(reason);
  t.equal(table.waiterCount, 0, 'unregistered synchronously by the abort');
  t.equal(r.waiterCount, 0);
  t.equal(getEventListeners(controller.signal, 'abort').length, 0, 'the abort listener is gone');
  await flush();
  t.ok(isShearError(w.error, 'ERR_ABORTED'), 'rejects with ERR_ABORTED');
  t.equal((w.error as Error).cause, reason, 'the abort reason is the cause');
  r.remove();
  t.equal(table.waiterCount, 0, 'a later remove finds no stale waiter');
});

t.test('an already aborted signal rejects without registering anything', async (t) => {
  const table = new RequestTable();
  const controller = new AbortController();
  controller.abort();
  await t.rejects(table.waitOne(0, 10, 'guest-write', { signal: controller.signal }), { code: 'ERR_ABORTED' });
  await t.rejects(table.acquire(0, 10, 'guest-write', { signal: controller.signal }), { code: 'ERR_ABORTED' });
  t.equal(table.size, 0);
  t.equal(table.waiterCount, 0);
});

t.test('a woken waiter no longer listens to its signal', async (t) => {
  const table = new RequestTable();
  const r = table.add(0, 10, 'guest-write');
  const controller = new AbortController();
  const w = track(table.waitOne(0, 10, 'guest-write', { signal: controller.signal }));
  r.remove();
  t.equal(getEventListeners(controller.signal, 'abort').length, 0);
  controller.abort();
  await flush();
  t.equal(w.value, true, 'the wake-up wins; the later abort changes nothing');
});

t.test('waitAll waits until no conflict is left, including ones registered meanwhile', async (t) => {
  const table = new RequestTable();
  const a = table.add(0, 10, 'copy-task');
  const all = track(table.waitAll(0, 20, 'guest-write'));
  await flush();
  const b = table.add(10, 10, 'cbw-copy');
  a.remove();
  await flush();
  t.notOk(all.settled, 'moved on to the conflict registered while it waited');
  t.equal(b.waiterCount, 1);
  b.remove();
  await flush();
  t.ok(all.settled);
  t.equal(all.error, undefined);
  t.equal(table.waiterCount, 0);
});

t.test('acquire registers at once when the range is free', async (t) => {
  const table = new RequestTable();
  const p = table.acquire(0, 10, 'guest-write', { label: 'vm0' });
  t.equal(table.size, 1, 'registered before acquire returned');
  const r = await p;
  t.equal(r.label, 'vm0');
  t.equal(r.kind, 'guest-write');
  t.ok(r.active);
});

t.test('acquire serialises overlapping requests', async (t) => {
  const table = new RequestTable();
  const first = await table.acquire(0, 64, 'copy-task');
  const second = track(table.acquire(32, 64, 'guest-write'));
  await flush();
  t.notOk(second.settled, 'the second waits while the first is in flight');
  t.equal(table.size, 1, 'and has not registered anything');
  first.remove();
  await flush();
  t.ok(second.value?.active, 'the second gets its request once the first is removed');
  t.same([...table].map((r) => r.kind), ['guest-write']);
});

t.test('overlapping snapshot reads proceed at once', async (t) => {
  const table = new RequestTable();
  const a = track(table.acquire(0, 64, 'snapshot-read'));
  const b = track(table.acquire(32, 64, 'snapshot-read'));
  await flush();
  t.ok(a.value?.active);
  t.ok(b.value?.active);
  t.equal(table.size, 2);
  const writer = track(table.acquire(60, 1, 'guest-write'));
  await flush();
  t.notOk(writer.settled, 'a writer under both readers waits');
  a.value!.remove();
  await flush();
  t.notOk(writer.settled, 'still held by the other reader');
  b.value!.remove();
  await flush();
  t.ok(writer.value?.active);
});

t.test('of several woken acquirers, exactly the compatible ones get in', async (t) => {
  const table = new RequestTable();
  const holder = table.add(0, 100, 'copy-task');
  const w1 = track(table.acquire(0, 50, 'guest-write'));
  const w2 = track(table.acquire(25, 50, 'cbw-copy'));
  const r1 = track(table.acquire(80, 10, 'snapshot-read'));
  await flush();
  t.equal(holder.waiterCount, 3);
  holder.remove();
  await flush();
  t.ok(w1.value?.active, 'the first woken writer gets in');
  t.notOk(w2.settled, 'the second overlaps it and waits again');
  t.equal(w1.value!.waiterCount, 1, 'now parked on the new holder');
  t.ok(r1.value?.active, 'a disjoint reader gets in too');
  w1.value!.remove();
  await flush();
  t.ok(w2.value?.active);
  t.equal(table.waiterCount, 0);
});

t.test('aborting acquire while it waits registers nothing', async (t) => {
  const table = new RequestTable();
  const holder = table.add(0, 10, 'guest-write');
  const controller = new AbortController();
  const acq = track(table.acquire(0, 10, 'snapshot-read', { signal: controller.signal }));
  await flush();
  controller.abort();
  await flush();
  t.ok(isShearError(acq.error, 'ERR_ABORTED'));
  holder.remove();
  await flush();
  t.equal(table.size, 0);
  t.equal(table.waiterCount, 0);
});

interface Actor {
  offset: number;
  bytes: number;
  kind: RequestKind;
  holdSteps: number;
  shrinkTo: number | undefined;
  abortable: boolean;
}

const actorArb: fc.Arbitrary<Actor> = fc
  .record({
    offset: fc.nat(24),
    bytes: fc.integer({ min: 1, max: 10 }),
    kind: fc.constantFrom(...REQUEST_KINDS),
    holdSteps: fc.integer({ min: 0, max: 3 }),
    shrink: fc.option(fc.integer({ min: 1, max: 10 }), { nil: undefined }),
    abortable: fc.boolean(),
  })
  .map(({ shrink, ...a }) => ({ ...a, shrinkTo: shrink === undefined ? undefined : Math.min(shrink, a.bytes) }));

t.test('acquire under random interleavings: no two conflicting requests are ever in flight together', async (t) => {
  let serialised = 0;
  await fc.assert(
    fc.asyncProperty(fc.scheduler(), fc.array(actorArb, { minLength: 2, maxLength: 8 }), async (s, actors) => {
      const table = new RequestTable();
      const held = new Set<InFlightRequest>();
      const check = (): void => {
        for (const a of held) {
          for (const b of held) {
            if (a !== b && a.offset < b.end && b.offset < a.end && kindsConflict(a.kind, b.kind)) {
              throw new Error(`${JSON.stringify(a)} and ${JSON.stringify(b)} are in flight together`);
            }
          }
        }
      };
      const controllers: AbortController[] = [];
      const runs = actors.map(async (a, i) => {
        await s.schedule(Promise.resolve(), `start ${i}`);
        const controller = new AbortController();
        if (a.abortable) controllers.push(controller);
        let r: InFlightRequest;
        try {
          r = await table.acquire(a.offset, a.bytes, a.kind, { signal: controller.signal });
        } catch (err) {
          if (isShearError(err, 'ERR_ABORTED')) return;
          throw err;
        }
        held.add(r);
        check();
        if (table.waiterCount > 0) serialised++;
        for (let step = 0; step < a.holdSteps; step++) {
          await s.schedule(Promise.resolve(), `hold ${i}.${step}`);
          check();
          if (step === 0 && a.shrinkTo !== undefined) r.shrink(a.shrinkTo);
        }
        held.delete(r);
        r.remove();
      });
      // Aborts arrive at scheduled moments too.
      const aborts = s.schedule(Promise.resolve(), 'abort one').then(() => controllers.shift()?.abort());
      await s.waitFor(Promise.all([...runs, aborts]));
      if (table.size !== 0 || table.waiterCount !== 0) throw new Error(`left ${table.size} requests and ${table.waiterCount} waiters`);
    }),
    { numRuns: 300 },
  );
  t.ok(serialised > 50, `${serialised} acquirers got their range while others were waiting`);
});
