/**
 * Serialises a reply the way QEMU writes QMP: `{"a": 1, "b": [1, 2]}` (a space after `:` and
 * `,`), pure ASCII output with everything outside printable ASCII as `\uXXXX` (upper-case hex,
 * surrogate pairs for astral characters), `/` unescaped. Members keep insertion order; members
 * whose value is undefined, a function or a symbol are left out (as JSON.stringify does); objects
 * with toJSON are written as what it returns. Integers beyond 2^53 travel as bigint. Non-finite
 * numbers, which JSON cannot carry, are written as null.
 *
 * @throws TypeError on a cycle, or on a function or symbol outside an object member
 */
export function toQmpJson(value: unknown): string {
  const parts: string[] = [];
  write(value, parts, new Set());
  return parts.join('');
}

const HEX = '0123456789ABCDEF';

export function quoteJsonString(s: string): string {
  let out = '"';
  let plainFrom = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c >= 0x20 && c < 0x7f && c !== 0x22 && c !== 0x5c) continue;
    out += s.slice(plainFrom, i);
    plainFrom = i + 1;
    switch (c) {
      case 0x22: out += '\\"'; break;
      case 0x5c: out += '\\\\'; break;
      case 0x08: out += '\\b'; break;
      case 0x0c: out += '\\f'; break;
      case 0x0a: out += '\\n'; break;
      case 0x0d: out += '\\r'; break;
      case 0x09: out += '\\t'; break;
      default:
        out += `\\u${HEX[(c >> 12) & 15]}${HEX[(c >> 8) & 15]}${HEX[(c >> 4) & 15]}${HEX[c & 15]}`;
    }
  }
  return `${out}${s.slice(plainFrom)}"`;
}

function write(value: unknown, out: string[], seen: Set<object>): void {
  switch (typeof value) {
    case 'string':
      out.push(quoteJsonString(value));
      return;
    case 'number':
      out.push(Number.isFinite(value) ? String(value) : 'null');
      return;
    case 'bigint':
      out.push(value.toString());
      return;
    case 'boolean':
      out.push(value ? 'true' : 'false');
      return;
    case 'undefined':
      out.push('null');
      return;
    case 'object':
      break;
    default:
      throw new TypeError(`Cannot write a ${typeof value} as JSON`);
  }
  if (value === null) {
    out.push('null');
    return;
  }
  const json = (value as { toJSON?: unknown }).toJSON;
  if (typeof json === 'function') {
    write(json.call(value), out, seen);
    return;
  }
  if (seen.has(value)) throw new TypeError('Cannot write a cyclic structure as JSON');
  seen.add(value);
  if (Array.isArray(value)) {
    out.push('[');
    value.forEach((item, i) => {
      if (i > 0) out.push(', ');
      write(item, out, seen);
    });
    out.push(']');
  } else {
    out.push('{');
    let first = true;
    for (const key of Object.keys(value)) {
      const member = (value as Record<string, unknown>)[key];
      if (member === undefined || typeof member === 'function' || typeof member === 'symbol') continue;
      out.push(first ? '' : ', ', quoteJsonString(key), ': ');
      first = false;
      write(member, out, seen);
    }
    out.push('}');
  }
  seen.delete(value);
}
