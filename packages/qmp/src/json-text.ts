/**
 * Decoding of single JSON tokens the way QEMU 7.2's parser does it: strings may be quoted with
 * `"` or `'`, accept the extra escape `\'`, must be UTF-8 where the overlong pair C0 80 stands
 * for U+0000 ("modified UTF-8"), and may not contain surrogates or noncharacters, neither raw
 * nor escaped. Integers stay exact: a literal in the int64/uint64 range that a JS number cannot
 * hold becomes a bigint; anything else is a double.
 */

/** A decoded token, or the parser message QEMU gives for it (without "JSON parse error, "). */
export type TokenResult<T> = { ok: true; value: T } | { ok: false; message: string };

const INT64_MIN = -(2n ** 63n);
const UINT64_MAX = 2n ** 64n - 1n;
const STRING_CHUNK_UNITS = 8192;

function isHexDigit(b: number | undefined): boolean {
  return b !== undefined && ((b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x46) || (b >= 0x61 && b <= 0x66));
}

function isValidCodePoint(cp: number): boolean {
  if (cp > 0x10ffff) return false;
  if (cp >= 0xd800 && cp <= 0xdfff) return false;
  if (cp >= 0xfdd0 && cp <= 0xfdef) return false;
  return (cp & 0xfffe) !== 0xfffe;
}

function latin1(bytes: Uint8Array, start: number, end: number): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset + start, end - start).toString('latin1');
}

/**
 * Reads one modified-UTF-8 sequence starting at `i`. Returns the code point and the sequence
 * length, or undefined when the bytes are not a valid sequence.
 */
function readUtf8(bytes: Uint8Array, i: number, end: number): { cp: number; bytes: number } | undefined {
  const lead = bytes[i] as number;
  let need: number;
  let cp: number;
  if (lead >= 0xc0 && lead <= 0xdf) {
    need = 1;
    cp = lead & 0x1f;
  } else if (lead >= 0xe0 && lead <= 0xef) {
    need = 2;
    cp = lead & 0x0f;
  } else if (lead >= 0xf0 && lead <= 0xf7) {
    need = 3;
    cp = lead & 0x07;
  } else {
    return undefined;
  }
  if (i + need >= end) return undefined;
  for (let k = 1; k <= need; k++) {
    const b = bytes[i + k] as number;
    if ((b & 0xc0) !== 0x80) return undefined;
    cp = (cp << 6) | (b & 0x3f);
  }
  const minimum = need === 1 ? 0x80 : need === 2 ? 0x800 : 0x10000;
  // C0 80 is how modified UTF-8 spells U+0000; every other overlong form is refused.
  if (cp < minimum && !(need === 1 && cp === 0)) return undefined;
  if (cp !== 0 && !isValidCodePoint(cp)) return undefined;
  return { cp, bytes: need + 1 };
}

/**
 * Decodes a whole string token, quotes included (`bytes[start]` is the opening quote and
 * `bytes[end - 1]` the closing one).
 */
export function decodeStringToken(bytes: Uint8Array, start: number, end: number): TokenResult<string> {
  const last = end - 1;
  // Fast path: plain ASCII without escapes, the common case for names and ids.
  let plain = true;
  for (let i = start + 1; i < last; i++) {
    const b = bytes[i] as number;
    if (b === 0x5c || b >= 0x80) {
      plain = false;
      break;
    }
  }
  if (plain) return { ok: true, value: latin1(bytes, start + 1, last) };

  const parts: string[] = [];
  let units: number[] = [];
  const push = (cp: number): void => {
    if (cp > 0xffff) {
      const v = cp - 0x10000;
      units.push(0xd800 + (v >> 10), 0xdc00 + (v & 0x3ff));
    } else {
      units.push(cp);
    }
    if (units.length >= STRING_CHUNK_UNITS) {
      parts.push(String.fromCharCode(...units));
      units = [];
    }
  };
  const badUnicode = (escStart: number): TokenResult<string> => ({
    ok: false,
    message: `${latin1(bytes, escStart, Math.min(escStart + 6, end))} is not a valid Unicode character`,
  });
  const readHex4 = (at: number): number | undefined => {
    for (let k = 0; k < 4; k++) if (at + k >= last || !isHexDigit(bytes[at + k])) return undefined;
    return Number.parseInt(latin1(bytes, at, at + 4), 16);
  };

  let i = start + 1;
  while (i < last) {
    const b = bytes[i] as number;
    if (b === 0x5c) {
      const c = bytes[i + 1];
      switch (c) {
        case 0x22: push(0x22); i += 2; continue; // "
        case 0x27: push(0x27); i += 2; continue; // '
        case 0x5c: push(0x5c); i += 2; continue; // \
        case 0x2f: push(0x2f); i += 2; continue; // /
        case 0x62: push(0x08); i += 2; continue; // b
        case 0x66: push(0x0c); i += 2; continue; // f
        case 0x6e: push(0x0a); i += 2; continue; // n
        case 0x72: push(0x0d); i += 2; continue; // r
        case 0x74: push(0x09); i += 2; continue; // t
        case 0x75: { // u
          const hi = readHex4(i + 2);
          if (hi === undefined) return badUnicode(i);
          let cp = hi;
          let used = 6;
          if (hi >= 0xd800 && hi <= 0xdbff) {
            const lo = bytes[i + 6] === 0x5c && bytes[i + 7] === 0x75 ? readHex4(i + 8) : undefined;
            if (lo === undefined || lo < 0xdc00 || lo > 0xdfff) return badUnicode(i);
            cp = 0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00);
            used = 12;
          }
          if (cp !== 0 && !isValidCodePoint(cp)) return badUnicode(i);
          push(cp);
          i += used;
          continue;
        }
        default:
          return { ok: false, message: 'invalid escape sequence in string' };
      }
    }
    if (b < 0x80) {
      push(b);
      i++;
      continue;
    }
    const seq = readUtf8(bytes, i, last);
    if (!seq) return { ok: false, message: 'invalid UTF-8 sequence in string' };
    push(seq.cp);
    i += seq.bytes;
  }
  if (units.length) parts.push(String.fromCharCode(...units));
  return { ok: true, value: parts.join('') };
}

/** A JSON number as QEMU keeps it: int64, else uint64, else double. */
export type JsonNumber = number | bigint;

export function decodeIntegerToken(text: string): TokenResult<JsonNumber> {
  // Up to 15 digits always fit a double exactly.
  if (text.length <= 15) return { ok: true, value: Number(text) };
  const big = BigInt(text);
  if (big >= INT64_MIN && big <= UINT64_MAX) {
    const n = Number(big);
    return { ok: true, value: Number.isSafeInteger(n) && BigInt(n) === big ? n : big };
  }
  return decodeFloatToken(text);
}

export function decodeFloatToken(text: string): TokenResult<JsonNumber> {
  const n = Number(text);
  // QEMU accepts such numbers and then writes "inf", which is not JSON; Shear refuses them.
  if (!Number.isFinite(n)) return { ok: false, message: 'number out of range' };
  return { ok: true, value: n };
}
