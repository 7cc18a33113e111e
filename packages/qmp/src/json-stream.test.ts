import t from 'tap';
import fc from 'fast-check';
import { JsonMessageStream, type StreamItem } from './json-stream.js';
import { toQmpJson } from './json-writer.js';

const bytes = (s: string): Buffer => Buffer.from(s, 'latin1');

function feedAll(input: string | Uint8Array, limits = {}): StreamItem[] {
  return new JsonMessageStream(limits).feed(typeof input === 'string' ? bytes(input) : input);
}

/** Each message as a short string: the value in JSON, or "E:" / "F:" and the error text. */
function show(items: StreamItem[]): string[] {
  return items.map((i) => (i.kind === 'value' ? toQmpJson(i.value) : `${i.kind === 'error' ? 'E' : 'F'}:${i.message}`));
}

t.test('JsonMessageStream reproduces what qemu-storage-daemon 7.2 answered to each input', async (t) => {
  // Every row was sent to a real qemu-storage-daemon 7.2.22 (see README, Compatibility notes).
  // Inputs are latin1 strings, so '\u00ff' is the byte 0xFF.
  const rows: Array<[string, string[]]> = [
    ['{ "execute": }', ['E:JSON parse error, expecting value']],
    ['{"a" 1}\n', ['E:JSON parse error, missing : in object pair']],
    ['{1:2}\n', ['E:JSON parse error, key is not a string in object']],
    ['{"a":1,}\n', ['E:JSON parse error, expecting value']],
    ['[1,]\n', ['E:JSON parse error, expecting value']],
    ['[1 2]\n', ['E:JSON parse error, expected separator in list']],
    ['{"a":1 "b":2}\n', ['E:JSON parse error, expected separator in dict']],
    [']\n', ['E:JSON parse error, expecting value']],
    ['}\n', ['E:JSON parse error, expecting value']],
    ['{"a":"x\u0001y"}\n', ["E:JSON parse error, stray '\"x\u0001'", 'E:JSON parse error, expecting value']],
    ['{"a":"\\x"}\n', ['E:JSON parse error, invalid escape sequence in string']],
    ['{"a":"\\u12"}\n', ['E:JSON parse error, \\u12" is not a valid Unicode character']],
    ['{"a":"\\ud800"}\n', ['E:JSON parse error, \\ud800 is not a valid Unicode character']],
    ['{"a":"\\ude00\\ud83d"}', ['E:JSON parse error, \\ude00 is not a valid Unicode character']],
    ['{"a":"\\ud83dx"}', ['E:JSON parse error, \\ud83d is not a valid Unicode character']],
    ['{"a":"\\ufffe"}', ['E:JSON parse error, \\ufffe is not a valid Unicode character']],
    ['{"a":"\\ud83d\\ude00"}', ['{"a": "\\uD83D\\uDE00"}']],
    ['{"a":"\\u0000"}', ['{"a": "\\u0000"}']],
    ['01\n', ["E:JSON parse error, stray '01'"]],
    ['-\n', ["E:JSON parse error, stray '-\n'"]],
    // After "-\n" the lexer skips to the next resync point, so "1." is swallowed up to its \n.
    ['-\n1.\n1e\n', ["E:JSON parse error, stray '-\n'", "E:JSON parse error, stray '1e\n'"]],
    ['%d\n', ["E:JSON parse error, stray '%'"]],
    ['truex\n', ["E:JSON parse error, invalid keyword 'truex'"]],
    ['tru\n', ["E:JSON parse error, invalid keyword 'tru'"]],
    ['str\n', ["E:JSON parse error, invalid keyword 'str'"]],
    ['{"a":1,"a":2}', ['E:JSON parse error, duplicate key']],
    // A top-level scalar ends only when the next byte arrives.
    ['42', []],
    ['42 null "s" [1,2] ', ['42', 'null', '"s"', '[1, 2]']],
    ['{"a":1}{"b":2}\n{"c":3}', ['{"a": 1}', '{"b": 2}', '{"c": 3}']],
    ["{'a':'sq\\'x'}", ['{"a": "sq\'x"}']],
    // An unclosed object swallows the next one: brackets decide where a message ends.
    ['{"a":1{"b":5}}', ['E:JSON parse error, expected separator in dict']],
    ['\u0001{"a":1}', ["E:JSON parse error, stray '\u0001'", '{"a": 1}']],
    ['@ "abc" 123 , : x{"a":2}', ["E:JSON parse error, stray '@'", 'E:JSON parse error, expecting value', 'E:JSON parse error, expecting value', "E:JSON parse error, invalid keyword 'x'", '{"a": 2}']],
    ['@ "abc"\t\n{"a":3}', ["E:JSON parse error, stray '@'", '{"a": 3}']],
    ['\u00ff{"a":4}', ["E:JSON parse error, stray '\ufffd'", '{"a": 4}']],
    ['\u00ef\u00bb\u00bf{"a":5}', ["E:JSON parse error, stray '\ufffd'", '{"a": 5}']],
    ['@}{"a":6}', ["E:JSON parse error, stray '@'", 'E:JSON parse error, expecting value', '{"a": 6}']],
    ['{"a":"\u00c3"}\n', ['E:JSON parse error, invalid UTF-8 sequence in string']],
    ['{"a":"\u00c3\u00a9"}\n', ['{"a": "\\u00E9"}']],
    ['{"a":"\u00c0\u0080"}\n', ['{"a": "\\u0000"}']],
    ['{"a":"\u00ed\u00a0\u0080"}\n', ['E:JSON parse error, invalid UTF-8 sequence in string']],
    ['{"a":"\u00f4\u0090\u0080\u0080"}\n', ['E:JSON parse error, invalid UTF-8 sequence in string']],
    ['{"a":"\u00ef\u00bf\u00be"}\n', ['E:JSON parse error, invalid UTF-8 sequence in string']],
    ['{"a":"\u00f0\u009f\u0098\u0080"}\n', ['{"a": "\\uD83D\\uDE00"}']],
    ['{"a":"\u00e0\u0080\u0080"}\n', ['E:JSON parse error, invalid UTF-8 sequence in string']],
    ['{"a":"a\u0000b"}\n', ["E:JSON parse error, stray '\"a'", 'E:JSON parse error, expecting value']],
    ['{"a":[0e1]}', ['E:JSON parse error, expected separator in list']],
    ['{"a":[-0, 1E+2, 1e-2, -5, 0.5E-3, 1.0]}', ['{"a": [0, 100, 0.01, -5, 0.0005, 1]}']],
    ['{"a":[12345678901234567890, 9007199254740993, -9223372036854775808, 123456789012345678901234]}', ['{"a": [12345678901234567890, 9007199254740993, -9223372036854775808, 1.2345678901234569e+23]}']],
    [`${'['.repeat(1024)}${']'.repeat(1024)}\n`, [`${'['.repeat(1024)}${']'.repeat(1024)}`]],
    [`${'['.repeat(1025)}\n]]]\n{"a":7}`, ['E:JSON nesting depth limit exceeded', 'E:JSON parse error, expecting value', 'E:JSON parse error, expecting value', 'E:JSON parse error, expecting value', '{"a": 7}']],
  ];
  for (const [input, expected] of rows) {
    t.same(show(feedAll(input)), expected, JSON.stringify(input));
  }
});

t.test('JsonMessageStream refuses numbers a double cannot hold (QEMU writes "inf", which is not JSON)', async (t) => {
  t.same(show(feedAll('[1e400]')), ['E:JSON parse error, number out of range']);
});

t.test('JsonMessageStream keeps "__proto__" as an own member', async (t) => {
  const [item] = feedAll('{"__proto__":{"polluted":1},"":2}');
  t.equal(item?.kind, 'value');
  const v = (item as { value: Record<string, unknown> }).value;
  t.same(Object.keys(v), ['__proto__', '']);
  t.equal(Object.getPrototypeOf(v), Object.prototype);
  t.equal(({} as Record<string, unknown>)['polluted'], undefined);
});

t.test('JsonMessageStream: a message over maxMessageBytes is fatal and the stream stops', async (t) => {
  const s = new JsonMessageStream({ maxMessageBytes: 100 });
  t.same(show(s.feed(bytes('{"a":1} {"b":"'))), ['{"a": 1}']);
  const items = s.feed(bytes('x'.repeat(200)));
  t.same(show(items), ['F:JSON token size limit exceeded']);
  t.ok(s.isBroken);
  t.equal(s.pendingBytes, 0);
  t.same(s.feed(bytes('"}{"c":1}')), [], 'nothing more is read');
});

t.test('JsonMessageStream: too many tokens in one message is fatal', async (t) => {
  const s = new JsonMessageStream({ maxTokens: 10 });
  t.same(show(s.feed(bytes('[1,2,3,4,5,6,7,8]'))), ['F:JSON token count limit exceeded']);
});

/** A message the way a client would write it, with random whitespace between tokens. */
const jsonValue = fc.jsonValue({ maxDepth: 4 }).map((v) => JSON.parse(JSON.stringify(v)) as unknown);
const message = fc.record({ v: jsonValue, ws: fc.constantFrom('', ' ', '\n', '\r\n', '\t ') });

function encode(msgs: Array<{ v: unknown; ws: string }>): Buffer {
  // Top-level scalars need a delimiter after them; QMP messages are objects, so wrap each.
  return Buffer.from(msgs.map((m) => `{"v":${m.ws}${JSON.stringify(m.v, null, m.ws ? 1 : 0)}${m.ws}}${m.ws}`).join(''), 'utf8');
}

function splits(total: number): fc.Arbitrary<number[]> {
  return fc.uniqueArray(fc.integer({ min: 1, max: Math.max(1, total - 1) }), { maxLength: 12 }).map((cuts) => cuts.filter((c) => c < total).sort((a, b) => a - b));
}

function feedInChunks(s: JsonMessageStream, data: Uint8Array, cuts: number[]): StreamItem[] {
  const out: StreamItem[] = [];
  let from = 0;
  for (const cut of [...cuts, data.length]) {
    out.push(...s.feed(data.subarray(from, cut)));
    from = cut;
  }
  return out;
}

t.test('JsonMessageStream: any split of a valid stream yields the same messages', async (t) => {
  fc.assert(
    fc.property(
      fc.array(message, { minLength: 1, maxLength: 5 }).chain((msgs) => {
        const data = encode(msgs);
        return fc.tuple(fc.constant(msgs), fc.constant(data), splits(data.length));
      }),
      ([msgs, data, cuts]) => {
        const items = feedInChunks(new JsonMessageStream(), data, cuts);
        if (items.length !== msgs.length) return false;
        // Compared as written: integers past 2^53 come back as exact bigints.
        return items.every((it, i) => it.kind === 'value' && toQmpJson(it.value) === toQmpJson({ v: msgs[i]?.v }));
      },
    ),
    { numRuns: 300 },
  );
  t.pass('split-invariance held');
});

t.test('JsonMessageStream: garbage never throws, stays within the limit, and \\x01 always resynchronises', async (t) => {
  const maxMessageBytes = 512;
  const garbage = fc.oneof(
    fc.uint8Array({ maxLength: 300 }),
    // Garbage made of JSON-ish bytes reaches the deeper states of the lexer and parser.
    fc.array(fc.constantFrom(...'{}[],:"\'\\-0123456789.eE+truefalsn \n\t\u0001\u00ff\u00c3\u00a9u'.split('')), { maxLength: 300 }).map((cs) => bytes(cs.join(''))),
  );
  fc.assert(
    fc.property(garbage, fc.array(fc.integer({ min: 1, max: 299 }), { maxLength: 8 }), (g, rawCuts) => {
      const s = new JsonMessageStream({ maxMessageBytes, maxDepth: 8 });
      const data = Buffer.concat([g, bytes('\u0001{"ok":1}')]);
      const cuts = [...new Set(rawCuts.filter((c) => c < data.length))].sort((a, b) => a - b);
      const items: StreamItem[] = [];
      let from = 0;
      for (const cut of [...cuts, data.length]) {
        items.push(...s.feed(data.subarray(from, cut)));
        if (s.pendingBytes > maxMessageBytes) return false;
        from = cut;
      }
      for (const it of items) {
        if (it.kind === 'fatal') return false; // the garbage is below the limit
        if (it.kind === 'error' && typeof it.message !== 'string') return false;
      }
      const last = items[items.length - 1];
      return last?.kind === 'value' && toQmpJson(last.value) === '{"ok": 1}';
    }),
    { numRuns: 500 },
  );
  t.pass('garbage handled');
});

t.test('JsonMessageStream: endless input without structure never grows state beyond the limit', async (t) => {
  const maxMessageBytes = 4096;
  fc.assert(
    fc.property(fc.constantFrom('"', '[', '{"a":"', '{"a":[', "'", '1', 'a'), fc.constantFrom('x', '1', '[', ' ', 'a'), (prefix, filler) => {
      const s = new JsonMessageStream({ maxMessageBytes });
      s.feed(bytes(prefix));
      for (let i = 0; i < 64 && !s.isBroken; i++) {
        s.feed(bytes(filler.repeat(512)));
        if (s.pendingBytes > maxMessageBytes) return false;
      }
      return true;
    }),
  );
  t.pass('bounded');
});
