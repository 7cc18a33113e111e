import type { Prng } from './prng.js';

/**
 * QMP inputs: byte-level mutations of valid commands, and structured ones (wrong types for
 * every argument, unknown commands and members). Seeds name only scratch objects (scratch0,
 * fz*), so an accepted input never touches the nodes and exports the NBD lanes use.
 */

export interface QmpInput {
  kind: string;
  bytes: Buffer;
  /** The daemon may close the connection after it (a message over its size limits). */
  mayClose: boolean;
}

/** Valid arguments of each command, the base of the wrong-type and mutation inputs. */
const SAMPLE_ARGS: Record<string, Record<string, unknown>> = {
  'block-dirty-bitmap-add': { node: 'scratch0', name: 'fzb', granularity: 65536, persistent: false, disabled: false },
  'block-dirty-bitmap-remove': { node: 'scratch0', name: 'fzb' },
  'block-dirty-bitmap-clear': { node: 'scratch0', name: 'fzb' },
  'block-dirty-bitmap-enable': { node: 'scratch0', name: 'fzb' },
  'block-dirty-bitmap-disable': { node: 'scratch0', name: 'fzb' },
  'block-dirty-bitmap-merge': { node: 'scratch0', target: 'fzb', bitmaps: ['fzc', { node: 'scratch0', name: 'fzd' }] },
  'x-debug-block-dirty-bitmap-sha256': { node: 'scratch0', name: 'fzb' },
  'blockdev-add': { driver: 'null-co', 'node-name': 'fzn', size: 1048576 },
  'blockdev-del': { 'node-name': 'fzn' },
  'blockdev-create': { 'job-id': 'fzc', options: { driver: 'file', filename: 'fz-created.img', size: 65536 } },
  'blockdev-backup': { 'job-id': 'fzj', device: 'scratch0', target: 'fzn', sync: 'full', speed: 0, bitmap: 'fzb', 'bitmap-mode': 'on-success', 'auto-finalize': true, 'auto-dismiss': true, 'on-source-error': 'report', 'on-target-error': 'report' },
  'block-export-add': { type: 'nbd', id: 'fze', 'node-name': 'scratch0', name: 'fze', writable: false, description: 'fz', bitmaps: ['fzb'], 'allocation-depth': true },
  'block-export-del': { id: 'fze', mode: 'safe' },
  'nbd-server-add': { device: 'scratch0', name: 'fzo', writable: false },
  'nbd-server-remove': { name: 'fzo', mode: 'hard' },
  'nbd-server-start': { addr: { type: 'unix', path: '/nonexistent/fz.sock' }, 'max-connections': 4 },
  'job-cancel': { id: 'fzj' },
  'job-pause': { id: 'fzj' },
  'job-resume': { id: 'fzj' },
  'job-complete': { id: 'fzj' },
  'job-finalize': { id: 'fzj' },
  'job-dismiss': { id: 'fzj' },
  'block-job-cancel': { device: 'fzj', force: false },
  'block-job-pause': { device: 'fzj' },
  'block-job-resume': { device: 'fzj' },
  'block-job-complete': { device: 'fzj' },
  'block-job-finalize': { id: 'fzj' },
  'block-job-dismiss': { id: 'fzj' },
  'block-job-set-speed': { device: 'fzj', speed: 1048576 },
  'job-set-speed': { id: 'fzj', speed: 1048576 },
  transaction: {
    actions: [
      { type: 'block-dirty-bitmap-add', data: { node: 'scratch0', name: 'fzt' } },
      { type: 'block-dirty-bitmap-clear', data: { node: 'scratch0', name: 'fzb' } },
    ],
    properties: { 'completion-mode': 'individual' },
  },
  'x-shear-io': { node: 'scratch0', command: 'write -P 0x5a 0 4k' },
  'x-shear-store-bitmaps': { node: 'scratch0' },
  'query-version': {},
  'query-commands': {},
  'query-block-jobs': {},
  'query-jobs': {},
  'query-named-block-nodes': {},
  'query-block-exports': {},
  'x-shear-query-resources': {},
  qmp_capabilities: {},
};

/** Commands whose success would take the campaign's own setup apart: only ever sent with arguments that must be refused. */
export const PROTECTED = new Set(['quit', 'nbd-server-stop']);

const WRONG_VALUES: unknown[] = [0, -1, 1.5, 2 ** 64, -(2 ** 63), 1e308, '', 'fz', 'x'.repeat(300), true, false, null, [], {}, [1, 'a', null], { a: 1 }, [[[]]], '\u0000', 'é'];
const UNKNOWN_COMMANDS = ['', 'fz-unknown', 'query-versio', 'QUERY-VERSION', 'query-version ', '__proto__', 'constructor', 'toString', 'hasOwnProperty', 'x-shear-', 'block-dirty-bitmap', 'blockdev-add\u0000', 'qmp_capabilities\n'];
const UNKNOWN_KEYS = ['fz-unknown', '__proto__', 'constructor', '', 'Node', 'node ', 'x-perf', 'arguments', 'execute', 'id', 'node\u0000'];
const HUGE_NUMBERS = ['1e400', '-1e400', '18446744073709551616', '18446744073709551615', '9223372036854775808', '-9223372036854775809', '9007199254740993', '123456789012345678901234567890123456789', '-0', '0.0000000000000000000000001', '1E+999999999', '00', '-', '1.', '.5', '0x10', 'NaN', 'Infinity', '1e-400'];
const BAD_UTF8 = [[0xc3, 0x28], [0xe2, 0x82], [0xc0, 0xaf], [0xed, 0xa0, 0x80], [0xf4, 0x90, 0x80, 0x80], [0x80], [0xf8, 0x88, 0x80, 0x80, 0x80], [0xef, 0xbf, 0xbf], [0xc1, 0xbf], [0xe0, 0x80, 0xaf]];
const BAD_ESCAPES = ['\\u', '\\u12', '\\uD800', '\\uDC00\\uD800', '\\x41', '\\', '\\u0000', '\\uZZZZ', '\\/', '\\\''];
const INTERESTING = [0x00, 0x7b, 0x7d, 0x5b, 0x5d, 0x22, 0x27, 0x5c, 0x2c, 0x3a, 0x0a, 0x0d, 0x09, 0x20, 0x7f, 0x80, 0xc0, 0xfe, 0xff, 0x30, 0x2d];

function obj(cmd: string, args: Record<string, unknown> | undefined, id: unknown): Record<string, unknown> {
  const o: Record<string, unknown> = { execute: cmd };
  if (args && Object.keys(args).length > 0) o['arguments'] = args;
  if (id !== undefined) o['id'] = id;
  return o;
}

export class QmpInputs {
  readonly #rng: Prng;
  readonly #commands: string[];
  readonly #seeds: Buffer[];

  /** `commands`: the names query-commands listed. */
  constructor(rng: Prng, commands: string[]) {
    this.#rng = rng;
    this.#commands = commands;
    this.#seeds = [];
    for (const [cmd, args] of Object.entries(SAMPLE_ARGS)) {
      this.#seeds.push(Buffer.from(JSON.stringify(obj(cmd, args, undefined))));
      this.#seeds.push(Buffer.from(JSON.stringify(obj(cmd, args, 'fz-1'))));
    }
  }

  #held: QmpInput | undefined;

  /** Gives an input back, to be the next one (it has to go in a batch of its own). */
  pushBack(input: QmpInput): void {
    this.#held = input;
  }

  next(): QmpInput {
    const held = this.#held;
    this.#held = undefined;
    if (held) return held;
    const r = this.#rng;
    const p = r.int(100);
    if (p < 30) return this.#mutated();
    if (p < 50) return this.#wrongType();
    if (p < 60) return this.#unknown();
    if (p < 70) return { kind: 'seed', bytes: r.pick(this.#seeds), mayClose: false };
    if (p < 73) return this.#deep();
    if (p < 79) return this.#hugeNumber();
    if (p < 85) return this.#badText();
    if (p < 91) return this.#duplicateKeys();
    if (p < 92) return this.#longString();
    if (p < 96) return this.#spliced();
    return { kind: 'random-bytes', bytes: r.bytes(r.int(96)), mayClose: false };
  }

  #id(): unknown {
    const r = this.#rng;
    return r.chance(0.6) ? undefined : r.pick<unknown>(['fz', 7, -1.5, null, true, [1, { a: 2 }], { nested: { id: 1 } }, 'x'.repeat(r.int(2000)), 2 ** 70]);
  }

  /** Any command query-commands listed; protected ones only with an argument that must fail. */
  #command(): string {
    return this.#rng.pick(this.#commands);
  }

  #wrongType(): QmpInput {
    const r = this.#rng;
    const cmd = this.#command();
    const sample = SAMPLE_ARGS[cmd] ?? {};
    const args: Record<string, unknown> = structuredClone(sample);
    const keys = Object.keys(args);
    if (keys.length === 0 || PROTECTED.has(cmd)) {
      // defineProperty: a plain assignment to "__proto__" would set the prototype and send no argument at all.
      Object.defineProperty(args, r.pick(UNKNOWN_KEYS.filter((k) => k !== '')), { value: r.pick(WRONG_VALUES), enumerable: true, writable: true, configurable: true });
    } else {
      // One argument of the wrong type (sometimes nested inside an object or list argument).
      const key = r.pick(keys);
      const v = args[key];
      if (v && typeof v === 'object' && r.chance(0.5)) {
        const inner = Array.isArray(v) ? (v as unknown[]) : Object.values(v as object);
        if (Array.isArray(v) && v.length) (v as unknown[])[r.int(v.length)] = r.pick(WRONG_VALUES);
        else if (!Array.isArray(v) && inner.length) (v as Record<string, unknown>)[r.pick(Object.keys(v as object))] = r.pick(WRONG_VALUES);
      } else {
        let w = r.pick(WRONG_VALUES);
        for (let i = 0; i < 4 && typeof w === typeof v && !Array.isArray(v); i++) w = r.pick(WRONG_VALUES);
        args[key] = w;
      }
      if (r.chance(0.2)) delete args[r.pick(keys)];
    }
    return { kind: 'wrong-type', bytes: Buffer.from(JSON.stringify(obj(cmd, args, this.#id()))), mayClose: false };
  }

  #unknown(): QmpInput {
    const r = this.#rng;
    const id = this.#id();
    let o: unknown;
    switch (r.int(7)) {
      case 0:
        o = obj(r.pick(UNKNOWN_COMMANDS), undefined, id);
        break;
      case 1: {
        const cmd = this.#command();
        o = obj(cmd, { ...(PROTECTED.has(cmd) ? {} : SAMPLE_ARGS[cmd]), [r.pick(UNKNOWN_KEYS)]: r.pick(WRONG_VALUES) }, id);
        break;
      }
      case 2:
        o = { execute: r.pick(WRONG_VALUES), id };
        break;
      case 3:
        o = { execute: 'query-version', arguments: r.pick([[], 'x', 1, null, true]), id };
        break;
      case 4:
        o = { execute: 'query-version', [r.pick(['exec-oob', 'control', 'fz', 'Execute', ''])]: 1 };
        break;
      case 5:
        o = r.pick<unknown>([[], [{ execute: 'query-version' }], 'query-version', 1, null, true, {}, { id: 1 }, { arguments: {} }]);
        break;
      default:
        o = { 'exec-oob': 'query-version', id };
    }
    return { kind: 'unknown', bytes: Buffer.from(JSON.stringify(o) ?? 'null'), mayClose: false };
  }

  #mutated(): QmpInput {
    const r = this.#rng;
    let b = Buffer.from(r.pick(this.#seeds));
    const n = r.range(1, 3);
    for (let i = 0; i < n; i++) {
      switch (r.int(6)) {
        case 0: // truncation
          b = b.subarray(0, r.int(b.length));
          break;
        case 1: // bit flips
          if (b.length) for (let k = r.range(1, 8); k > 0; k--) b[r.int(b.length)]! ^= 1 << r.int(8);
          break;
        case 2: // an interesting byte inserted
          b = Buffer.concat([b.subarray(0, r.int(b.length + 1)), Buffer.of(r.pick(INTERESTING)), b.subarray(r.int(b.length + 1))]);
          break;
        case 3: { // a byte range deleted
          const at = r.int(b.length + 1);
          b = Buffer.concat([b.subarray(0, at), b.subarray(Math.min(b.length, at + r.range(1, 8)))]);
          break;
        }
        case 4: // a byte replaced
          if (b.length) b[r.int(b.length)] = r.pick(INTERESTING);
          break;
        default: { // a range duplicated
          const at = r.int(b.length + 1);
          const len = r.int(Math.min(32, b.length - at) + 1);
          b = Buffer.concat([b.subarray(0, at + len), b.subarray(at, at + len), b.subarray(at + len)]);
        }
      }
    }
    return { kind: 'mutated', bytes: b, mayClose: false };
  }

  #spliced(): QmpInput {
    const r = this.#rng;
    const a = r.pick(this.#seeds);
    const c = r.pick(this.#seeds);
    return { kind: 'spliced', bytes: Buffer.concat([a.subarray(0, r.int(a.length + 1)), c.subarray(r.int(c.length + 1))]), mayClose: false };
  }

  #deep(): QmpInput {
    const r = this.#rng;
    // Past QEMU's nesting limit every extra closing bracket is one more error reply: mostly stay near it.
    const depth = r.chance(0.97) ? r.pick([r.range(1, 64), r.range(1, 1030), r.range(1020, 1030)]) : r.range(1030, 8000);
    const open = r.chance(0.5) ? '[' : '{"a":';
    const close = open === '[' ? ']' : '}';
    const inner = r.chance(0.9) ? open.repeat(depth) + '1' + close.repeat(r.chance(0.9) ? depth : r.int(depth)) : open.repeat(depth);
    const where = r.int(3);
    const text = where === 0 ? inner : where === 1 ? `{"execute":"query-version","arguments":{"x":${inner}}}` : `{"execute":"block-dirty-bitmap-add","arguments":{"node":"scratch0","name":${inner}}}`;
    return { kind: 'deep', bytes: Buffer.from(text), mayClose: false };
  }

  #hugeNumber(): QmpInput {
    const r = this.#rng;
    const cmd = r.pick(['block-dirty-bitmap-add', 'blockdev-add', 'block-job-set-speed', 'blockdev-backup', 'query-version', 'job-set-speed', 'nbd-server-start']);
    const args = SAMPLE_ARGS[cmd] ?? {};
    const keys = Object.keys(args);
    const key = keys.length ? r.pick(keys) : 'x';
    const body = JSON.stringify({ ...args, [key]: '@@' });
    const num = r.chance(0.8) ? r.pick(HUGE_NUMBERS) : '9'.repeat(r.range(20, 4000));
    const where = r.int(3);
    const idPart = where === 0 ? `,"id":${num}` : '';
    const text = where === 2 ? `{"execute":"${cmd}","arguments":{"${key}":[${num},${num}]}}` : `{"execute":"${cmd}","arguments":${body.replace('"@@"', num)}${idPart}}`;
    return { kind: 'huge-number', bytes: Buffer.from(text), mayClose: false };
  }

  /** Invalid UTF-8, NUL bytes, bad escapes and control characters inside and between strings. */
  #badText(): QmpInput {
    const r = this.#rng;
    const seed = r.pick(this.#seeds);
    const quotes: number[] = [];
    for (let i = 0; i < seed.length; i++) if (seed[i] === 0x22) quotes.push(i);
    const at = quotes.length ? r.pick(quotes) + (r.chance(0.8) ? 1 : 0) : r.int(seed.length + 1);
    let insert: Buffer;
    switch (r.int(4)) {
      case 0:
        insert = Buffer.from(r.pick(BAD_UTF8));
        break;
      case 1:
        insert = Buffer.alloc(r.range(1, 4));
        break;
      case 2:
        insert = Buffer.from(r.pick(BAD_ESCAPES));
        break;
      default:
        insert = Buffer.of(r.range(1, 0x1f));
    }
    return { kind: 'bad-text', bytes: Buffer.concat([seed.subarray(0, at), insert, seed.subarray(at)]), mayClose: false };
  }

  #duplicateKeys(): QmpInput {
    const r = this.#rng;
    const variants = [
      '{"execute":"query-version","execute":"query-commands"}',
      '{"execute":"query-version","execute":1}',
      '{"execute":"block-dirty-bitmap-add","arguments":{"node":"scratch0","name":"fzb","name":"fzc"}}',
      '{"execute":"block-dirty-bitmap-add","arguments":{"node":"scratch0","node":7,"name":"fzb"}}',
      '{"execute":"query-version","arguments":{},"arguments":[]}',
      '{"execute":"query-version","id":1,"id":2}',
      '{"execute":"blockdev-add","arguments":{"driver":"null-co","driver":"file","node-name":"fzn"}}',
      '{"execute":"transaction","arguments":{"actions":[{"type":"block-dirty-bitmap-add","type":"x","data":{"node":"scratch0","name":"fzt"}}]}}',
      '{"__proto__":{"execute":"quit"},"execute":"query-version"}',
      '{"execute":"query-version","arguments":{"__proto__":{"polluted":1}}}',
    ];
    return { kind: 'duplicate-keys', bytes: Buffer.from(r.pick(variants)), mayClose: false };
  }

  #longString(): QmpInput {
    const r = this.#rng;
    const p = r.int(100);
    // Mostly kilobytes; rarely near the 1 MiB message limit, or over it (then the daemon closes).
    const len = p < 90 ? r.range(1000, 16 * 1024) : p < 98 ? r.range(256 * 1024, 1000 * 1024) : r.range(1024 * 1024 + 1, 3 * 1024 * 1024);
    const fill = r.pick(['a', 'é', '\\n', ' ', '\\u0041']);
    const s = fill.repeat(Math.ceil(len / fill.length));
    const cmd = r.pick(['query-version', 'block-dirty-bitmap-add', 'fz-' + 'x'.repeat(10)]);
    const text = r.chance(0.5) ? `{"execute":"${cmd}","arguments":{"name":"${s}","node":"scratch0"}}` : `{"execute":"${s}"}`;
    return { kind: 'long-string', bytes: Buffer.from(text), mayClose: Buffer.byteLength(text) > 1024 * 1024 - 256 };
  }
}
