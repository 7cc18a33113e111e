/** Bit tricks on 32-bit words. Bit i of a word is (word >>> i) & 1: least significant first. */

export function popcount32(v: number): number {
  v = v - ((v >>> 1) & 0x55555555);
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return (Math.imul((v + (v >>> 4)) & 0x0f0f0f0f, 0x01010101) >>> 24);
}

/** Index of the lowest set bit; v must be non-zero. */
export function lowestSetBit(v: number): number {
  return 31 - Math.clz32(v & -v);
}

/** A mask of bits [from, to] inclusive, 0 <= from <= to <= 31. */
export function maskBetween(from: number, to: number): number {
  const high = to === 31 ? -1 : (1 << (to + 1)) - 1;
  return high & (-1 << from);
}
