import { crc32 } from 'node:zlib';
import { ShearError, isShearError } from '@shear/base';
import { deserializeBitmap, serializeBitmap, type SharedBitmap } from '@shear/bitmap';
import { MAX_BITMAP_GRANULARITY_BYTES, MAX_BITMAP_NAME_BYTES, MIN_BITMAP_GRANULARITY_BYTES } from './limits.js';

/**
 * The bitmap sidecar file (`<image>.shear-bitmaps`): persistent bitmaps of an image format
 * that has no room for them (raw). Layout (all integers little-endian, like the portable
 * bitmap form it embeds; the package README documents it for people):
 *
 * ```
 * header, 48 bytes
 *  0  8 bytes  magic "SHEARSC\0"
 *  8  u32      format version (1)
 * 12  u32      number of records
 * 16  u64      image size in bytes
 * 24  u64      image modification time, ns since the epoch, when the file was written
 * 32  u64      image inode number, when the file was written
 * 40  u64      length of the whole file in bytes
 * records, each starting 8-byte aligned
 *  0  u32      record length in bytes (padding included)
 *  4  u32      flags: bit 0 in_use, bit 1 enabled; bits 2-31 zero
 *  8  u32      log2(granularity)
 * 12  u16      name length in bytes (1 to 1023)
 * 14  u16      zero
 * 16  u64      length of the serialised bitmap
 * 24  ...      name (UTF-8), then the bitmap in @shear/bitmap's serialised form (which has its
 *              own CRC), then zero padding to 8 bytes
 * trailer
 *  0  u32      CRC-32 of every byte before it
 * ```
 * Decoding checks every field and both CRCs; any damage is ERR_BITMAP_CORRUPT, never a
 * silently different set of bitmaps.
 */

const MAGIC = Buffer.from('SHEARSC\0', 'latin1');
export const SIDECAR_FORMAT_VERSION = 1;
const HEADER_BYTES = 48;
const RECORD_FIXED_BYTES = 24;
const CRC_BYTES = 4;
export const SIDECAR_IN_USE = 1;
export const SIDECAR_ENABLED = 2;
const KNOWN_FLAGS = SIDECAR_IN_USE | SIDECAR_ENABLED;

/** The image the sidecar was written for, as `stat` saw it then. */
export interface ImageIdentity {
  size: number;
  mtimeNs: bigint;
  ino: bigint;
}

export interface SidecarRecord {
  name: string;
  flags: number;
  granularityLog2: number;
  /** The bitmap in its serialised form (kept as bytes so records can be carried over unchanged). */
  serialized: Uint8Array;
  /** The bitmap itself, when decoded from a file. */
  bits?: SharedBitmap;
}

function pad8(n: number): number {
  return Math.ceil(n / 8) * 8;
}

export function recordFor(name: string, bits: SharedBitmap, flags: number): SidecarRecord {
  return { name, flags, granularityLog2: Math.log2(bits.granularity), serialized: serializeBitmap(bits) };
}

export function encodeSidecar(image: ImageIdentity, records: readonly SidecarRecord[]): Uint8Array {
  const parts = records.map((r) => {
    const name = Buffer.from(r.name, 'utf8');
    const bytes = pad8(RECORD_FIXED_BYTES + name.length + r.serialized.length);
    const rec = Buffer.alloc(bytes);
    rec.writeUInt32LE(bytes, 0);
    rec.writeUInt32LE(r.flags, 4);
    rec.writeUInt32LE(r.granularityLog2, 8);
    rec.writeUInt16LE(name.length, 12);
    rec.writeBigUInt64LE(BigInt(r.serialized.length), 16);
    name.copy(rec, RECORD_FIXED_BYTES);
    rec.set(r.serialized, RECORD_FIXED_BYTES + name.length);
    return rec;
  });
  const total = HEADER_BYTES + parts.reduce((s, p) => s + p.length, 0) + CRC_BYTES;
  const out = Buffer.alloc(total);
  MAGIC.copy(out, 0);
  out.writeUInt32LE(SIDECAR_FORMAT_VERSION, 8);
  out.writeUInt32LE(records.length, 12);
  out.writeBigUInt64LE(BigInt(image.size), 16);
  out.writeBigUInt64LE(image.mtimeNs, 24);
  out.writeBigUInt64LE(image.ino, 32);
  out.writeBigUInt64LE(BigInt(total), 40);
  let at = HEADER_BYTES;
  for (const p of parts) {
    p.copy(out, at);
    at += p.length;
  }
  out.writeUInt32LE(crc32(out.subarray(0, total - CRC_BYTES)), total - CRC_BYTES);
  return out;
}

export interface DecodedSidecar {
  image: ImageIdentity;
  records: SidecarRecord[];
}

/**
 * Checks and splits a sidecar file; bitmaps are checked (deserialised) but returned as bytes.
 * @throws ERR_BITMAP_CORRUPT
 */
export function decodeSidecar(data: Uint8Array, where: string): DecodedSidecar {
  const corrupt = (why: string, cause?: unknown): ShearError =>
    new ShearError('ERR_BITMAP_CORRUPT', `Cannot load bitmap sidecar '${where}': ${why}`, { path: where }, cause === undefined ? undefined : { cause });
  const buf = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  if (buf.length < HEADER_BYTES + CRC_BYTES) throw corrupt(`${buf.length} bytes is shorter than a header`);
  if (!buf.subarray(0, 8).equals(MAGIC)) throw corrupt('bad magic');
  if (crc32(buf.subarray(0, buf.length - CRC_BYTES)) !== buf.readUInt32LE(buf.length - CRC_BYTES)) throw corrupt('checksum mismatch');
  const version = buf.readUInt32LE(8);
  if (version !== SIDECAR_FORMAT_VERSION) throw corrupt(`unknown format version ${version}`);
  const count = buf.readUInt32LE(12);
  const size = Number(buf.readBigUInt64LE(16));
  if (!Number.isSafeInteger(size) || size <= 0) throw corrupt(`image size ${size} out of range`);
  if (buf.readBigUInt64LE(40) !== BigInt(buf.length)) throw corrupt('the file length does not match its header');
  const image: ImageIdentity = { size, mtimeNs: buf.readBigUInt64LE(24), ino: buf.readBigUInt64LE(32) };
  const records: SidecarRecord[] = [];
  const names = new Set<string>();
  const end = buf.length - CRC_BYTES;
  let at = HEADER_BYTES;
  for (let i = 0; i < count; i++) {
    if (at + RECORD_FIXED_BYTES > end) throw corrupt(`record ${i} is truncated`);
    const bytes = buf.readUInt32LE(at);
    const flags = buf.readUInt32LE(at + 4);
    const granularityLog2 = buf.readUInt32LE(at + 8);
    const nameBytes = buf.readUInt16LE(at + 12);
    const serializedBytes = Number(buf.readBigUInt64LE(at + 16));
    const used = RECORD_FIXED_BYTES + nameBytes + serializedBytes;
    if (bytes !== pad8(used) || at + bytes > end) throw corrupt(`record ${i} has a bad length`);
    if (buf.readUInt16LE(at + 14) !== 0 || buf.subarray(at + used, at + bytes).some((b) => b !== 0)) throw corrupt(`record ${i} has non-zero reserved bytes`);
    if (flags & ~KNOWN_FLAGS) throw corrupt(`record ${i} has unknown flags 0x${flags.toString(16)}`);
    if (nameBytes === 0 || nameBytes > MAX_BITMAP_NAME_BYTES) throw corrupt(`record ${i} has a name of ${nameBytes} bytes`);
    if (2 ** granularityLog2 < MIN_BITMAP_GRANULARITY_BYTES || 2 ** granularityLog2 > MAX_BITMAP_GRANULARITY_BYTES) {
      throw corrupt(`record ${i} has granularity 2^${granularityLog2}`);
    }
    const rawName = buf.subarray(at + RECORD_FIXED_BYTES, at + RECORD_FIXED_BYTES + nameBytes);
    const name = rawName.toString('utf8');
    if (!Buffer.from(name, 'utf8').equals(rawName)) throw corrupt(`record ${i} has a name that is not UTF-8`);
    if (names.has(name)) throw corrupt(`bitmap "${name}" appears twice`);
    names.add(name);
    const serialized = buf.subarray(at + RECORD_FIXED_BYTES + nameBytes, at + used);
    let bits: SharedBitmap;
    try {
      bits = deserializeBitmap(serialized);
    } catch (err) {
      if (isShearError(err, 'ERR_BITMAP_CORRUPT')) throw corrupt(`bitmap "${name}": ${err.message}`, err);
      throw err;
    }
    if (bits.size !== size) throw corrupt(`bitmap "${name}" covers ${bits.size} bytes, the image ${size}`);
    if (bits.granularity !== 2 ** granularityLog2) throw corrupt(`bitmap "${name}" has granularity ${bits.granularity}, its record says 2^${granularityLog2}`);
    records.push({ name, flags, granularityLog2, serialized: Uint8Array.from(serialized), bits });
    at += bytes;
  }
  if (at !== end) throw corrupt('bytes follow the last record');
  return { image, records };
}
