import { constants as osConstants } from 'node:os';
import { ShearError } from '@shear/base';

/**
 * QEMU 7.2's BlkdebugEvent names (qapi/block-core.json), in QAPI order. Every name is accepted in
 * a rule; which ones the blkdebug node raises by itself is documented on BlkdebugDriver. The
 * others (l2_update, cluster_alloc, ...) fire only when a parent raises them with debugEvent().
 */
export const BLKDEBUG_EVENTS = [
  'l1_update',
  'l1_grow_alloc_table',
  'l1_grow_write_table',
  'l1_grow_activate_table',
  'l2_load',
  'l2_update',
  'l2_update_compressed',
  'l2_alloc_cow_read',
  'l2_alloc_write',
  'read_aio',
  'read_backing_aio',
  'read_compressed',
  'write_aio',
  'write_compressed',
  'vmstate_load',
  'vmstate_save',
  'cow_read',
  'cow_write',
  'reftable_load',
  'reftable_grow',
  'reftable_update',
  'refblock_load',
  'refblock_update',
  'refblock_update_part',
  'refblock_alloc',
  'refblock_alloc_hookup',
  'refblock_alloc_write',
  'refblock_alloc_write_blocks',
  'refblock_alloc_write_table',
  'refblock_alloc_switch_table',
  'cluster_alloc',
  'cluster_alloc_bytes',
  'cluster_free',
  'flush_to_os',
  'flush_to_disk',
  'pwritev_rmw_head',
  'pwritev_rmw_after_head',
  'pwritev_rmw_tail',
  'pwritev_rmw_after_tail',
  'pwritev',
  'pwritev_zero',
  'pwritev_done',
  'empty_image_prepare',
  'l1_shrink_write_table',
  'l1_shrink_free_l2_clusters',
  'cor_write',
  'cluster_alloc_space',
  'none',
] as const;
export type BlkdebugEvent = (typeof BLKDEBUG_EVENTS)[number];

/** QEMU's BlkdebugIOType: the kind of request a rule may fail. */
export const BLKDEBUG_IO_TYPES = ['read', 'write', 'write-zeroes', 'discard', 'flush', 'block-status'] as const;
export type BlkdebugIOType = (typeof BLKDEBUG_IO_TYPES)[number];

/** What an inject-error rule without `iotype` fails: everything but block-status (as QEMU). */
export const BLKDEBUG_DEFAULT_IO_TYPES: readonly BlkdebugIOType[] = ['read', 'write', 'write-zeroes', 'discard', 'flush'];

/** QEMU's sector unit for the `sector` option. */
export const BLKDEBUG_SECTOR_BYTES = 512;

/** QEMU's BlkdebugInjectErrorOptions. */
export interface BlkdebugInjectErrorOptions {
  event: BlkdebugEvent;
  /** Only activate in this state; default (or 0): any state. */
  state?: number;
  /** Only fail requests of this type; default BLKDEBUG_DEFAULT_IO_TYPES. */
  iotype?: BlkdebugIOType;
  /**
   * The errno to fail with: a Linux number as QEMU takes it (5, 28) or, as an extension, a name
   * ('EIO', 'ENOSPC'). Default EIO. 0 matches but fails nothing (as in QEMU), which shadows
   * later rules for the requests it matches.
   */
  errno?: number | string;
  /** Only fail requests that contain byte sector * 512; default -1: any request. */
  sector?: number;
  /** Remove the rule after it failed a request. */
  once?: boolean;
  /** Reject without yielding to the event loop first (see BlkdebugDriver). */
  immediately?: boolean;
}

/** QEMU's BlkdebugSetStateOptions; QEMU 7.2 spells the target `new_state`, `new-state` is accepted too. */
export interface BlkdebugSetStateOptions {
  event: BlkdebugEvent;
  /** Only apply in this state; default (or 0): any state. */
  state?: number;
  new_state?: number;
  'new-state'?: number;
}

interface RuleBase {
  /** Order of addition; earlier rules win where QEMU's order decides. */
  readonly id: number;
  readonly event: BlkdebugEvent;
  /** 0: any state. */
  readonly state: number;
  /** How often the rule acted: requests failed (inject-error) or events that moved the state (set-state). */
  readonly hits: number;
  /** Removed by removeRule or, for a `once` rule, by firing. */
  readonly removed: boolean;
}

export interface BlkdebugInjectErrorRule extends RuleBase {
  readonly action: 'inject-error';
  readonly iotypes: readonly BlkdebugIOType[];
  /** errno name, or undefined for errno 0. */
  readonly errno: string | undefined;
  readonly errnoNumber: number;
  readonly sector: number;
  readonly once: boolean;
  readonly immediately: boolean;
}

export interface BlkdebugSetStateRule extends RuleBase {
  readonly action: 'set-state';
  readonly newState: number;
}

export type BlkdebugRule = BlkdebugInjectErrorRule | BlkdebugSetStateRule;

type InjectRule = { -readonly [K in keyof BlkdebugInjectErrorRule]: BlkdebugInjectErrorRule[K] };
type SetStateRule = { -readonly [K in keyof BlkdebugSetStateRule]: BlkdebugSetStateRule[K] };
type MutableRule = InjectRule | SetStateRule;

const EVENT_SET: ReadonlySet<string> = new Set(BLKDEBUG_EVENTS);
const IO_TYPE_SET: ReadonlySet<string> = new Set(BLKDEBUG_IO_TYPES);
const ERRNO_BY_NAME = osConstants.errno as Readonly<Record<string, number>>;
const ERRNO_NAME_BY_NUMBER: ReadonlyMap<number, string> = (() => {
  const map = new Map<number, string>();
  // Aliases (EWOULDBLOCK = EAGAIN, EDEADLOCK = EDEADLK, ENOTSUP = EOPNOTSUPP on Linux): the
  // first name os.constants lists for a number is the one reported.
  for (const [name, n] of Object.entries(ERRNO_BY_NAME)) if (!map.has(n)) map.set(n, name);
  return map;
})();
const INJECT_KEYS: ReadonlySet<string> = new Set(['event', 'state', 'iotype', 'errno', 'sector', 'once', 'immediately']);
const SET_STATE_KEYS: ReadonlySet<string> = new Set(['event', 'state', 'new_state', 'new-state']);

/**
 * QEMU's blkdebug rule engine, without I/O (block/blkdebug.c, read for its semantics):
 *
 * - `event(e)` looks at the rules for `e` whose `state` is 0 or equals the current state. The
 *   state is read once, before any rule acts, so set-state and inject-error rules of one event
 *   all see the state from before the event: a rule `{set-state write_aio 1->2}` next to
 *   `{inject-error write_aio state 2}` lets the first write through and fails the second.
 *   - If at least one inject-error rule matches, they REPLACE the active set (in the order
 *     they were added). If none matches, the active set is left as it was: rules stay active
 *     across requests and events until another event activates inject-error rules, or a `once`
 *     rule fires. (So a rule on `read_aio` with the default iotypes, once activated by a read,
 *     also fails later writes; use `iotype` to prevent that.)
 *   - Matching set-state rules move the state after all rules were looked at; when several
 *     match, the one added first wins.
 * - `check(offset, bytes, iotype)` is what a request runs after its events: the first active
 *   rule (order of addition) whose iotypes contain `iotype` and whose sector byte
 *   (sector * 512) lies in [offset, offset + bytes) (or sector -1) decides: errno 0 lets the
 *   request pass, anything else fails it; a `once` rule that fails a request is removed.
 *   A request of zero bytes only matches rules with sector -1 (flush is checked as (0, 0)).
 */
export class BlkdebugRuleEngine {
  #state = 1;
  #nextId = 1;
  /** Every live rule, in order of addition. */
  readonly #rules: MutableRule[] = [];
  /** The active inject-error rules, in order of addition. */
  #active: InjectRule[] = [];
  readonly #eventCounts = new Map<BlkdebugEvent, number>();

  /** The current state; 1 at start. Any integer may be set (tests jump straight to a state). */
  get state(): number {
    return this.#state;
  }

  set state(value: number) {
    if (!Number.isSafeInteger(value)) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot set blkdebug state ${String(value)}: must be an integer`);
    }
    this.#state = value;
  }

  /** Live rules in order of addition (a snapshot; the rule objects update their `hits`). */
  get rules(): readonly BlkdebugRule[] {
    return [...this.#rules];
  }

  /** The active inject-error rules (those a request is checked against), in order of addition. */
  get activeRules(): readonly BlkdebugInjectErrorRule[] {
    return [...this.#active];
  }

  /** How often `event` was raised. */
  eventCount(event: BlkdebugEvent): number {
    return this.#eventCounts.get(event) ?? 0;
  }

  /** @throws ERR_INVALID_ARGUMENT for an unknown event, iotype or errno, or a bad number */
  addInjectError(options: BlkdebugInjectErrorOptions): BlkdebugInjectErrorRule {
    checkKeys(options, INJECT_KEYS, 'inject-error');
    const event = parseEvent(options.event, 'inject-error');
    const state = parseInteger(options.state, 0, 'state', 'inject-error');
    const sector = parseInteger(options.sector, -1, 'sector', 'inject-error');
    if (sector < -1 || sector > Math.floor(Number.MAX_SAFE_INTEGER / BLKDEBUG_SECTOR_BYTES)) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot add blkdebug inject-error rule: sector ${sector} must be -1 (any) or a sector number`);
    }
    let iotypes: readonly BlkdebugIOType[] = BLKDEBUG_DEFAULT_IO_TYPES;
    if (options.iotype !== undefined) {
      if (typeof options.iotype !== 'string' || !IO_TYPE_SET.has(options.iotype)) {
        throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot add blkdebug inject-error rule: unknown iotype '${String(options.iotype)}'`);
      }
      iotypes = [options.iotype];
    }
    const [errnoNumber, errno] = parseErrno(options.errno);
    const rule: InjectRule = {
      action: 'inject-error',
      id: this.#nextId++,
      event,
      state,
      iotypes,
      errno,
      errnoNumber,
      sector,
      once: parseBoolean(options.once, 'once'),
      immediately: parseBoolean(options.immediately, 'immediately'),
      hits: 0,
      removed: false,
    };
    this.#rules.push(rule);
    return rule;
  }

  /** @throws ERR_INVALID_ARGUMENT for an unknown event, a missing or bad new state */
  addSetState(options: BlkdebugSetStateOptions): BlkdebugSetStateRule {
    checkKeys(options, SET_STATE_KEYS, 'set-state');
    const event = parseEvent(options.event, 'set-state');
    const state = parseInteger(options.state, 0, 'state', 'set-state');
    const a = options.new_state;
    const b = options['new-state'];
    if (a === undefined && b === undefined) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot add blkdebug set-state rule: 'new_state' is missing`);
    }
    if (a !== undefined && b !== undefined && a !== b) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot add blkdebug set-state rule: 'new_state' ${String(a)} and 'new-state' ${String(b)} differ`);
    }
    const newState = parseInteger(a ?? b, 0, 'new_state', 'set-state');
    const rule: SetStateRule = { action: 'set-state', id: this.#nextId++, event, state, newState, hits: 0, removed: false };
    this.#rules.push(rule);
    return rule;
  }

  /** Removes a rule (also from the active set). Returns false if it was not live. */
  remove(rule: BlkdebugRule): boolean {
    const at = this.#rules.indexOf(rule as MutableRule);
    if (at < 0) return false;
    this.#rules.splice(at, 1);
    (rule as MutableRule).removed = true;
    if (rule.action === 'inject-error') this.#active = this.#active.filter((r) => r !== rule);
    return true;
  }

  /** Raises an event: activates its inject-error rules and applies its set-state rules (see the class comment). */
  event(event: BlkdebugEvent): void {
    this.#eventCounts.set(event, this.eventCount(event) + 1);
    const before = this.#state;
    let activated: InjectRule[] | undefined;
    let move: SetStateRule | undefined;
    for (const rule of this.#rules) {
      if (rule.event !== event || (rule.state !== 0 && rule.state !== before)) continue;
      if (rule.action === 'inject-error') (activated ??= []).push(rule);
      else move ??= rule;
    }
    if (activated) this.#active = activated;
    if (move) {
      move.hits++;
      this.#state = move.newState;
    }
  }

  /**
   * The rule that fails a request of `iotype` over (offset, bytes), or undefined when the
   * request may go on. Counts the hit and removes a `once` rule.
   */
  check(offset: number, bytes: number, iotype: BlkdebugIOType): BlkdebugInjectErrorRule | undefined {
    const rule = this.#active.find(
      (r) =>
        r.iotypes.includes(iotype) &&
        (r.sector === -1 || (bytes > 0 && r.sector * BLKDEBUG_SECTOR_BYTES >= offset && r.sector * BLKDEBUG_SECTOR_BYTES < offset + bytes)),
    );
    if (!rule || rule.errnoNumber === 0) return undefined;
    rule.hits++;
    if (rule.once) this.remove(rule);
    return rule;
  }
}

/** The errno number and name of an `errno` option. */
function parseErrno(value: unknown): [number, string | undefined] {
  if (value === undefined) return [ERRNO_BY_NAME['EIO'] as number, 'EIO'];
  if (typeof value === 'string') {
    const n = Object.hasOwn(ERRNO_BY_NAME, value) ? ERRNO_BY_NAME[value] : undefined;
    if (n === undefined) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot add blkdebug inject-error rule: unknown errno '${value}'`);
    return [n, value];
  }
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot add blkdebug inject-error rule: errno ${String(value)} must be a non-negative integer or an errno name`);
  }
  if (value === 0) return [0, undefined];
  const name = ERRNO_NAME_BY_NUMBER.get(value);
  if (name === undefined) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot add blkdebug inject-error rule: errno ${value} is not an errno of this system`);
  return [value, name];
}

function parseEvent(value: unknown, what: string): BlkdebugEvent {
  if (typeof value !== 'string' || !EVENT_SET.has(value)) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot add blkdebug ${what} rule: unknown event '${String(value)}'`);
  }
  return value as BlkdebugEvent;
}

function parseInteger(value: unknown, fallback: number, name: string, what: string): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isSafeInteger(value)) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot add blkdebug ${what} rule: '${name}' ${String(value)} must be an integer`);
  }
  return value;
}

function parseBoolean(value: unknown, name: string): boolean {
  if (value === undefined) return false;
  if (typeof value !== 'boolean') {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot add blkdebug inject-error rule: '${name}' must be a boolean`);
  }
  return value;
}

function checkKeys(options: object, allowed: ReadonlySet<string>, what: string): void {
  if (typeof options !== 'object' || options === null) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot add blkdebug ${what} rule: options must be an object`);
  }
  for (const key of Object.keys(options)) {
    if (!allowed.has(key)) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot add blkdebug ${what} rule: unknown option '${key}'`);
  }
}
