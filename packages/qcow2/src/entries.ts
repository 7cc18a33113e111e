import { ShearError } from '@shear/base';

/**
 * L1 and L2 table entries. An entry is 64 bits, big-endian; it is handled as two 32-bit halves
 * (hi, lo) so that plain numbers suffice. Host offsets use bits 9-55, so they fit a safe
 * integer only below 2^53 (8 PiB), which Shear checks.
 */
const TWO_32 = 2 ** 32;
const HI_COPIED = 0x80000000;
const HI_COMPRESSED = 0x40000000;
const HI_OFFSET_MASK = 0x00ffffff;
const LO_OFFSET_MASK = 0xfffffe00;
const LO_ZERO = 1;
/** hi bits of an offset that would not be a safe integer (bits 53-55). */
const HI_UNSAFE_OFFSET = 0x00e00000;

export type ClusterKind = 'unallocated' | 'zero-plain' | 'zero-alloc' | 'normal' | 'compressed';

export interface ClusterEntry {
  kind: ClusterKind;
  /** Host offset of the cluster (normal, zero-alloc) or of the compressed data (compressed); 0 otherwise. */
  hostOffset: number;
  /** Bytes of compressed data from hostOffset (to the end of the last 512-byte sector); 0 otherwise. */
  compressedBytes: number;
  /** The refcount of the host cluster is exactly one (the "copied" flag, bit 63). */
  copied: boolean;
  hi: number;
  lo: number;
}

function offsetOf(hi: number, lo: number, what: string): number {
  if (hi & HI_UNSAFE_OFFSET) {
    throw new ShearError('ERR_QCOW2_CORRUPT', `Cannot read qcow2 ${what}: host offset is beyond 2^53 bytes`);
  }
  return (hi & HI_OFFSET_MASK) * TWO_32 + ((lo & LO_OFFSET_MASK) >>> 0);
}

/** Decodes an L1 entry: the host offset of the L2 table (0 = none) and whether its refcount is one. */
export function decodeL1(hi: number, lo: number, clusterBytes: number): { l2Offset: number; copied: boolean } {
  const l2Offset = offsetOf(hi, lo, 'L1 entry');
  if (l2Offset % clusterBytes !== 0) {
    throw new ShearError('ERR_QCOW2_CORRUPT', `Cannot read qcow2 L1 entry: L2 table offset ${l2Offset} is not cluster aligned`);
  }
  return { l2Offset, copied: (hi & HI_COPIED) !== 0 };
}

/** Decodes a standard (not extended) L2 entry. `zeroFlag` is false for version 2 images, where bit 0 is reserved. */
export function decodeL2(hi: number, lo: number, clusterBits: number, zeroFlag: boolean): ClusterEntry {
  hi >>>= 0;
  lo >>>= 0;
  const copied = (hi & HI_COPIED) !== 0;
  if (hi & HI_COMPRESSED) {
    // x = 62 - (cluster_bits - 8): bits 0..x-1 hold the byte offset, bits x..61 the extra sectors.
    const x = 62 - (clusterBits - 8);
    const full = (BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo);
    const off = full & ((1n << BigInt(x)) - 1n);
    if (off > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new ShearError('ERR_QCOW2_CORRUPT', 'Cannot read qcow2 L2 entry: compressed data offset is beyond 2^53 bytes');
    }
    const hostOffset = Number(off);
    const extraSectors = Number(full >> BigInt(x));
    const compressedBytes = (extraSectors + 1) * 512 - (hostOffset % 512);
    return { kind: 'compressed', hostOffset, compressedBytes, copied: false, hi, lo };
  }
  const hostOffset = offsetOf(hi, lo, 'L2 entry');
  let kind: ClusterKind;
  if (zeroFlag && lo & LO_ZERO) kind = hostOffset === 0 ? 'zero-plain' : 'zero-alloc';
  else kind = hostOffset === 0 ? 'unallocated' : 'normal';
  return { kind, hostOffset, compressedBytes: 0, copied, hi, lo };
}

export interface RawEntry {
  hi: number;
  lo: number;
}

/** A standard entry pointing at `hostOffset` (0 for none), optionally reading as zeroes. */
export function encodeStandard(hostOffset: number, opts: { copied: boolean; zero?: boolean }): RawEntry {
  const hiOff = Math.floor(hostOffset / TWO_32);
  const lo = (hostOffset % TWO_32) | (opts.zero ? LO_ZERO : 0);
  const hi = hiOff | (opts.copied && hostOffset !== 0 ? HI_COPIED : 0);
  return { hi: hi >>> 0, lo: lo >>> 0 };
}

/** A compressed cluster descriptor for `bytes` of deflate data at byte `hostOffset`. */
export function encodeCompressed(hostOffset: number, bytes: number, clusterBits: number): RawEntry {
  const x = 62 - (clusterBits - 8);
  if (hostOffset >= 2 ** x) {
    throw new ShearError('ERR_INTERNAL', `Cannot describe compressed data at ${hostOffset}: the offset needs more than ${x} bits`);
  }
  const extraSectors = Math.floor(((hostOffset % 512) + bytes - 1) / 512);
  const full = (1n << 62n) | (BigInt(extraSectors) << BigInt(x)) | BigInt(hostOffset);
  return { hi: Number(full >> 32n) >>> 0, lo: Number(full & 0xffffffffn) >>> 0 };
}

export const EMPTY_ENTRY: RawEntry = { hi: 0, lo: 0 };
