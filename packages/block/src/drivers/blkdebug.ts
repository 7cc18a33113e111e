import { setImmediate as nextTurn } from 'node:timers/promises';
import { ShearError, alignDown, alignUp, assertRange, isPowerOfTwo } from '@shear/base';
import { codeForErrno } from '@shear/native';
import { RequestTracker } from './request-tracker.js';
import type { BlockIO, BlockStatusExtent, WriteOptions, WriteZeroesOptions } from '../io.js';
import { isResizable } from '../capabilities.js';
import {
  BlkdebugRuleEngine,
  type BlkdebugEvent,
  type BlkdebugIOType,
  type BlkdebugInjectErrorOptions,
  type BlkdebugInjectErrorRule,
  type BlkdebugRule,
  type BlkdebugSetStateOptions,
  type BlkdebugSetStateRule,
} from './blkdebug-rules.js';

/** QEMU's limit for align, max-transfer, max-write-zero and max-discard (INT_MAX, exclusive). */
const BLKDEBUG_LIMIT_BYTES = 2 ** 31 - 1;

/** QEMU's BlockPermission names, for take-child-perms and unshare-child-perms. */
export const BLKDEBUG_CHILD_PERMISSIONS = ['consistent-read', 'write', 'write-unchanged', 'resize'] as const;
export type BlkdebugChildPermission = (typeof BLKDEBUG_CHILD_PERMISSIONS)[number];

/** QEMU's BlockdevOptionsBlkdebug, with the child as a BlockIO. */
export interface BlkdebugOptions {
  image: BlockIO;
  'inject-error'?: BlkdebugInjectErrorOptions[];
  'set-state'?: BlkdebugSetStateOptions[];
  /** Request alignment in bytes (a power of two); default 1. Requests are padded to it (read-modify-write for writes). */
  align?: number;
  /** Largest request the node passes on (a multiple of align); default 0: no limit. */
  'max-transfer'?: number;
  /** Largest write-zeroes piece (a multiple of align); default 0: no limit. */
  'max-write-zero'?: number;
  /** Largest discard piece (a multiple of align); default 0: no limit. */
  'max-discard'?: number;
  /** Not implemented: rejected with ERR_NOT_IMPLEMENTED. */
  'opt-write-zero'?: number;
  /** Not implemented: rejected with ERR_NOT_IMPLEMENTED. */
  'opt-discard'?: number;
  /** Not implemented (rules from a file): rejected with ERR_NOT_IMPLEMENTED. */
  config?: string;
  /** Permissions the graph should take on the child besides the usual ones (kept here, applied by the graph). */
  'take-child-perms'?: BlkdebugChildPermission[];
  /** Permissions the graph should not share on the child (kept here, applied by the graph). */
  'unshare-child-perms'?: BlkdebugChildPermission[];
}

const OPTION_KEYS: ReadonlySet<string> = new Set([
  'image',
  'inject-error',
  'set-state',
  'align',
  'max-transfer',
  'max-write-zero',
  'max-discard',
  'opt-write-zero',
  'opt-discard',
  'config',
  'take-child-perms',
  'unshare-child-perms',
]);

/**
 * QEMU's `blkdebug` filter: passes every request to its child (`image`) unless an inject-error
 * rule fails it first. The rule engine and the order of set-state and inject-error are
 * described on BlkdebugRuleEngine. This class decides which events a request raises, in which
 * order, and which (offset, bytes, iotype) it checks against the active rules. It raises what
 * QEMU raises on a blkdebug node under a `raw` format node (`raw` -> `blkdebug` -> `file`),
 * since in Shear no parent raises read_aio/write_aio on its child:
 *
 * - construction: `none` (so rules on `none` are active from the start, as in QEMU).
 * - read: split into max-transfer pieces (the parent splits, as raw does in QEMU); each piece
 *   raises `read_aio`, is padded to align, and checks `read` on each max-transfer part of
 *   the padded range. Parts past the end (padding of an unaligned length) read as zeroes.
 * - write: split into max-transfer pieces; each raises `write_aio`, then, when unaligned, the
 *   read-modify-write: `pwritev_rmw_head` / `pwritev_rmw_tail`, a padded read (checks `read`),
 *   `pwritev_rmw_after_head` / `..._after_tail` (one read for both when head and tail share
 *   the padded buffer, as QEMU's bdrv_padding_rmw_read); then `pwritev`, `write` checks on
 *   each max-transfer part, and `pwritev_done` (also when the write failed).
 * - writeZeroes: when unaligned, the read-modify-write as above and the head and tail units
 *   written as data (`pwritev` ... `pwritev_done`); the aligned middle raises `pwritev_zero`,
 *   checks `write-zeroes` on each max-write-zero part, then `pwritev_done`. No write_aio
 *   (QEMU's raw raises none for zeroes). With fastOnly, an unaligned request rejects with
 *   ERR_NOT_IMPLEMENTED before anything happens.
 * - discard: no event. Only the whole align units inside the range are discarded (QEMU drops
 *   the unaligned head and tail); each max-discard part checks `discard`.
 * - flush: `flush_to_os`; then, only if something was written, zeroed or discarded since the
 *   last successful flush (QEMU's write generation), `flush_to_disk` and a `flush` check at
 *   (0, 0). The child's flush runs unless the check failed.
 * - blockStatus: no event; checks `block-status` over the range widened to align, then asks
 *   the child.
 * - Zero-length requests do nothing at all: no events, no checks.
 *
 * A failed check rejects with the errno's code as for a real system error (codeForErrno: EIO
 * -> ERR_IO, ENOSPC -> ERR_NO_SPACE, EACCES -> ERR_PERMISSION_DENIED, ENOTSUP ->
 * ERR_IO_UNSUPPORTED, ...), context.errno = the name, and a cause shaped like Node's system
 * errors. The child is not called for that part (earlier parts of a split request did reach
 * it, as in QEMU). `immediately: false` (the default) rejects after one turn of the event loop,
 * as QEMU reschedules the coroutine before returning the error; `immediately: true` rejects
 * without yielding. Either way the rule engine has already acted when the check runs.
 *
 * Deliberate differences from QEMU 7.2: a failed read of the read-modify-write fails the write
 * (QEMU ignores the error and writes the unread bytes); writes never grow the child (padding
 * past the end of an unaligned child is not written); the node owns its child and closes it on
 * close().
 *
 * With align > 1, writes and zero writes hold their padded range against each other (as QEMU
 * makes padded requests serialising), so concurrent unaligned writes into one unit all land.
 */
export class BlkdebugDriver implements BlockIO {
  readonly align: number;
  readonly maxTransfer: number;
  readonly maxWriteZero: number;
  readonly maxDiscard: number;
  readonly takeChildPerms: readonly BlkdebugChildPermission[];
  readonly unshareChildPerms: readonly BlkdebugChildPermission[];
  readonly #child: BlockIO;
  readonly #engine = new BlkdebugRuleEngine();
  readonly #writeLock = new RangeLock();
  readonly #requests = new RequestTracker();
  #writeGen = 0;
  #flushedGen = 0;

  /** @throws ERR_INVALID_ARGUMENT for bad options or rules, ERR_NOT_IMPLEMENTED for config, opt-write-zero, opt-discard */
  constructor(options: BlkdebugOptions) {
    if (typeof options !== 'object' || options === null) {
      throw new ShearError('ERR_INVALID_ARGUMENT', 'Cannot open blkdebug node: options must be an object');
    }
    for (const key of Object.keys(options)) {
      if (!OPTION_KEYS.has(key)) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open blkdebug node: unknown option '${key}'`);
    }
    for (const key of ['config', 'opt-write-zero', 'opt-discard'] as const) {
      if (options[key] !== undefined) throw new ShearError('ERR_NOT_IMPLEMENTED', `Cannot open blkdebug node: option '${key}' is not implemented`);
    }
    if (typeof options.image !== 'object' || options.image === null) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open blkdebug node: 'image' (the child) is missing`);
    }
    this.#child = options.image;
    const align = sizeOption(options.align, 'align');
    if (align !== 0 && !isPowerOfTwo(align)) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open blkdebug node: align ${align} must be a power of two`);
    }
    this.align = align === 0 ? 1 : align;
    this.maxTransfer = this.#limit(options['max-transfer'], 'max-transfer');
    this.maxWriteZero = this.#limit(options['max-write-zero'], 'max-write-zero');
    this.maxDiscard = this.#limit(options['max-discard'], 'max-discard');
    this.takeChildPerms = permissionList(options['take-child-perms'], 'take-child-perms');
    this.unshareChildPerms = permissionList(options['unshare-child-perms'], 'unshare-child-perms');
    // QEMU adds all inject-error rules, then all set-state rules.
    for (const rule of listOption(options['inject-error'], 'inject-error')) this.#engine.addInjectError(rule);
    for (const rule of listOption(options['set-state'], 'set-state')) this.#engine.addSetState(rule);
    this.#engine.event('none');
  }

  get length(): number {
    return this.#child.length;
  }

  /** The rule engine's state (1 at start); settable for tests. */
  get state(): number {
    return this.#engine.state;
  }

  set state(value: number) {
    this.#engine.state = value;
  }

  /** Live rules in order of addition; each carries `hits`, how often it acted. */
  get rules(): readonly BlkdebugRule[] {
    return this.#engine.rules;
  }

  get activeRules(): readonly BlkdebugInjectErrorRule[] {
    return this.#engine.activeRules;
  }

  /** Adds a rule after construction (it acts from its event's next occurrence). */
  addRule(action: 'inject-error', options: BlkdebugInjectErrorOptions): BlkdebugInjectErrorRule;
  addRule(action: 'set-state', options: BlkdebugSetStateOptions): BlkdebugSetStateRule;
  addRule(action: 'inject-error' | 'set-state', options: BlkdebugInjectErrorOptions | BlkdebugSetStateOptions): BlkdebugRule {
    if (action === 'inject-error') return this.#engine.addInjectError(options as BlkdebugInjectErrorOptions);
    if (action === 'set-state') return this.#engine.addSetState(options as BlkdebugSetStateOptions);
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot add blkdebug rule: unknown action '${String(action)}'`);
  }

  removeRule(rule: BlkdebugRule): boolean {
    return this.#engine.remove(rule);
  }

  /** How often `event` was raised on this node. */
  eventCount(event: BlkdebugEvent): number {
    return this.#engine.eventCount(event);
  }

  /**
   * Raises an event as a parent would (a format driver raising l2_update on its file child).
   * Events the node raises itself (see the class comment) should not be raised again.
   */
  debugEvent(event: BlkdebugEvent): void {
    if (this.#requests.closed) throw new ShearError('ERR_CLOSED', 'Cannot raise a blkdebug event: the node is closed');
    this.#engine.event(event);
  }

  read(offset: number, buf: Uint8Array): Promise<void> {
    return this.#request('read', offset, buf.length, async () => {
      if (buf.length === 0) return;
      for (const [at, bytes] of pieces(offset, buf.length, this.maxTransfer)) {
        this.#engine.event('read_aio');
        await this.#paddedRead(at, buf.subarray(at - offset, at - offset + bytes));
      }
    });
  }

  write(offset: number, buf: Uint8Array, opts: WriteOptions = {}): Promise<void> {
    return this.#request('write', offset, buf.length, async () => {
      if (buf.length === 0) return;
      for (const [at, bytes] of pieces(offset, buf.length, this.maxTransfer)) {
        this.#engine.event('write_aio');
        try {
          await this.#paddedWrite(at, buf.subarray(at - offset, at - offset + bytes), opts);
        } finally {
          this.#writeGen++;
        }
      }
    });
  }

  writeZeroes(offset: number, bytes: number, opts: WriteZeroesOptions = {}): Promise<void> {
    return this.#request('write zeroes to', offset, bytes, async () => {
      if (bytes === 0) return;
      const start = alignDown(offset, this.align);
      const end = alignUp(offset + bytes, this.align);
      if (opts.fastOnly && (start !== offset || end !== offset + bytes)) {
        throw new ShearError('ERR_NOT_IMPLEMENTED', `Cannot write zeroes fast to (${offset}, ${bytes}) of the blkdebug node: not aligned to ${this.align}`, { offset, bytes, op: 'write-zeroes' });
      }
      try {
        await this.#withWriteLock(start, end, () => this.#zeroes(offset, bytes, opts));
      } finally {
        this.#writeGen++;
      }
    });
  }

  discard(offset: number, bytes: number): Promise<void> {
    return this.#request('discard', offset, bytes, async () => {
      if (bytes === 0) return;
      try {
        const start = alignUp(offset, this.align);
        const end = alignDown(offset + bytes, this.align);
        const unit = this.maxDiscard === 0 ? 0 : alignDown(this.maxDiscard, this.align);
        for (const [at, n] of pieces(start, Math.max(0, end - start), unit)) {
          await this.#check(at, n, 'discard', 'discard');
          await this.#child.discard(at, n);
        }
      } finally {
        this.#writeGen++;
      }
    });
  }

  flush(): Promise<void> {
    return this.#request('flush', 0, 0, async () => {
      this.#engine.event('flush_to_os');
      const gen = this.#writeGen;
      const dirty = gen !== this.#flushedGen;
      if (dirty) {
        this.#engine.event('flush_to_disk');
        await this.#check(0, 0, 'flush', 'flush');
      }
      await this.#child.flush();
      // Generations only grow; a flush that started earlier must not move this back.
      if (dirty) this.#flushedGen = Math.max(this.#flushedGen, gen);
    });
  }

  blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    return this.#request('query block status of', offset, bytes, async () => {
      if (bytes === 0) return [];
      const start = alignDown(offset, this.align);
      await this.#check(start, alignUp(offset + bytes, this.align) - start, 'block-status', 'query block status of');
      return this.#child.blockStatus(offset, bytes);
    });
  }

  /** A resize goes to the image, as QEMU's blkdebug forwards truncate (a qcow2 above grows its file). */
  truncate(length: number): Promise<void> {
    const child = this.#child;
    if (!isResizable(child)) {
      return Promise.reject(new ShearError('ERR_NOT_IMPLEMENTED', 'Cannot resize blkdebug node: its image cannot be resized'));
    }
    return this.#request('resize', 0, 0, () => child.truncate(length));
  }

  /** Waits for requests in flight, then closes the child. Idempotent. */
  close(): Promise<void> {
    return this.#requests.close(() => this.#child.close());
  }

  // ---- request plumbing ----

  /** Checks the node is open and the range valid, then runs the request, tracked for close(). */
  #request<T>(action: string, offset: number, bytes: number, fn: () => Promise<T>): Promise<T> {
    try {
      if (this.#requests.closed) throw new ShearError('ERR_CLOSED', `Cannot ${action} the blkdebug node: it is closed`);
      assertRange(offset, bytes, this.length, 'range of the blkdebug node');
    } catch (err) {
      return Promise.reject(err);
    }
    const run = fn();
    return this.#requests.track(run);
  }

  /** Fails the part (offset, bytes) of a request when an active rule says so. */
  async #check(offset: number, bytes: number, iotype: BlkdebugIOType, action: string): Promise<void> {
    const rule = this.#engine.check(offset, bytes, iotype);
    if (!rule) return;
    if (!rule.immediately) await nextTurn();
    const name = rule.errno as string;
    const cause = Object.assign(new Error(`${name}: injected by blkdebug rule ${rule.id} (event ${rule.event})`), {
      code: name,
      errno: -rule.errnoNumber,
      syscall: 'blkdebug',
    });
    throw new ShearError(
      codeForErrno(name),
      `Cannot ${action} (${offset}, ${bytes}) of the blkdebug node: ${name} injected by rule ${rule.id} (event ${rule.event})`,
      { offset, bytes, op: iotype, errno: name },
      { cause },
    );
  }

  /** Part size for splitting the aligned requests the node serves: max-transfer, 0 for none. */
  get #transferUnit(): number {
    return this.maxTransfer === 0 ? 0 : alignDown(this.maxTransfer, this.align);
  }

  /** Reads (offset, target.length), padding it to align. */
  async #paddedRead(offset: number, target: Uint8Array): Promise<void> {
    const start = alignDown(offset, this.align);
    const end = alignUp(offset + target.length, this.align);
    if (start === offset && end === offset + target.length) return this.#alignedRead(offset, target);
    const bounce = new Uint8Array(end - start);
    await this.#alignedRead(start, bounce);
    target.set(bounce.subarray(offset - start, offset - start + target.length));
  }

  /**
   * Reads an aligned range: each max-transfer part up to the aligned end of the child is
   * checked and read (the child part clipped to its length); the rest reads as zeroes.
   */
  async #alignedRead(offset: number, buf: Uint8Array): Promise<void> {
    const length = this.length;
    const served = Math.max(0, Math.min(buf.length, alignUp(length, this.align) - offset));
    for (const [at, n] of pieces(offset, served, this.#transferUnit)) {
      await this.#check(at, n, 'read', 'read');
      const inChild = Math.max(0, Math.min(n, length - at));
      if (inChild > 0) await this.#child.read(at, buf.subarray(at - offset, at - offset + inChild));
      buf.fill(0, at - offset + inChild, at - offset + n);
    }
    buf.fill(0, served);
  }

  /** Writes (offset, data), with read-modify-write of partial align units. */
  async #paddedWrite(offset: number, data: Uint8Array, opts: WriteOptions): Promise<void> {
    const start = alignDown(offset, this.align);
    const end = alignUp(offset + data.length, this.align);
    await this.#withWriteLock(start, end, async () => {
      if (start === offset && end === offset + data.length) return this.#alignedWrite(offset, data, opts);
      const bounce = new Uint8Array(end - start);
      await this.#readForPadding(start, end, offset, offset + data.length, bounce);
      bounce.set(data, offset - start);
      return this.#alignedWrite(start, bounce, opts);
    });
  }

  /**
   * Reads the partial units at the edges of [reqStart, reqEnd) into bounce (which covers the
   * padded [start, end)), raising QEMU's pwritev_rmw events. Returns whether head and tail were
   * read together (the padded range is one buffer: one unit, or two with a head and a tail).
   */
  async #readForPadding(start: number, end: number, reqStart: number, reqEnd: number, bounce: Uint8Array): Promise<boolean> {
    const a = this.align;
    const head = reqStart - start;
    const tail = end - reqEnd;
    const bufferBytes = end - start > a && head > 0 && tail > 0 ? 2 * a : a;
    const merged = end - start === bufferBytes;
    if (head > 0 || merged) {
      if (head > 0) this.#engine.event('pwritev_rmw_head');
      if (merged && tail > 0) this.#engine.event('pwritev_rmw_tail');
      await this.#alignedRead(start, bounce.subarray(0, merged ? bufferBytes : a));
      if (head > 0) this.#engine.event('pwritev_rmw_after_head');
      if (merged && tail > 0) this.#engine.event('pwritev_rmw_after_tail');
      if (merged) return true;
    }
    if (tail > 0) {
      this.#engine.event('pwritev_rmw_tail');
      await this.#alignedRead(end - a, bounce.subarray(end - a - start));
      this.#engine.event('pwritev_rmw_after_tail');
    }
    return false;
  }

  /** Writes an aligned range as data: pwritev, a check and a child write per part, pwritev_done. */
  async #alignedWrite(offset: number, data: Uint8Array, opts: WriteOptions): Promise<void> {
    const length = this.length;
    this.#engine.event('pwritev');
    try {
      for (const [at, n] of pieces(offset, data.length, this.#transferUnit)) {
        await this.#check(at, n, 'write', 'write');
        const inChild = Math.max(0, Math.min(n, length - at));
        if (inChild > 0) await this.#child.write(at, data.subarray(at - offset, at - offset + inChild), opts);
      }
    } finally {
      this.#engine.event('pwritev_done');
    }
  }

  /** writeZeroes under the write lock: QEMU's bdrv_co_do_zero_pwritev on this node. */
  async #zeroes(offset: number, bytes: number, opts: WriteZeroesOptions): Promise<void> {
    const a = this.align;
    const end = offset + bytes;
    const start = alignDown(offset, a);
    const paddedEnd = alignUp(end, a);
    let pos = offset;
    let tailUnit: Uint8Array | undefined;
    const dataOpts: WriteOptions = opts.fua ? { fua: true } : {};
    if (start !== offset || paddedEnd !== end) {
      const bounce = new Uint8Array(paddedEnd - start);
      const merged = await this.#readForPadding(start, paddedEnd, offset, end, bounce);
      bounce.fill(0, offset - start, end - start);
      if (offset !== start || merged) {
        const headBytes = merged ? paddedEnd - start : a;
        await this.#alignedWrite(start, bounce.subarray(0, headBytes), dataOpts);
        if (merged) return;
        pos = start + a;
      }
      if (paddedEnd !== end) tailUnit = bounce.subarray(paddedEnd - a - start);
    }
    const middleEnd = alignDown(end, a);
    if (middleEnd > pos) {
      const length = this.length;
      const unit = this.maxWriteZero === 0 ? 0 : alignDown(this.maxWriteZero, a);
      this.#engine.event('pwritev_zero');
      try {
        for (const [at, n] of pieces(pos, middleEnd - pos, unit)) {
          await this.#check(at, n, 'write-zeroes', 'write zeroes to');
          const inChild = Math.max(0, Math.min(n, length - at));
          if (inChild > 0) await this.#child.writeZeroes(at, inChild, opts);
        }
      } finally {
        this.#engine.event('pwritev_done');
      }
    }
    if (tailUnit) await this.#alignedWrite(paddedEnd - a, tailUnit, dataOpts);
  }

  /** Runs fn holding [start, end) against other writes; without an alignment nothing needs serialising. */
  async #withWriteLock<T>(start: number, end: number, fn: () => Promise<T>): Promise<T> {
    if (this.align === 1) return fn();
    const release = await this.#writeLock.acquire(start, end);
    try {
      return await fn();
    } finally {
      release();
    }
  }

  #limit(value: unknown, name: string): number {
    const bytes = sizeOption(value, name);
    if (bytes % this.align !== 0) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open blkdebug node: ${name} ${bytes} must be a multiple of align ${this.align}`);
    }
    return bytes;
  }
}

/** [offset, bytes] pieces of at most `unit` bytes (0: one piece); none for zero bytes. */
function* pieces(offset: number, bytes: number, unit: number): Generator<[number, number]> {
  const step = unit === 0 ? Math.max(bytes, 1) : unit;
  for (let at = offset, end = offset + bytes; at < end; at += step) yield [at, Math.min(step, end - at)];
}

function sizeOption(value: unknown, name: string): number {
  if (value === undefined) return 0;
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0 || value >= BLKDEBUG_LIMIT_BYTES) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open blkdebug node: ${name} ${String(value)} must be an integer from 0 to ${BLKDEBUG_LIMIT_BYTES - 1}`);
  }
  return value;
}

function listOption<T>(value: T[] | undefined, name: string): T[] {
  if (value === undefined) return [];
  if (!Array.isArray(value)) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open blkdebug node: '${name}' must be a list`);
  return value;
}

function permissionList(value: unknown, name: string): readonly BlkdebugChildPermission[] {
  const list = listOption(value as unknown[] | undefined, name);
  for (const p of list) {
    if (!(BLKDEBUG_CHILD_PERMISSIONS as readonly unknown[]).includes(p)) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot open blkdebug node: unknown permission '${String(p)}' in '${name}'`);
    }
  }
  return [...list] as BlkdebugChildPermission[];
}

/**
 * Exclusive locks on byte ranges: acquire waits until no held range overlaps. Waiters retry
 * when any overlapping holder releases, so a long queue on one unit is served in no fixed order.
 */
class RangeLock {
  readonly #held = new Set<{ start: number; end: number; released: Promise<void> }>();

  async acquire(start: number, end: number): Promise<() => void> {
    for (;;) {
      const blocker = [...this.#held].find((h) => h.start < end && start < h.end);
      if (!blocker) break;
      await blocker.released;
    }
    let release!: () => void;
    const entry = { start, end, released: new Promise<void>((resolve) => (release = resolve)) };
    this.#held.add(entry);
    return () => {
      this.#held.delete(entry);
      release();
    };
  }
}
