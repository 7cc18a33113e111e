import { ShearError } from '@shear/base';

/**
 * Parses an option given either as JSON (`{"driver": "file", ...}`) or in QEMU's key=value
 * form (`driver=file,node-name=disk0,filename=/x,,y.raw,cache.direct=on`): `,,` is a literal
 * comma, dotted keys build nested objects, and values that QEMU would convert are converted
 * (on/off/true/false to booleans, plain integers to numbers).
 * @throws ERR_INVALID_ARGUMENT for malformed input
 */
export function parseOptionValue(text: string, what: string): Record<string, unknown> {
  const trimmed = text.trim();
  if (trimmed.startsWith('{')) {
    try {
      const v = JSON.parse(trimmed) as unknown;
      if (typeof v === 'object' && v !== null && !Array.isArray(v)) return v as Record<string, unknown>;
    } catch (err) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot parse ${what}: ${(err as Error).message}`);
    }
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot parse ${what}: expected a JSON object`);
  }
  const out: Record<string, unknown> = {};
  for (const item of splitUnescaped(trimmed)) {
    const eq = item.indexOf('=');
    if (eq <= 0) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot parse ${what}: "${item}" is not key=value`);
    const path = item.slice(0, eq).split('.');
    const raw = item.slice(eq + 1);
    let obj = out;
    for (const key of path.slice(0, -1)) {
      const next = obj[key];
      if (next === undefined) obj = obj[key] = {} as Record<string, unknown>;
      else if (typeof next === 'object' && next !== null) obj = next as Record<string, unknown>;
      else throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot parse ${what}: "${key}" is both a value and an object`);
    }
    obj[path.at(-1)!] = convert(raw);
  }
  return out;
}

function convert(raw: string): unknown {
  if (raw === 'on' || raw === 'true') return true;
  if (raw === 'off' || raw === 'false') return false;
  if (/^-?\d+$/.test(raw) && Number.isSafeInteger(Number(raw))) return Number(raw);
  return raw;
}

function splitUnescaped(s: string): string[] {
  const parts: string[] = [];
  let cur = '';
  for (let i = 0; i < s.length; i++) {
    if (s[i] === ',' && s[i + 1] === ',') {
      cur += ',';
      i++;
    } else if (s[i] === ',') {
      parts.push(cur);
      cur = '';
    } else {
      cur += s[i];
    }
  }
  if (cur) parts.push(cur);
  return parts;
}
