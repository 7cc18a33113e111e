import t, { type Test } from 'tap';
import fc from 'fast-check';
import { isShearError } from '@shear/base';
import { RequestTable, type InFlightRequest } from './request-table.js';
import { REQUEST_KINDS, kindsConflict, type RequestKind } from './request-kind.js';

/** The model: a plain list, every question answered by looking at every entry. */
interface ModelEntry {
  offset: number;
  bytes: number;
  kind: RequestKind;
  live: boolean;
  real: InFlightRequest;
}

function modelOverlaps(e: ModelEntry, offset: number, bytes: number): boolean {
  return bytes > 0 && e.offset < offset + bytes && offset < e.offset + e.bytes;
}

/**
 * A range is either absolute in a small space (so random ranges often meet) or placed
 * against an existing entry: touching it from either side (end == start: no overlap),
 * sharing exactly its first or last byte, or equal to it.
 */
type RangeSpec =
  | { at: 'abs'; offset: number; bytes: number }
  | { at: 'touch-before' | 'touch-after' | 'first-byte' | 'last-byte' | 'same'; pick: number; bytes: number };

const rangeSpec: fc.Arbitrary<RangeSpec> = fc.oneof(
  fc.record({ at: fc.constant('abs' as const), offset: fc.nat(40), bytes: fc.integer({ min: 1, max: 12 }) }),
  fc.record({
    at: fc.constantFrom('touch-before' as const, 'touch-after' as const, 'first-byte' as const, 'last-byte' as const, 'same' as const),
    pick: fc.nat(),
    bytes: fc.integer({ min: 1, max: 12 }),
  }),
);

function resolveRange(spec: RangeSpec, entries: ModelEntry[]): { offset: number; bytes: number } {
  if (spec.at === 'abs' || entries.length === 0) return { offset: spec.at === 'abs' ? spec.offset : 0, bytes: spec.bytes };
  const e = entries[spec.pick % entries.length]!;
  const end = e.offset + e.bytes;
  switch (spec.at) {
    case 'touch-before': {
      const offset = Math.max(0, e.offset - spec.bytes);
      return { offset, bytes: e.offset - offset || spec.bytes };
    }
    case 'touch-after':
      return { offset: end, bytes: spec.bytes };
    case 'first-byte': {
      const offset = Math.max(0, e.offset - spec.bytes + 1);
      return { offset, bytes: e.offset + 1 - offset };
    }
    case 'last-byte':
      return { offset: end - 1, bytes: spec.bytes };
    case 'same':
      return { offset: e.offset, bytes: e.bytes };
  }
}

const kind = fc.constantFrom(...REQUEST_KINDS);

type Op =
  | { op: 'add'; range: RangeSpec; kind: RequestKind }
  | { op: 'shrink'; pick: number; newBytes: number }
  | { op: 'remove'; pick: number }
  | { op: 'find'; range: RangeSpec; kind: RequestKind | undefined; empty: boolean };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 3, arbitrary: fc.record({ op: fc.constant('add' as const), range: rangeSpec, kind }) },
  // newBytes may be 0 or larger than the request: those must throw and change nothing.
  { weight: 1, arbitrary: fc.record({ op: fc.constant('shrink' as const), pick: fc.nat(), newBytes: fc.integer({ min: 0, max: 14 }) }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('remove' as const), pick: fc.nat() }) },
  {
    weight: 4,
    arbitrary: fc.record({ op: fc.constant('find' as const), range: rangeSpec, kind: fc.option(kind, { nil: undefined }), empty: fc.boolean() }),
  },
);

function checkTable(t: Test, table: RequestTable, model: ModelEntry[]): void {
  const live = model.filter((e) => e.live);
  t.equal(table.size, live.length, 'size matches the model');
  const listed = [...table];
  t.equal(listed.length, live.length, 'iteration lists every live request');
  for (let i = 1; i < listed.length; i++) t.ok(listed[i - 1]!.offset <= listed[i]!.offset, 'iteration is ordered by offset');
  for (const e of model) {
    t.equal(e.real.active, e.live, 'active matches the model');
    t.equal(e.real.offset, e.offset);
    t.equal(e.real.bytes, e.bytes);
    t.equal(e.real.end, e.offset + e.bytes);
    if (e.live) t.ok(listed.includes(e.real), 'a live request is listed');
  }
}

t.test('add / shrink / remove / findConflict agree with a naive list', async (t) => {
  let hits = 0;
  let misses = 0;
  fc.assert(
    fc.property(fc.array(opArb, { maxLength: 80, size: 'max' }), (ops) => {
      const table = new RequestTable();
      const model: ModelEntry[] = [];
      const byReal = new Map<InFlightRequest, ModelEntry>();
      for (const op of ops) {
        const live = model.filter((e) => e.live);
        switch (op.op) {
          case 'add': {
            const { offset, bytes } = resolveRange(op.range, live);
            const real = table.add(offset, bytes, op.kind);
            const e: ModelEntry = { offset, bytes, kind: op.kind, live: true, real };
            model.push(e);
            byReal.set(real, e);
            break;
          }
          case 'shrink': {
            // Removed requests are picked too: shrinking them must throw.
            if (model.length === 0) break;
            const e = model[op.pick % model.length]!;
            const valid = e.live && op.newBytes > 0 && op.newBytes <= e.bytes;
            if (valid) {
              e.real.shrink(op.newBytes);
              e.bytes = op.newBytes;
            } else {
              let err: unknown;
              try {
                e.real.shrink(op.newBytes);
              } catch (caught) {
                err = caught;
              }
              if (!isShearError(err, 'ERR_INVALID_ARGUMENT')) throw new Error(`shrink(${op.newBytes}) of ${JSON.stringify(e.real)} did not throw ERR_INVALID_ARGUMENT`);
            }
            break;
          }
          case 'remove': {
            // Removed requests are picked too: remove is idempotent.
            if (model.length === 0) break;
            const e = model[op.pick % model.length]!;
            e.real.remove();
            e.live = false;
            break;
          }
          case 'find': {
            const r = resolveRange(op.range, live);
            const bytes = op.empty ? 0 : r.bytes;
            const expected = live.filter((e) => modelOverlaps(e, r.offset, bytes) && (op.kind === undefined || kindsConflict(op.kind, e.kind)));
            const got = table.findConflict(r.offset, bytes, op.kind);
            if (expected.length === 0) {
              misses++;
              if (got !== undefined) throw new Error(`findConflict(${r.offset}, ${bytes}, ${op.kind}) found ${JSON.stringify(got)}; the model has none`);
            } else {
              hits++;
              const e = got === undefined ? undefined : byReal.get(got);
              if (e === undefined || !expected.includes(e)) {
                throw new Error(`findConflict(${r.offset}, ${bytes}, ${op.kind}) returned ${JSON.stringify(got)}; the model expects one of ${JSON.stringify(expected.map((x) => x.real))}`);
              }
            }
            break;
          }
        }
      }
      const live = model.filter((e) => e.live);
      if (table.size !== live.length) throw new Error(`size ${table.size}, model ${live.length}`);
      const listed = new Set(table);
      for (const e of model) {
        if (e.real.active !== e.live || listed.has(e.real) !== e.live) throw new Error(`liveness of ${JSON.stringify(e.real)} differs from the model`);
        if (e.real.bytes !== e.bytes || e.real.offset !== e.offset) throw new Error(`${JSON.stringify(e.real)} differs from the model`);
      }
    }),
    { numRuns: 500 },
  );
  // Both answers must have been exercised many times, or the property proves little.
  t.ok(hits > 1000 && misses > 1000, `findConflict checked ${hits} times with a conflict, ${misses} without`);
});

t.test('a scripted run checked assertion by assertion', async (t) => {
  const table = new RequestTable();
  const a = table.add(0, 8, 'copy-task');
  const b = table.add(8, 8, 'snapshot-read');
  const c = table.add(8, 4, 'snapshot-read');
  const model: ModelEntry[] = [
    { offset: 0, bytes: 8, kind: 'copy-task', live: true, real: a },
    { offset: 8, bytes: 8, kind: 'snapshot-read', live: true, real: b },
    { offset: 8, bytes: 4, kind: 'snapshot-read', live: true, real: c },
  ];
  checkTable(t, table, model);
  b.shrink(2);
  model[1]!.bytes = 2;
  b.remove();
  b.remove();
  model[1]!.live = false;
  checkTable(t, table, model);
});

t.test('touching ranges do not overlap; one shared byte does', async (t) => {
  const table = new RequestTable();
  const r = table.add(100, 50, 'guest-write');
  t.equal(table.findConflict(50, 50), undefined, 'ends where the request starts');
  t.equal(table.findConflict(150, 10), undefined, 'starts where the request ends');
  t.equal(table.findConflict(99, 2), r, 'shares the first byte');
  t.equal(table.findConflict(149, 1), r, 'shares the last byte');
  t.equal(table.findConflict(0, 1000), r, 'covers the request');
  t.equal(table.findConflict(120, 1), r, 'inside the request');
  t.equal(table.findConflict(120, 0), undefined, 'an empty range overlaps nothing, even inside a request');
});

t.test('conflict rules by kind', async (t) => {
  for (const held of REQUEST_KINDS) {
    for (const asking of REQUEST_KINDS) {
      const table = new RequestTable();
      const r = table.add(0, 10, held);
      const expectConflict = !(held === 'snapshot-read' && asking === 'snapshot-read');
      t.equal(table.findConflict(5, 10, asking), expectConflict ? r : undefined, `${asking} against held ${held}`);
      t.equal(table.findConflict(5, 10), r, `no kind: any overlap conflicts (held ${held})`);
    }
  }
});

t.test('bad arguments are refused', async (t) => {
  const table = new RequestTable();
  for (const [offset, bytes] of [
    [0, 0],
    [-1, 4],
    [0, -4],
    [0.5, 4],
    [0, Number.NaN],
    [Number.MAX_SAFE_INTEGER, 2],
  ] as const) {
    t.throws(() => table.add(offset, bytes, 'copy-task'), { code: 'ERR_INVALID_ARGUMENT' }, `add(${offset}, ${bytes})`);
  }
  t.throws(() => table.add(0, 4, 'write' as RequestKind), { code: 'ERR_INVALID_ARGUMENT' }, 'unknown kind');
  t.throws(() => table.findConflict(-1, 4), { code: 'ERR_INVALID_ARGUMENT' });
  await t.rejects(table.acquire(0, 0, 'copy-task'), { code: 'ERR_INVALID_ARGUMENT' });
  t.equal(table.size, 0, 'nothing was registered');
  const r = table.add(0, 8, 'copy-task');
  t.throws(() => r.shrink(9), { code: 'ERR_INVALID_ARGUMENT' }, 'shrink cannot grow');
  t.throws(() => r.shrink(0), { code: 'ERR_INVALID_ARGUMENT' }, 'shrink keeps at least one byte');
  r.shrink(8);
  t.equal(r.bytes, 8, 'shrink to the same size does nothing');
  r.remove();
  t.throws(() => r.shrink(4), { code: 'ERR_INVALID_ARGUMENT' }, 'cannot shrink a removed request');
});

t.test('addExclusive refuses a conflicting range with ERR_REQLIST_CONFLICT', async (t) => {
  const table = new RequestTable();
  table.add(0, 10, 'copy-task', { label: 'job0' });
  t.throws(() => table.addExclusive(5, 10, 'guest-write'), { code: 'ERR_REQLIST_CONFLICT', kind: 'busy', message: /held by "job0"/ });
  t.equal(table.size, 1);
  const ok = table.addExclusive(10, 10, 'guest-write');
  t.equal(table.size, 2);
  const reader1 = table.addExclusive(20, 10, 'snapshot-read');
  const reader2 = table.addExclusive(25, 10, 'snapshot-read');
  t.equal(table.size, 4, 'overlapping readers are both admitted');
  for (const r of [ok, reader1, reader2]) r[Symbol.dispose]();
  t.equal(table.size, 1, 'Symbol.dispose removes');
  t.same(table.toJSON(), [{ offset: 0, bytes: 10, kind: 'copy-task', label: 'job0', waiters: 0 }]);
});

type WaitOp = Op | { op: 'wait'; range: RangeSpec; kind: RequestKind } | { op: 'abort'; pick: number };

const waitOpArb: fc.Arbitrary<WaitOp> = fc.oneof(
  { weight: 3, arbitrary: fc.record({ op: fc.constant('add' as const), range: rangeSpec, kind }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constant('shrink' as const), pick: fc.nat(), newBytes: fc.integer({ min: 1, max: 12 }) }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constant('remove' as const), pick: fc.nat() }) },
  { weight: 3, arbitrary: fc.record({ op: fc.constant('wait' as const), range: rangeSpec, kind }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('abort' as const), pick: fc.nat() }) },
);

interface ModelWaiter {
  offset: number;
  bytes: number;
  on: ModelEntry;
  controller: AbortController;
  /** Pending in the model: not woken and not aborted. */
  pending: boolean;
  aborted: boolean;
  outcome: { settled: boolean; value?: boolean; error?: unknown };
}

t.test('waiters are woken exactly when their request is removed or shrinks out of their range', async (t) => {
  let woken = 0;
  let shrunkOut = 0;
  let stayed = 0;
  let aborted = 0;
  await fc.assert(
    fc.asyncProperty(fc.array(waitOpArb, { maxLength: 60, size: 'max' }), async (ops) => {
      const table = new RequestTable();
      const model: ModelEntry[] = [];
      const waiters: ModelWaiter[] = [];
      const byReal = new Map<InFlightRequest, ModelEntry>();
      const releaseModel = (e: ModelEntry): void => {
        for (const w of waiters) if (w.pending && w.on === e && (!e.live || !modelOverlaps(e, w.offset, w.bytes))) w.pending = false;
      };
      for (const op of ops) {
        const live = model.filter((e) => e.live);
        switch (op.op) {
          case 'add': {
            const { offset, bytes } = resolveRange(op.range, live);
            const real = table.add(offset, bytes, op.kind);
            const e: ModelEntry = { offset, bytes, kind: op.kind, live: true, real };
            model.push(e);
            byReal.set(real, e);
            break;
          }
          case 'shrink': {
            const e = live[op.pick % Math.max(1, live.length)];
            if (e === undefined || op.newBytes < 1 || op.newBytes > e.bytes) break;
            e.real.shrink(op.newBytes);
            e.bytes = op.newBytes;
            releaseModel(e);
            break;
          }
          case 'remove': {
            if (model.length === 0) break;
            const e = model[op.pick % model.length]!;
            e.real.remove();
            e.live = false;
            releaseModel(e);
            break;
          }
          case 'wait': {
            const { offset, bytes } = resolveRange(op.range, live);
            // The request waitOne parks on is the one findConflict names at the same moment.
            const conflict = table.findConflict(offset, bytes, op.kind);
            const controller = new AbortController();
            const outcome: ModelWaiter['outcome'] = { settled: false };
            table.waitOne(offset, bytes, op.kind, { signal: controller.signal }).then(
              (value) => Object.assign(outcome, { settled: true, value }),
              (error: unknown) => Object.assign(outcome, { settled: true, error }),
            );
            if (conflict === undefined) {
              waiters.push({ offset, bytes, on: undefined as unknown as ModelEntry, controller, pending: false, aborted: false, outcome });
            } else {
              waiters.push({ offset, bytes, on: byReal.get(conflict)!, controller, pending: true, aborted: false, outcome });
            }
            break;
          }
          case 'abort': {
            if (waiters.length === 0) break;
            const w = waiters[op.pick % waiters.length]!;
            if (w.pending) {
              w.pending = false;
              w.aborted = true;
            }
            w.controller.abort(new Error('test abort'));
            break;
          }
          case 'find':
            break;
        }
        // Waiter bookkeeping is synchronous: it must match after every single operation.
        const pending = waiters.filter((w) => w.pending);
        if (table.waiterCount !== pending.length) throw new Error(`waiterCount ${table.waiterCount}, model ${pending.length}`);
        for (const e of model) {
          const n = pending.filter((w) => w.on === e).length;
          if (e.real.waiterCount !== n) throw new Error(`${JSON.stringify(e.real)} has ${e.real.waiterCount} waiters, model ${n}`);
        }
      }
      await new Promise((resolve) => setImmediate(resolve));
      for (const w of waiters) {
        if (w.aborted) {
          aborted++;
          if (!isShearError(w.outcome.error, 'ERR_ABORTED')) throw new Error('an aborted waiter did not reject with ERR_ABORTED');
        } else if (w.pending) {
          stayed++;
          if (w.outcome.settled) throw new Error(`a waiter on ${JSON.stringify(w.on.real)} for (${w.offset}, ${w.bytes}) settled while its request still blocks it`);
        } else if (w.on === undefined) {
          if (w.outcome.value !== false) throw new Error('a waitOne with nothing to wait for did not resolve false');
        } else {
          woken++;
          if (w.on.live) shrunkOut++;
          if (w.outcome.value !== true) throw new Error(`a waiter released by ${JSON.stringify(w.on.real)} did not resolve true`);
        }
      }
    }),
    { numRuns: 600 },
  );
  t.ok(woken > 400 && shrunkOut > 25 && stayed > 400 && aborted > 100, `woken ${woken} (${shrunkOut} by a shrink), still waiting ${stayed}, aborted ${aborted}`);
});
