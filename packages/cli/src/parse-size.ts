import { ShearError } from '@shear/base';

const SUFFIX: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 };

/** Parses "4194304", "4M", "64k", "1G", "512KiB" into bytes (binary units, as qemu-img). */
export function parseSize(value: string, what: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$/i.exec(value.trim());
  if (!m) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot parse ${what} "${value}": expected a number of bytes, optionally with k, M, G or T`);
  const bytes = Math.round(Number(m[1]) * SUFFIX[m[2]!.toLowerCase()]!);
  if (!Number.isSafeInteger(bytes)) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot use ${what} "${value}": it is too large`);
  return bytes;
}
