import { decodeFloatToken, decodeIntegerToken, decodeStringToken, type TokenResult } from './json-text.js';

/**
 * The streaming JSON reader of a QMP connection, built to behave like QEMU 7.2's
 * (json-lexer + json-streamer + json-parser) on every input, good or bad:
 *
 * - Bytes are cut into tokens by a lexer. A byte no token can contain is a lexical error
 *   ("stray"): the message in progress is dropped, one error is reported, and the lexer skips
 *   input until a resynchronisation point: one of the six structural characters `{}[],:`, an
 *   ASCII control character other than tab, or a byte 0xFE/0xFF (which is how clients force a
 *   reset, per the QMP spec).
 * - Tokens are grouped into messages by counting braces and brackets only: a message ends when
 *   both counts are back to zero or either goes negative. Only then is the message reported,
 *   as a value or as the FIRST grammar error found in it (a grammar error therefore does not
 *   resynchronise anything; the brackets do).
 * - Limits: nesting deeper than `maxDepth` reports an error and starts over, as QEMU does. More
 *   than `maxMessageBytes` of tokens or `maxTokens` tokens in one message is fatal: the stream
 *   stops and the connection must be closed (QEMU instead discards and reads on).
 *
 * Memory held between calls is bounded by the limits: the partial token, the partial value and
 * nothing else. `feed` never throws on any input.
 */

export interface JsonStreamLimits {
  /** Total bytes of the tokens of one message (whitespace not counted). */
  maxMessageBytes: number;
  /** Tokens in one message. */
  maxTokens: number;
  /** Open braces plus open brackets; QEMU's MAX_NESTING. */
  maxDepth: number;
}

export const DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024;
export const DEFAULT_MAX_TOKENS = 256 * 1024;
export const QEMU_MAX_NESTING = 1024;
/** How much of a stray token the error message quotes. */
const MAX_STRAY_QUOTE_CHARS = 64;

export type StreamItem =
  | { kind: 'value'; value: unknown }
  /** A rejected message; the stream reads on. `message` is QEMU's desc text. */
  | { kind: 'error'; message: string }
  /** A limit was exceeded; the stream is dead and the connection must be closed. */
  | { kind: 'fatal'; message: string };

const enum Lex {
  Start,
  Recovery,
  DqString,
  DqEscape,
  SqString,
  SqEscape,
  Zero,
  Int,
  Neg,
  FracFirst,
  Frac,
  ExpFirst,
  ExpSign,
  Exp,
  Keyword,
}

const enum Tok {
  LCurly,
  RCurly,
  LSquare,
  RSquare,
  Comma,
  Colon,
  String,
  Integer,
  Float,
  Keyword,
}

const enum Expect {
  ArrayFirst,
  ArrayValue,
  ArraySep,
  ObjectFirst,
  ObjectKey,
  ObjectColon,
  ObjectValue,
  ObjectSep,
}

interface Frame {
  array?: unknown[];
  object?: Record<string, unknown>;
  key: string;
  expect: Expect;
}

const DEFAULT_LIMITS: JsonStreamLimits = {
  maxMessageBytes: DEFAULT_MAX_MESSAGE_BYTES,
  maxTokens: DEFAULT_MAX_TOKENS,
  maxDepth: QEMU_MAX_NESTING,
};

function isWhitespace(b: number): boolean {
  return b === 0x20 || b === 0x09 || b === 0x0a || b === 0x0d;
}

function isDigit(b: number): boolean {
  return b >= 0x30 && b <= 0x39;
}

function isResyncByte(b: number): boolean {
  return (
    b === 0x7b || b === 0x7d || b === 0x5b || b === 0x5d || b === 0x2c || b === 0x3a ||
    (b < 0x20 && b !== 0x09) || b >= 0xfe
  );
}

function setMember(obj: Record<string, unknown>, key: string, value: unknown): void {
  // A key "__proto__" must become an own member, never the object's prototype.
  if (key === '__proto__') Object.defineProperty(obj, key, { value, enumerable: true, writable: true, configurable: true });
  else obj[key] = value;
}

export class JsonMessageStream {
  readonly limits: JsonStreamLimits;

  // Lexer: the state and the bytes of the token in progress.
  #lex: Lex = Lex.Start;
  #tok: Uint8Array = new Uint8Array(256);
  #tokLen = 0;

  // Message: bracket counts and budget of the message in progress (QEMU's json-streamer).
  #braces = 0;
  #brackets = 0;
  #msgBytes = 0;
  #msgTokens = 0;

  // Grammar: the partial value, and the first error found in this message.
  #stack: Frame[] = [];
  #result: { value: unknown } | undefined;
  #error: string | undefined;

  #out: StreamItem[] = [];
  #broken = false;

  constructor(limits: Partial<JsonStreamLimits> = {}) {
    this.limits = { ...DEFAULT_LIMITS, ...limits };
  }

  /** True after a fatal item: everything fed afterwards is ignored. */
  get isBroken(): boolean {
    return this.#broken;
  }

  /** Bytes held for the message in progress (for tests of the memory bound). */
  get pendingBytes(): number {
    return this.#msgBytes + this.#tokLen;
  }

  /** Feeds bytes; returns the messages they completed, in order. Never throws. */
  feed(chunk: Uint8Array): StreamItem[] {
    const out: StreamItem[] = (this.#out = []);
    const n = chunk.length;
    let i = 0;
    while (i < n && !this.#broken) {
      const b = chunk[i] as number;
      // Bulk path for string bodies: copy a run of ordinary bytes at once.
      if (this.#lex === Lex.DqString || this.#lex === Lex.SqString) {
        const quote = this.#lex === Lex.DqString ? 0x22 : 0x27;
        let j = i;
        while (j < n) {
          const c = chunk[j] as number;
          if (c === quote || c === 0x5c || c < 0x20 || c > 0xfd) break;
          j++;
        }
        if (j > i) {
          this.#append(chunk, i, j);
          i = j;
          continue;
        }
      }
      if (this.#step(b)) i++;
    }
    this.#out = [];
    return out;
  }

  /** Processes one byte; returns false when the byte must be looked at again (lookahead). */
  #step(b: number): boolean {
    switch (this.#lex) {
      case Lex.Start:
        return this.#start(b);
      case Lex.Recovery:
        if (isResyncByte(b)) {
          this.#lex = Lex.Start;
          return false;
        }
        return true;
      case Lex.DqString:
      case Lex.SqString: {
        const quote = this.#lex === Lex.DqString ? 0x22 : 0x27;
        this.#appendByte(b);
        if (this.#broken) return true;
        if (b === quote) this.#token(Tok.String);
        else if (b === 0x5c) this.#lex = this.#lex === Lex.DqString ? Lex.DqEscape : Lex.SqEscape;
        else if (b < 0x20 || b > 0xfd) this.#stray();
        return true;
      }
      case Lex.DqEscape:
      case Lex.SqEscape:
        this.#appendByte(b);
        if (this.#broken) return true;
        if (b < 0x20 || b > 0xfd) this.#stray();
        else this.#lex = this.#lex === Lex.DqEscape ? Lex.DqString : Lex.SqString;
        return true;
      case Lex.Zero:
        if (isDigit(b)) return this.#strayWith(b);
        if (b === 0x2e) return this.#consume(b, Lex.FracFirst);
        this.#token(Tok.Integer);
        return false;
      case Lex.Int:
        if (isDigit(b)) return this.#consume(b, Lex.Int);
        if (b === 0x2e) return this.#consume(b, Lex.FracFirst);
        if (b === 0x65 || b === 0x45) return this.#consume(b, Lex.ExpFirst);
        this.#token(Tok.Integer);
        return false;
      case Lex.Neg:
        if (b === 0x30) return this.#consume(b, Lex.Zero);
        if (b >= 0x31 && b <= 0x39) return this.#consume(b, Lex.Int);
        return this.#strayWith(b);
      case Lex.FracFirst:
        return isDigit(b) ? this.#consume(b, Lex.Frac) : this.#strayWith(b);
      case Lex.Frac:
        if (isDigit(b)) return this.#consume(b, Lex.Frac);
        if (b === 0x65 || b === 0x45) return this.#consume(b, Lex.ExpFirst);
        this.#token(Tok.Float);
        return false;
      case Lex.ExpFirst:
        if (b === 0x2b || b === 0x2d) return this.#consume(b, Lex.ExpSign);
        return isDigit(b) ? this.#consume(b, Lex.Exp) : this.#strayWith(b);
      case Lex.ExpSign:
        return isDigit(b) ? this.#consume(b, Lex.Exp) : this.#strayWith(b);
      case Lex.Exp:
        if (isDigit(b)) return this.#consume(b, Lex.Exp);
        this.#token(Tok.Float);
        return false;
      case Lex.Keyword:
        if (b >= 0x61 && b <= 0x7a) return this.#consume(b, Lex.Keyword);
        this.#token(Tok.Keyword);
        return false;
    }
  }

  #start(b: number): boolean {
    if (isWhitespace(b)) return true;
    switch (b) {
      case 0x7b: this.#token(Tok.LCurly); return true;
      case 0x7d: this.#token(Tok.RCurly); return true;
      case 0x5b: this.#token(Tok.LSquare); return true;
      case 0x5d: this.#token(Tok.RSquare); return true;
      case 0x2c: this.#token(Tok.Comma); return true;
      case 0x3a: this.#token(Tok.Colon); return true;
      case 0x22: return this.#consume(b, Lex.DqString);
      case 0x27: return this.#consume(b, Lex.SqString);
      case 0x30: return this.#consume(b, Lex.Zero);
      case 0x2d: return this.#consume(b, Lex.Neg);
    }
    if (b >= 0x31 && b <= 0x39) return this.#consume(b, Lex.Int);
    if (b >= 0x61 && b <= 0x7a) return this.#consume(b, Lex.Keyword);
    return this.#strayWith(b);
  }

  #consume(b: number, next: Lex): true {
    this.#appendByte(b);
    if (!this.#broken) this.#lex = next;
    return true;
  }

  #appendByte(b: number): void {
    if (this.#reserve(1)) this.#tok[this.#tokLen++] = b;
  }

  #append(chunk: Uint8Array, from: number, to: number): void {
    const len = to - from;
    if (this.#reserve(len)) {
      this.#tok.set(chunk.subarray(from, to), this.#tokLen);
      this.#tokLen += len;
    }
  }

  /** Makes room for `len` more token bytes, or fails the stream when over budget. */
  #reserve(len: number): boolean {
    if (this.#msgBytes + this.#tokLen + len > this.limits.maxMessageBytes) {
      this.#fatal('JSON token size limit exceeded');
      return false;
    }
    if (this.#tokLen + len > this.#tok.length) {
      let size = this.#tok.length * 2;
      while (size < this.#tokLen + len) size *= 2;
      const grown = new Uint8Array(size);
      grown.set(this.#tok.subarray(0, this.#tokLen));
      this.#tok = grown;
    }
    return true;
  }

  #strayWith(b: number): true {
    this.#appendByte(b);
    if (!this.#broken) this.#stray();
    return true;
  }

  /** A lexical error: report it, drop the message in progress, skip to a resync point. */
  #stray(): void {
    const token = this.#tok.subarray(0, this.#tokLen);
    const nul = token.indexOf(0);
    // QEMU quotes the token as a C string: it ends at the first NUL byte.
    let text = Buffer.from(nul < 0 ? token : token.subarray(0, nul)).toString('utf8');
    if (text.length > MAX_STRAY_QUOTE_CHARS) text = `${text.slice(0, MAX_STRAY_QUOTE_CHARS)}...`;
    this.#resetMessage();
    this.#lex = Lex.Recovery;
    this.#out.push({ kind: 'error', message: `JSON parse error, stray '${text}'` });
  }

  #fatal(message: string): void {
    this.#resetMessage();
    this.#broken = true;
    this.#out.push({ kind: 'fatal', message });
  }

  #resetMessage(): void {
    this.#tokLen = 0;
    if (this.#tok.length > 4096) this.#tok = new Uint8Array(256);
    this.#braces = 0;
    this.#brackets = 0;
    this.#msgBytes = 0;
    this.#msgTokens = 0;
    this.#stack = [];
    this.#result = undefined;
    this.#error = undefined;
  }

  /** A complete token (its bytes, if any, are in #tok). Mirrors QEMU's json-streamer. */
  #token(type: Tok): void {
    this.#lex = Lex.Start;
    if (type === Tok.LCurly) this.#braces++;
    else if (type === Tok.RCurly) this.#braces--;
    else if (type === Tok.LSquare) this.#brackets++;
    else if (type === Tok.RSquare) this.#brackets--;

    const len = this.#tokLen === 0 ? 1 : this.#tokLen;
    if (this.#msgBytes + len > this.limits.maxMessageBytes) {
      this.#fatal('JSON token size limit exceeded');
      return;
    }
    if (this.#msgTokens + 1 > this.limits.maxTokens) {
      this.#fatal('JSON token count limit exceeded');
      return;
    }
    if (this.#braces + this.#brackets > this.limits.maxDepth) {
      this.#resetMessage();
      this.#out.push({ kind: 'error', message: 'JSON nesting depth limit exceeded' });
      return;
    }
    this.#msgBytes += len;
    this.#msgTokens++;

    if (this.#error === undefined) this.#grammar(type);
    this.#tokLen = 0;

    if ((this.#braces > 0 || this.#brackets > 0) && this.#braces >= 0 && this.#brackets >= 0) return;

    if (this.#error !== undefined) {
      this.#out.push({ kind: 'error', message: `JSON parse error, ${this.#error}` });
    } else if (this.#result !== undefined) {
      this.#out.push({ kind: 'value', value: this.#result.value });
    } else {
      // Unreachable: a message that ends without a value has a grammar error.
      this.#out.push({ kind: 'error', message: 'JSON parse error, expecting value' });
    }
    this.#resetMessage();
  }

  #fail(message: string): void {
    this.#error ??= message;
  }

  #grammar(type: Tok): void {
    const top = this.#stack[this.#stack.length - 1];
    if (!top) {
      this.#value(type);
      return;
    }
    switch (top.expect) {
      case Expect.ArrayFirst:
        if (type === Tok.RSquare) this.#close();
        else this.#value(type);
        return;
      case Expect.ArrayValue:
      case Expect.ObjectValue:
        this.#value(type);
        return;
      case Expect.ArraySep:
        if (type === Tok.Comma) top.expect = Expect.ArrayValue;
        else if (type === Tok.RSquare) this.#close();
        else this.#fail('expected separator in list');
        return;
      case Expect.ObjectFirst:
        if (type === Tok.RCurly) this.#close();
        else this.#key(top, type);
        return;
      case Expect.ObjectKey:
        this.#key(top, type);
        return;
      case Expect.ObjectColon:
        if (type === Tok.Colon) top.expect = Expect.ObjectValue;
        else this.#fail('missing : in object pair');
        return;
      case Expect.ObjectSep:
        if (type === Tok.Comma) top.expect = Expect.ObjectKey;
        else if (type === Tok.RCurly) this.#close();
        else this.#fail('expected separator in dict');
        return;
    }
  }

  #key(top: Frame, type: Tok): void {
    switch (type) {
      case Tok.String: {
        const key = decodeStringToken(this.#tok, 0, this.#tokLen);
        if (!key.ok) return this.#fail(key.message);
        top.key = key.value;
        top.expect = Expect.ObjectColon;
        return;
      }
      case Tok.Keyword: {
        const word = this.#text();
        if (word !== 'true' && word !== 'false' && word !== 'null') return this.#fail(`invalid keyword '${word}'`);
        return this.#fail('key is not a string in object');
      }
      case Tok.Integer:
      case Tok.Float:
      case Tok.LCurly:
      case Tok.LSquare:
        return this.#fail('key is not a string in object');
      default:
        return this.#fail('expecting value');
    }
  }

  #text(): string {
    return Buffer.from(this.#tok.buffer, this.#tok.byteOffset, this.#tokLen).toString('latin1');
  }

  #value(type: Tok): void {
    let r: TokenResult<unknown>;
    switch (type) {
      case Tok.LCurly:
        this.#stack.push({ object: {}, key: '', expect: Expect.ObjectFirst });
        return;
      case Tok.LSquare:
        this.#stack.push({ array: [], key: '', expect: Expect.ArrayFirst });
        return;
      case Tok.String:
        r = decodeStringToken(this.#tok, 0, this.#tokLen);
        break;
      case Tok.Integer:
        r = decodeIntegerToken(this.#text());
        break;
      case Tok.Float:
        r = decodeFloatToken(this.#text());
        break;
      case Tok.Keyword: {
        const word = this.#text();
        if (word === 'true') r = { ok: true, value: true };
        else if (word === 'false') r = { ok: true, value: false };
        else if (word === 'null') r = { ok: true, value: null };
        else r = { ok: false, message: `invalid keyword '${word}'` };
        break;
      }
      default:
        this.#fail('expecting value');
        return;
    }
    if (!r.ok) this.#fail(r.message);
    else this.#complete(r.value);
  }

  #close(): void {
    const frame = this.#stack.pop() as Frame;
    this.#complete(frame.array ?? frame.object);
  }

  #complete(value: unknown): void {
    const top = this.#stack[this.#stack.length - 1];
    if (!top) {
      this.#result = { value };
      return;
    }
    if (top.array) {
      top.array.push(value);
      top.expect = Expect.ArraySep;
      return;
    }
    const obj = top.object as Record<string, unknown>;
    if (Object.hasOwn(obj, top.key)) return this.#fail('duplicate key');
    setMember(obj, top.key, value);
    top.expect = Expect.ObjectSep;
  }
}
