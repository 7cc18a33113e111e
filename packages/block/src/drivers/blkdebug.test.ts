import t, { type Test } from 'tap';
import fc from 'fast-check';
import { isShearError, type ShearError } from '@shear/base';
import type { BlockIO, BlockStatusExtent, WriteOptions, WriteZeroesOptions } from '../io.js';
import { BlkdebugDriver, type BlkdebugOptions } from './blkdebug.js';
import type { BlkdebugEvent, BlkdebugInjectErrorOptions, BlkdebugIOType, BlkdebugSetStateOptions } from './blkdebug-rules.js';
import { runBlockIOConformance } from '@shear/testkit';
import { MemoryDriver } from './memory.js';

const KiB = 1024;
const SECTOR = 512;

void runBlockIOConformance(t, 'blkdebug without rules', {
  open: async (_t, length) => new BlkdebugDriver({ image: new MemoryDriver({ length }) }),
  persistsData: true,
  discardReadsZero: true,
});

// Exercises padding, read-modify-write, the write lock and splitting; discard then keeps the
// unaligned edges of a range.
void runBlockIOConformance(t, 'blkdebug with align 4096 and max-transfer 64 KiB', {
  open: async (_t, length) => new BlkdebugDriver({ image: new MemoryDriver({ length }), align: 4096, 'max-transfer': 64 * KiB, 'max-discard': 8192 }),
  persistsData: true,
  discardReadsZero: false,
});

/** A BlockIO that records the calls reaching it, over a memory node. */
class SpyIO implements BlockIO {
  readonly calls: string[] = [];
  readonly inner: MemoryDriver;
  constructor(length: number) {
    this.inner = new MemoryDriver({ length });
  }
  get length(): number {
    return this.inner.length;
  }
  read(offset: number, buf: Uint8Array): Promise<void> {
    this.calls.push(`read ${offset} ${buf.length}`);
    return this.inner.read(offset, buf);
  }
  write(offset: number, buf: Uint8Array, opts?: WriteOptions): Promise<void> {
    this.calls.push(`write ${offset} ${buf.length}${opts?.fua ? ' fua' : ''}`);
    return this.inner.write(offset, buf, opts);
  }
  writeZeroes(offset: number, bytes: number, opts?: WriteZeroesOptions): Promise<void> {
    this.calls.push(`zeroes ${offset} ${bytes}`);
    return this.inner.writeZeroes(offset, bytes, opts);
  }
  discard(offset: number, bytes: number): Promise<void> {
    this.calls.push(`discard ${offset} ${bytes}`);
    return this.inner.discard(offset, bytes);
  }
  flush(): Promise<void> {
    this.calls.push('flush');
    return this.inner.flush();
  }
  blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    this.calls.push(`status ${offset} ${bytes}`);
    return this.inner.blockStatus(offset, bytes);
  }
  close(): Promise<void> {
    this.calls.push('close');
    return this.inner.close();
  }
}

function node(length: number, opts: Omit<BlkdebugOptions, 'image'> = {}): { io: BlkdebugDriver; child: SpyIO } {
  const child = new SpyIO(length);
  return { io: new BlkdebugDriver({ image: child, ...opts }), child };
}

/** Resolves to the ShearError a call rejected with, or fails the test if it resolved. */
async function rejection(t: Test, p: Promise<unknown>, what: string): Promise<ShearError | undefined> {
  try {
    await p;
    t.fail(`${what}: resolved, expected a rejection`);
    return undefined;
  } catch (err) {
    if (!isShearError(err)) {
      t.fail(`${what}: rejected with ${String(err)}, not a ShearError`);
      return undefined;
    }
    return err;
  }
}

/** 'ok' or the errno name of a failed request. */
async function outcome(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'ok';
  } catch (err) {
    if (isShearError(err) && err.context.errno !== undefined) return err.context.errno;
    throw err;
  }
}

const sectorBuf = (n = 1, fill = 0xab) => new Uint8Array(n * SECTOR).fill(fill);

t.test('a rule on event none is active from the start and iotype limits what it fails', async (t) => {
  const { io, child } = node(64 * KiB, { 'inject-error': [{ event: 'none', iotype: 'write' }] });
  t.equal(io.eventCount('none'), 1);
  await io.read(0, sectorBuf());
  const err = await rejection(t, io.write(0, sectorBuf()), 'write');
  t.equal(err?.code, 'ERR_IO');
  t.equal(err?.kind, 'io');
  t.equal(err?.context.errno, 'EIO');
  t.equal(err?.context.op, 'write');
  t.same(child.calls, ['read 0 512'], 'the failed write never reached the child');
  await io.writeZeroes(0, SECTOR);
  await io.discard(0, SECTOR);
  t.equal(io.rules[0]?.hits, 1);
});

t.test('once: the rule fails one request and is gone', async (t) => {
  const { io, child } = node(64 * KiB, { 'inject-error': [{ event: 'write_aio', once: true }] });
  const [rule] = io.rules;
  t.equal(await outcome(io.write(0, sectorBuf())), 'EIO');
  t.equal(await outcome(io.write(0, sectorBuf())), 'ok');
  t.equal(await outcome(io.write(0, sectorBuf())), 'ok');
  t.equal(rule?.hits, 1);
  t.equal(rule?.removed, true);
  t.same(io.rules, []);
  t.same(child.calls, ['write 0 512', 'write 0 512']);
});

t.test('without once a rule keeps failing, and stays active across other events (QEMU)', async (t) => {
  const { io } = node(64 * KiB, { 'inject-error': [{ event: 'read_aio' }] });
  t.equal(await outcome(io.write(0, sectorBuf())), 'ok', 'not active before the first read');
  t.equal(await outcome(io.read(0, sectorBuf())), 'EIO');
  t.equal(await outcome(io.read(0, sectorBuf())), 'EIO');
  // write_aio activates no inject-error rule, so the read_aio rule is still the active set.
  t.equal(await outcome(io.write(0, sectorBuf())), 'EIO');
  t.equal(io.rules[0]?.hits, 3);
});

t.test('sector: a request containing the sector fails, its neighbours do not', async (t) => {
  const { io } = node(64 * KiB, { 'inject-error': [{ event: 'none', sector: 8 }] });
  t.equal(await outcome(io.read(7 * SECTOR, sectorBuf())), 'ok', 'sector before');
  t.equal(await outcome(io.read(9 * SECTOR, sectorBuf())), 'ok', 'sector after');
  t.equal(await outcome(io.read(8 * SECTOR, sectorBuf())), 'EIO', 'the sector itself');
  t.equal(await outcome(io.read(0, sectorBuf(16))), 'EIO', 'a range covering it');
  t.equal(await outcome(io.write(6 * SECTOR, sectorBuf(3))), 'EIO', 'a write covering it');
  t.equal(await outcome(io.write(6 * SECTOR, sectorBuf(2))), 'ok', 'a write ending right before it');
  // QEMU matches the sector's first byte: a request inside the sector that misses it passes.
  t.equal(await outcome(io.read(8 * SECTOR + 1, new Uint8Array(100))), 'ok', 'inside the sector but past its first byte');
  t.equal(await outcome(io.flush()), 'ok', 'flush (0, 0) never matches a sector rule');
});

t.test('state gating and set-state: the first write moves 1 -> 2, the second fails', async (t) => {
  const { io } = node(64 * KiB, {
    'inject-error': [{ event: 'write_aio', state: 2 }],
    'set-state': [{ event: 'write_aio', state: 1, new_state: 2 }],
  });
  t.equal(io.state, 1);
  t.equal(await outcome(io.write(0, sectorBuf())), 'ok', 'the rule saw state 1 when write_aio fired');
  t.equal(io.state, 2);
  t.equal(await outcome(io.write(0, sectorBuf())), 'EIO');
  t.equal(await outcome(io.write(0, sectorBuf())), 'EIO');
  t.equal(io.state, 2);
  const [inject, setState] = io.rules;
  t.equal(inject?.hits, 2);
  t.equal(setState?.hits, 1);
});

t.test("set-state accepts QEMU 7.2's new_state and the newer new-state", async (t) => {
  const { io } = node(64 * KiB, {
    'set-state': [
      { event: 'flush_to_os', state: 1, 'new-state': 5 },
      { event: 'flush_to_os', state: 5, new_state: 7, 'new-state': 7 },
    ],
  });
  await io.flush();
  t.equal(io.state, 5);
  await io.flush();
  t.equal(io.state, 7);
  t.throws(() => io.addRule('set-state', { event: 'flush_to_os', new_state: 1, 'new-state': 2 }), { code: 'ERR_INVALID_ARGUMENT' });
  t.throws(() => io.addRule('set-state', { event: 'flush_to_os' }), { code: 'ERR_INVALID_ARGUMENT' });
});

t.test('set-state chains across events; the earliest-added matching rule wins', async (t) => {
  const { io } = node(64 * KiB, {
    'inject-error': [{ event: 'read_aio', state: 3, once: true }],
    'set-state': [
      { event: 'flush_to_disk', state: 1, new_state: 2 },
      { event: 'read_aio', state: 2, new_state: 3 },
      { event: 'read_aio', state: 2, new_state: 9 },
    ],
  });
  await io.write(0, sectorBuf());
  await io.flush();
  t.equal(io.state, 2);
  t.equal(await outcome(io.read(0, sectorBuf())), 'ok');
  t.equal(io.state, 3, 'not 9: the first set-state rule added wins');
  t.equal(await outcome(io.read(0, sectorBuf())), 'EIO');
  t.equal(await outcome(io.read(0, sectorBuf())), 'ok');
});

t.test('errno reaches the caller: EIO, ENOSPC by name and by number, others, and 0', async (t) => {
  const cases: [BlkdebugInjectErrorOptions['errno'], string, string][] = [
    [undefined, 'ERR_IO', 'EIO'],
    [5, 'ERR_IO', 'EIO'],
    ['ENOSPC', 'ERR_NO_SPACE', 'ENOSPC'],
    [28, 'ERR_NO_SPACE', 'ENOSPC'],
    ['EDQUOT', 'ERR_NO_SPACE', 'EDQUOT'],
    [13, 'ERR_PERMISSION_DENIED', 'EACCES'],
    ['ENOTSUP', 'ERR_IO_UNSUPPORTED', 'ENOTSUP'],
    ['ETIMEDOUT', 'ERR_IO', 'ETIMEDOUT'],
  ];
  for (const [errno, code, name] of cases) {
    const { io } = node(64 * KiB, { 'inject-error': [errno === undefined ? { event: 'none' } : { event: 'none', errno }] });
    const err = await rejection(t, io.write(4096, sectorBuf()), `errno ${String(errno)}`);
    t.equal(err?.code, code, `errno ${String(errno)}: code`);
    t.equal(err?.context.errno, name, `errno ${String(errno)}: context.errno`);
    t.same([err?.context.offset, err?.context.bytes], [4096, 512]);
    t.match(err?.cause, { code: name, syscall: 'blkdebug' });
    t.match(err?.message, new RegExp(`^Cannot write \\(4096, 512\\) of the blkdebug node: ${name} injected`));
  }
  const { io } = node(64 * KiB, { 'inject-error': [{ event: 'none', errno: 0, sector: 0 }, { event: 'none' }] });
  t.equal(await outcome(io.read(0, sectorBuf())), 'ok', 'errno 0 matches first and lets the request pass');
  t.equal(await outcome(io.read(SECTOR, sectorBuf())), 'EIO', 'the next rule decides where errno 0 does not match');
});

t.test('iotype: each request type is checked as its own type; block-status only when asked', async (t) => {
  const ops: [BlkdebugIOType, (io: BlkdebugDriver) => Promise<unknown>][] = [
    ['read', (io) => io.read(0, sectorBuf())],
    ['write', (io) => io.write(0, sectorBuf())],
    ['write-zeroes', (io) => io.writeZeroes(0, SECTOR)],
    ['discard', (io) => io.discard(0, SECTOR)],
    ['flush', async (io) => {
      await io.write(SECTOR, sectorBuf()).catch(() => undefined);
      await io.flush();
    }],
    ['block-status', (io) => io.blockStatus(0, SECTOR)],
  ];
  for (const [iotype] of ops) {
    const results: string[] = [];
    for (const [, op] of ops) {
      const { io } = node(64 * KiB, { 'inject-error': [{ event: 'none', iotype }] });
      results.push(await outcome(op(io)));
    }
    t.same(results, ops.map(([other]) => (other === iotype ? 'EIO' : 'ok')), `iotype ${iotype}`);
  }
  const { io } = node(64 * KiB, { 'inject-error': [{ event: 'none' }] });
  t.equal(await outcome(io.blockStatus(0, SECTOR)), 'ok', 'the default iotypes leave block-status alone');
});

t.test('flush: flush_to_disk and the check only when something was written since the last flush', async (t) => {
  const { io, child } = node(64 * KiB, { 'inject-error': [{ event: 'flush_to_disk', once: true }] });
  await io.flush();
  t.equal(io.eventCount('flush_to_os'), 1);
  t.equal(io.eventCount('flush_to_disk'), 0);
  await io.write(0, sectorBuf());
  t.equal(await outcome(io.flush()), 'EIO');
  t.equal(io.eventCount('flush_to_disk'), 1);
  t.equal(await outcome(io.flush()), 'ok', 'still dirty after the failed flush: flushed now');
  t.equal(io.eventCount('flush_to_disk'), 2);
  await io.flush();
  t.equal(io.eventCount('flush_to_disk'), 2, 'clean: no flush_to_disk');
  await io.discard(0, SECTOR);
  await io.flush();
  t.equal(io.eventCount('flush_to_disk'), 3, 'a discard dirties too');
  t.same(child.calls.filter((c) => c === 'flush').length, 4, 'the child is flushed every time but when the check failed');
});

t.test('write events: write_aio, pwritev, pwritev_done (also on failure); zeroes raise pwritev_zero', async (t) => {
  const { io } = node(64 * KiB, { 'inject-error': [{ event: 'pwritev', once: true }] });
  t.equal(await outcome(io.write(0, sectorBuf())), 'EIO');
  t.same(['write_aio', 'pwritev', 'pwritev_done', 'pwritev_zero', 'read_aio'].map((e) => io.eventCount(e as BlkdebugEvent)), [1, 1, 1, 0, 0]);
  await io.writeZeroes(0, 3 * SECTOR);
  t.same(['write_aio', 'pwritev', 'pwritev_done', 'pwritev_zero'].map((e) => io.eventCount(e as BlkdebugEvent)), [1, 1, 2, 1]);
  await io.read(0, sectorBuf());
  t.equal(io.eventCount('read_aio'), 1);
});

t.test('immediately: rejects before the event loop turns; otherwise after one turn', async (t) => {
  for (const immediately of [true, false]) {
    const { io } = node(64 * KiB, { 'inject-error': [{ event: 'none', immediately }] });
    let turned = false;
    setImmediate(() => (turned = true));
    const err = await rejection(t, io.read(0, sectorBuf()), `immediately ${immediately}`);
    t.equal(err?.code, 'ERR_IO');
    t.equal(turned, !immediately, `immediately ${immediately}: event loop turned before the rejection`);
  }
});

t.test('max-transfer: each piece raises its events and is checked; earlier pieces landed', async (t) => {
  const { io, child } = node(64 * KiB, { 'max-transfer': 4096, 'inject-error': [{ event: 'write_aio', sector: 8, once: true }] });
  const data = new Uint8Array(12 * KiB).fill(7);
  t.equal(await outcome(io.write(0, data)), 'EIO');
  t.same(child.calls, ['write 0 4096'], 'the first piece was written, the second failed, the third never ran');
  t.equal(io.eventCount('write_aio'), 2);
  child.calls.length = 0;
  await io.read(0, new Uint8Array(10 * KiB));
  t.same(child.calls, ['read 0 4096', 'read 4096 4096', 'read 8192 2048']);
  t.equal(io.eventCount('read_aio'), 3);
});

t.test('align: reads are padded, unaligned writes read-modify-write, discard keeps the edges', async (t) => {
  const { io, child } = node(64 * KiB, { align: 4096 });
  await child.inner.write(0, new Uint8Array(16 * KiB).fill(1));
  await io.read(5000, new Uint8Array(100));
  t.same(child.calls, ['read 4096 4096']);
  child.calls.length = 0;
  await io.write(5000, new Uint8Array(100).fill(2));
  t.same(child.calls, ['read 4096 4096', 'write 4096 4096']);
  t.same(['pwritev_rmw_head', 'pwritev_rmw_tail', 'pwritev_rmw_after_head', 'pwritev_rmw_after_tail', 'pwritev'].map((e) => io.eventCount(e as BlkdebugEvent)), [1, 1, 1, 1, 1]);
  const back = new Uint8Array(4096);
  await child.inner.read(4096, back);
  t.same([back[903], back[904], back[1003], back[1004]], [1, 2, 2, 1], 'only the written bytes changed');
  child.calls.length = 0;
  await io.write(4000, new Uint8Array(5000).fill(3));
  t.same(child.calls, ['read 0 4096', 'read 8192 4096', 'write 0 12288'], 'head and tail read separately');
  child.calls.length = 0;
  await io.writeZeroes(100, 10_000);
  t.same(child.calls, ['read 0 4096', 'read 8192 4096', 'write 0 4096', 'zeroes 4096 4096', 'write 8192 4096']);
  child.calls.length = 0;
  await io.discard(100, 13_000);
  t.same(child.calls, ['discard 4096 8192']);
  child.calls.length = 0;
  await io.discard(100, 1000);
  t.same(child.calls, [], 'nothing whole to discard');
  await rejection(t, io.writeZeroes(100, 5000, { fastOnly: true }), 'fastOnly unaligned').then((err) => t.equal(err?.code, 'ERR_NOT_IMPLEMENTED'));
});

t.test('align: zero writes write the partial head and tail units as data and zero the middle', async (t) => {
  const { io, child } = node(64 * KiB, { align: 4096, 'max-write-zero': 8192 });
  await child.inner.write(0, new Uint8Array(64 * KiB).fill(1));
  child.calls.length = 0;
  await io.writeZeroes(100, 5 * 4096);
  t.same(child.calls, ['read 0 4096', 'read 20480 4096', 'write 0 4096', 'zeroes 4096 8192', 'zeroes 12288 8192', 'write 20480 4096']);
  const back = new Uint8Array(6 * 4096);
  await child.inner.read(0, back);
  t.same([back[99], back[100], back[100 + 5 * 4096 - 1], back[100 + 5 * 4096]], [1, 0, 0, 1]);
  t.equal(io.eventCount('pwritev_zero'), 1);
  t.equal(io.eventCount('pwritev'), 2);
  child.calls.length = 0;
  await io.writeZeroes(100, 100);
  t.same(child.calls, ['read 0 4096', 'write 0 4096'], 'inside one unit: one read, one data write');
});

t.test('align: an unaligned child end reads as zeroes past the end and is never written past', async (t) => {
  const { io, child } = node(10_000, { align: 4096 });
  await io.write(9000, new Uint8Array(1000).fill(5));
  t.same(child.calls, ['read 8192 1808', 'write 8192 1808']);
  const tail = new Uint8Array(1000);
  await io.read(9000, tail);
  t.ok(tail.every((b) => b === 5));
});

t.test('addRule, removeRule, state and hits', async (t) => {
  const { io } = node(64 * KiB);
  const rule = io.addRule('inject-error', { event: 'read_aio', errno: 'ENOSPC', state: 4 });
  t.equal(await outcome(io.read(0, sectorBuf())), 'ok', 'state 1: not activated');
  io.state = 4;
  t.equal(await outcome(io.read(0, sectorBuf())), 'ENOSPC');
  t.equal(rule.hits, 1);
  t.same(io.activeRules, [rule]);
  t.equal(io.removeRule(rule), true);
  t.equal(io.removeRule(rule), false);
  t.same(io.activeRules, []);
  t.equal(await outcome(io.read(0, sectorBuf())), 'ok');
  const later = io.addRule('inject-error', { event: 'none' });
  t.equal(await outcome(io.read(0, sectorBuf())), 'ok', 'none fired at construction only');
  io.debugEvent('none');
  t.equal(await outcome(io.read(0, sectorBuf())), 'EIO', 'a parent may raise any event');
  t.equal(later.hits, 1);
  t.throws(() => (io.state = 1.5), { code: 'ERR_INVALID_ARGUMENT' });
});

t.test('bad options are refused', async (t) => {
  const image = new MemoryDriver({ length: 64 * KiB });
  const bad: [string, unknown, string][] = [
    ['unknown option', { image, bogus: 1 }, 'ERR_INVALID_ARGUMENT'],
    ['no image', {}, 'ERR_INVALID_ARGUMENT'],
    ['align not a power of two', { image, align: 3000 }, 'ERR_INVALID_ARGUMENT'],
    ['align too large', { image, align: 2 ** 31 }, 'ERR_INVALID_ARGUMENT'],
    ['max-transfer not a multiple of align', { image, align: 4096, 'max-transfer': 6000 }, 'ERR_INVALID_ARGUMENT'],
    ['negative max-discard', { image, 'max-discard': -1 }, 'ERR_INVALID_ARGUMENT'],
    ['unknown event', { image, 'inject-error': [{ event: 'nope' }] }, 'ERR_INVALID_ARGUMENT'],
    ['unknown iotype', { image, 'inject-error': [{ event: 'none', iotype: 'trim' }] }, 'ERR_INVALID_ARGUMENT'],
    ['unknown errno name', { image, 'inject-error': [{ event: 'none', errno: 'EWHAT' }] }, 'ERR_INVALID_ARGUMENT'],
    ['negative errno', { image, 'inject-error': [{ event: 'none', errno: -5 }] }, 'ERR_INVALID_ARGUMENT'],
    ['sector below -1', { image, 'inject-error': [{ event: 'none', sector: -2 }] }, 'ERR_INVALID_ARGUMENT'],
    ['unknown rule key', { image, 'inject-error': [{ event: 'none', offset: 1 }] }, 'ERR_INVALID_ARGUMENT'],
    ['once not boolean', { image, 'inject-error': [{ event: 'none', once: 'yes' }] }, 'ERR_INVALID_ARGUMENT'],
    ['fractional state', { image, 'set-state': [{ event: 'none', state: 1.5, new_state: 2 }] }, 'ERR_INVALID_ARGUMENT'],
    ['unknown permission', { image, 'take-child-perms': ['graph-mod'] }, 'ERR_INVALID_ARGUMENT'],
    ['config file', { image, config: '/etc/blkdebug.conf' }, 'ERR_NOT_IMPLEMENTED'],
    ['opt-write-zero', { image, 'opt-write-zero': 4096 }, 'ERR_NOT_IMPLEMENTED'],
    ['opt-discard', { image, 'opt-discard': 4096 }, 'ERR_NOT_IMPLEMENTED'],
  ];
  for (const [what, opts, code] of bad) t.throws(() => new BlkdebugDriver(opts as BlkdebugOptions), { code }, what);
  const ok = new BlkdebugDriver({ image, align: 512, 'max-transfer': 1024, 'take-child-perms': ['write'], 'unshare-child-perms': ['resize', 'consistent-read'] });
  t.same([ok.align, ok.maxTransfer, ok.takeChildPerms, ok.unshareChildPerms], [512, 1024, ['write'], ['resize', 'consistent-read']]);
});

t.test('close waits for requests, closes the child, and later requests reject', async (t) => {
  const { io, child } = node(64 * KiB, { 'inject-error': [{ event: 'none', iotype: 'flush' }] });
  const pending = io.write(0, sectorBuf(8));
  await io.close();
  await pending;
  t.equal(child.calls.at(-1), 'close');
  await io.close();
  t.equal(child.calls.filter((c) => c === 'close').length, 1, 'idempotent');
  t.equal((await rejection(t, io.read(0, sectorBuf()), 'read after close'))?.code, 'ERR_CLOSED');
  t.throws(() => io.debugEvent('none'), { code: 'ERR_CLOSED' });
});

// ---- the rule engine against a model ----

/**
 * A model of QEMU's engine written the way block/blkdebug.c keeps it: one list per event with
 * new rules inserted at the head, a walk that activates inject-error rules by inserting each at
 * the head of the active list, and set-state rules overwriting the new state as they come.
 */
class ModelEngine {
  state = 1;
  readonly lists = new Map<string, ModelRule[]>();
  active: ModelRule[] = [];
  dirty = false;

  add(rule: ModelRule): void {
    const list = this.lists.get(rule.o.event) ?? [];
    list.unshift(rule);
    this.lists.set(rule.o.event, list);
  }

  event(event: string): void {
    let newState = this.state;
    let first = true;
    let mover: ModelRule | undefined;
    for (const rule of this.lists.get(event) ?? []) {
      if (rule.o.state !== undefined && rule.o.state !== 0 && rule.o.state !== this.state) continue;
      if (rule.kind === 'inject') {
        if (first) this.active = [];
        first = false;
        this.active.unshift(rule);
      } else {
        newState = (rule.o as BlkdebugSetStateOptions).new_state as number;
        mover = rule;
      }
    }
    if (mover) mover.hits++;
    this.state = newState;
  }

  check(offset: number, bytes: number, iotype: string): string {
    for (const rule of this.active) {
      const o = rule.o as BlkdebugInjectErrorOptions;
      const types = o.iotype ? [o.iotype] : ['read', 'write', 'write-zeroes', 'discard', 'flush'];
      const sector = o.sector ?? -1;
      if (!types.includes(iotype as BlkdebugIOType)) continue;
      if (sector !== -1 && !(bytes > 0 && sector * SECTOR >= offset && sector * SECTOR < offset + bytes)) continue;
      const errno = (o.errno as number | undefined) ?? 5;
      if (errno === 0) return 'ok';
      rule.hits++;
      if (o.once) {
        this.active = this.active.filter((r) => r !== rule);
        const list = this.lists.get(o.event) ?? [];
        this.lists.set(o.event, list.filter((r) => r !== rule));
      }
      return errno === 5 ? 'EIO' : 'ENOSPC';
    }
    return 'ok';
  }

  /** The request kinds of the driver without align or limits, as documented on BlkdebugDriver. */
  run(op: ModelOp): string {
    const bytes = op.sectors * SECTOR;
    const offset = op.sector * SECTOR;
    switch (op.kind) {
      case 'read':
        this.event('read_aio');
        return this.check(offset, bytes, 'read');
      case 'write': {
        this.event('write_aio');
        this.event('pwritev');
        const r = this.check(offset, bytes, 'write');
        this.event('pwritev_done');
        this.dirty = true;
        return r;
      }
      case 'zeroes': {
        this.event('pwritev_zero');
        const r = this.check(offset, bytes, 'write-zeroes');
        this.event('pwritev_done');
        this.dirty = true;
        return r;
      }
      case 'discard':
        this.dirty = true;
        return this.check(offset, bytes, 'discard');
      case 'flush': {
        this.event('flush_to_os');
        if (!this.dirty) return 'ok';
        this.event('flush_to_disk');
        const r = this.check(0, 0, 'flush');
        if (r === 'ok') this.dirty = false;
        return r;
      }
      case 'status':
        return this.check(offset, bytes, 'block-status');
    }
  }
}

interface ModelRule {
  kind: 'inject' | 'set';
  o: BlkdebugInjectErrorOptions | BlkdebugSetStateOptions;
  hits: number;
}

interface ModelOp {
  kind: 'read' | 'write' | 'zeroes' | 'discard' | 'flush' | 'status';
  sector: number;
  sectors: number;
}

const MODEL_SECTORS = 16;
const modelEvents: BlkdebugEvent[] = ['none', 'read_aio', 'write_aio', 'pwritev', 'pwritev_zero', 'pwritev_done', 'flush_to_os', 'flush_to_disk'];
const stateArb = fc.option(fc.integer({ min: 0, max: 3 }), { nil: undefined });
const injectArb: fc.Arbitrary<BlkdebugInjectErrorOptions> = fc.record(
  {
    event: fc.constantFrom(...modelEvents),
    state: stateArb,
    iotype: fc.option(fc.constantFrom<BlkdebugIOType>('read', 'write', 'write-zeroes', 'discard', 'flush', 'block-status'), { nil: undefined }),
    errno: fc.option(fc.constantFrom(0, 5, 28), { nil: undefined }),
    sector: fc.option(fc.integer({ min: -1, max: MODEL_SECTORS - 1 }), { nil: undefined }),
    once: fc.option(fc.boolean(), { nil: undefined }),
    immediately: fc.option(fc.boolean(), { nil: undefined }),
  },
  { requiredKeys: ['event'] },
);
const setStateArb: fc.Arbitrary<BlkdebugSetStateOptions> = fc.record({
  event: fc.constantFrom(...modelEvents),
  state: stateArb,
  new_state: fc.integer({ min: 1, max: 3 }),
});
const opArb: fc.Arbitrary<ModelOp> = fc
  .record({
    kind: fc.constantFrom<ModelOp['kind']>('read', 'write', 'zeroes', 'discard', 'flush', 'status'),
    sector: fc.integer({ min: 0, max: MODEL_SECTORS - 1 }),
    sectors: fc.integer({ min: 1, max: 4 }),
  })
  .map((op) => ({ ...op, sectors: Math.min(op.sectors, MODEL_SECTORS - op.sector) }));

/** Removes keys whose value is undefined, as a JSON round trip would. */
function clean<T extends object>(o: T): T {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T;
}

t.test('property: random rule sets and requests agree with a model of QEMU’s engine', async (t) => {
  await fc.assert(
    fc.asyncProperty(fc.array(injectArb, { maxLength: 5 }), fc.array(setStateArb, { maxLength: 4 }), fc.array(opArb, { minLength: 1, maxLength: 25 }), async (injects, setStates, ops) => {
      const inject = injects.map(clean);
      const setState = setStates.map(clean);
      const io = new BlkdebugDriver({ image: new MemoryDriver({ length: MODEL_SECTORS * SECTOR }), 'inject-error': inject, 'set-state': setState });
      const model = new ModelEngine();
      const modelRules: ModelRule[] = [...inject.map((o) => ({ kind: 'inject' as const, o, hits: 0 })), ...setState.map((o) => ({ kind: 'set' as const, o, hits: 0 }))];
      for (const r of modelRules) model.add(r);
      model.event('none');
      const rules = io.rules;
      for (const [i, op] of ops.entries()) {
        const offset = op.sector * SECTOR;
        const bytes = op.sectors * SECTOR;
        const call =
          op.kind === 'read' ? io.read(offset, new Uint8Array(bytes))
          : op.kind === 'write' ? io.write(offset, new Uint8Array(bytes).fill(1))
          : op.kind === 'zeroes' ? io.writeZeroes(offset, bytes)
          : op.kind === 'discard' ? io.discard(offset, bytes)
          : op.kind === 'flush' ? io.flush()
          : io.blockStatus(offset, bytes);
        const got = await outcome(call);
        const want = model.run(op);
        if (got !== want) throw new Error(`op ${i} ${JSON.stringify(op)}: driver ${got}, model ${want}`);
        if (io.state !== model.state) throw new Error(`op ${i}: driver state ${io.state}, model ${model.state}`);
      }
      const hits = rules.map((r) => r.hits);
      const modelHits = modelRules.map((r) => r.hits);
      if (JSON.stringify(hits) !== JSON.stringify(modelHits)) throw new Error(`hits ${JSON.stringify(hits)} vs model ${JSON.stringify(modelHits)}`);
      await io.close();
    }),
    { numRuns: 300, seed: 0x0b1d },
  );
  t.pass('300 random rule sets agreed');
});
