import { ShearError } from '@shear/base';

/**
 * The on-disk structures of qcow2's bitmaps extension (QEMU docs/interop/qcow2.txt, "Bitmaps
 * extension", "Bitmap directory", "Bitmap table"). Pure encoding and validation; no I/O.
 * All integers big-endian, as everywhere in qcow2.
 */

export const BITMAP_IN_USE = 1;
export const BITMAP_AUTO = 2;
export const BITMAP_EXTRA_DATA_COMPATIBLE = 4;
/** Flags bits 3-31 are reserved and must be zero. */
const RESERVED_FLAGS = ~(BITMAP_IN_USE | BITMAP_AUTO | BITMAP_EXTRA_DATA_COMPATIBLE) >>> 0;
/** The only bitmap type: dirty tracking. */
export const BITMAP_TYPE_DIRTY = 1;

/** Size of the bitmaps extension's data: nb_bitmaps, reserved, directory size, directory offset. */
export const BITMAPS_EXT_BYTES = 24;
/** Fixed part of a directory entry, before extra data and name. */
const ENTRY_FIXED_BYTES = 24;

// QEMU's limits (block/qcow2-bitmap.c, block/qcow2.h): images outside them QEMU cannot open.
export const MIN_GRANULARITY_BITS = 9;
export const MAX_GRANULARITY_BITS = 31;
export const MAX_NAME_BYTES = 1023;
export const MAX_BITMAPS = 65535;
export const MAX_DIRECTORY_BYTES = 1024 * MAX_BITMAPS;
export const MAX_TABLE_ENTRIES = 0x8000000;
/** Bitmap data (table entries times cluster size) QEMU accepts per bitmap. */
export const MAX_BITMAP_DATA_BYTES = 0x20000000;

/** Bitmap table entry: bits 1-8 and 56-63 reserved; bit 0 (all ones) only without an offset. */
const TABLE_RESERVED_HI = 0xff000000;
const TABLE_RESERVED_LO = 0x000001fe;
export const TABLE_ALL_ONES = 1;

export interface BitmapsExt {
  count: number;
  directoryBytes: number;
  directoryOffset: number;
}

export interface DirEntry {
  tableOffset: number;
  tableSize: number;
  flags: number;
  type: number;
  granularityBits: number;
  name: string;
  extraDataBytes: number;
  /** The whole entry as stored, padding included (kept entries are written back byte for byte). */
  raw: Uint8Array;
  /** Byte offset of the entry inside the directory. */
  at: number;
}

function corrupt(why: string): ShearError {
  return new ShearError('ERR_QCOW2_CORRUPT', `Cannot read qcow2 bitmaps: ${why}`);
}

function pad8(n: number): number {
  return Math.ceil(n / 8) * 8;
}

function u64(v: DataView, at: number, what: string): number {
  const x = v.getBigUint64(at);
  if (x > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`${what} ${x} is too large`);
  return Number(x);
}

function setU64(v: DataView, at: number, x: number): void {
  v.setBigUint64(at, BigInt(x));
}

export function parseBitmapsExt(data: Uint8Array): BitmapsExt {
  if (data.length !== BITMAPS_EXT_BYTES) throw corrupt(`the bitmaps extension is ${data.length} bytes, not ${BITMAPS_EXT_BYTES}`);
  const v = new DataView(data.buffer, data.byteOffset, data.byteLength);
  return { count: v.getUint32(0), directoryBytes: u64(v, 8, 'bitmap_directory_size'), directoryOffset: u64(v, 16, 'bitmap_directory_offset') };
}

export function encodeBitmapsExt(ext: BitmapsExt): Uint8Array {
  const out = new Uint8Array(BITMAPS_EXT_BYTES);
  const v = new DataView(out.buffer);
  v.setUint32(0, ext.count);
  setU64(v, 8, ext.directoryBytes);
  setU64(v, 16, ext.directoryOffset);
  return out;
}

/** Checks the extension's fields before the directory is read (so a bad size cannot exhaust memory). */
export function checkBitmapsExt(ext: BitmapsExt, clusterBytes: number): void {
  if (ext.count === 0 || ext.count > MAX_BITMAPS) throw corrupt(`nb_bitmaps is ${ext.count} (1 to ${MAX_BITMAPS})`);
  if (ext.directoryBytes === 0 || ext.directoryBytes > MAX_DIRECTORY_BYTES) {
    throw corrupt(`the bitmap directory is ${ext.directoryBytes} bytes (1 to ${MAX_DIRECTORY_BYTES})`);
  }
  if (ext.directoryOffset === 0 || ext.directoryOffset % clusterBytes !== 0) {
    throw corrupt(`the bitmap directory offset ${ext.directoryOffset} is not a non-zero multiple of the cluster size`);
  }
}

/** Bytes of bitmap data for `bits` bits (one bit per granule, bit 0 = least significant bit of byte 0). */
export function bitmapDataBytes(bits: number): number {
  return Math.ceil(bits / 8);
}

/** Entries of the bitmap table of a bitmap covering `size` bytes at 2^granularityBits bytes per bit. */
export function tableEntriesFor(size: number, granularityBits: number, clusterBytes: number): number {
  return Math.ceil(bitmapDataBytes(Math.ceil(size / 2 ** granularityBits)) / clusterBytes);
}

/**
 * Parses and checks a bitmap directory of `count` entries (QEMU's checks: exact size and count,
 * unique non-empty names, aligned non-empty tables, known type, supported granularity, tables
 * large enough for the disk unless the bitmap is in use).
 * @throws ERR_QCOW2_CORRUPT, ERR_NOT_IMPLEMENTED (granularity outside 2^9..2^31)
 */
export function parseDirectory(dir: Uint8Array, count: number, clusterBytes: number, diskBytes: number): DirEntry[] {
  const v = new DataView(dir.buffer, dir.byteOffset, dir.byteLength);
  const out: DirEntry[] = [];
  const names = new Set<string>();
  const decoder = new TextDecoder('utf-8', { fatal: false });
  let at = 0;
  while (at < dir.length) {
    if (out.length === count) throw corrupt(`the directory holds more than the ${count} entries the extension announces`);
    if (at + ENTRY_FIXED_BYTES > dir.length) throw corrupt('a bitmap directory entry is truncated');
    const nameBytes = v.getUint16(at + 18);
    const extraDataBytes = v.getUint32(at + 20);
    const entryBytes = pad8(ENTRY_FIXED_BYTES + extraDataBytes + nameBytes);
    if (at + entryBytes > dir.length) throw corrupt('a bitmap directory entry runs past the directory');
    const nameAt = at + ENTRY_FIXED_BYTES + extraDataBytes;
    const e: DirEntry = {
      tableOffset: u64(v, at, 'bitmap_table_offset'),
      tableSize: v.getUint32(at + 8),
      flags: v.getUint32(at + 12),
      type: v.getUint8(at + 16),
      granularityBits: v.getUint8(at + 17),
      name: decoder.decode(dir.subarray(nameAt, nameAt + nameBytes)),
      extraDataBytes,
      raw: dir.slice(at, at + entryBytes),
      at,
    };
    const label = `bitmap '${e.name}'`;
    if (nameBytes === 0) throw corrupt('a bitmap has an empty name');
    if (nameBytes > MAX_NAME_BYTES) throw corrupt(`${label} has a name longer than ${MAX_NAME_BYTES} bytes`);
    if (names.has(e.name)) throw corrupt(`${label} appears twice`);
    names.add(e.name);
    if (e.flags & RESERVED_FLAGS) throw corrupt(`${label} has reserved flags set (0x${e.flags.toString(16)})`);
    if (e.type !== BITMAP_TYPE_DIRTY) throw corrupt(`${label} has unknown type ${e.type}`);
    if (e.tableOffset === 0 || e.tableOffset % clusterBytes !== 0) throw corrupt(`${label} has a bitmap table at unaligned offset ${e.tableOffset}`);
    if (e.tableSize === 0 || e.tableSize > MAX_TABLE_ENTRIES) throw corrupt(`${label} has a bitmap table of ${e.tableSize} entries`);
    if (e.tableSize * clusterBytes > MAX_BITMAP_DATA_BYTES) throw corrupt(`${label} has more than ${MAX_BITMAP_DATA_BYTES} bytes of data`);
    if (e.granularityBits < MIN_GRANULARITY_BITS || e.granularityBits > MAX_GRANULARITY_BITS) {
      throw new ShearError(
        'ERR_NOT_IMPLEMENTED',
        `Cannot read qcow2 bitmaps: ${label} has granularity 2^${e.granularityBits}, outside the supported 2^${MIN_GRANULARITY_BITS} to 2^${MAX_GRANULARITY_BITS}`,
      );
    }
    if (!(e.flags & BITMAP_IN_USE) && e.tableSize * clusterBytes * 8 * 2 ** e.granularityBits < diskBytes) {
      throw corrupt(`${label} has a bitmap table too small for the disk`);
    }
    out.push(e);
    at += entryBytes;
  }
  if (out.length !== count) throw corrupt(`the directory holds ${out.length} entries, the extension announces ${count}`);
  return out;
}

/** A directory entry without extra data, padded to 8 bytes. */
export function encodeEntry(e: { tableOffset: number; tableSize: number; flags: number; granularityBits: number; name: string }): Uint8Array {
  const name = new TextEncoder().encode(e.name);
  const out = new Uint8Array(pad8(ENTRY_FIXED_BYTES + name.length));
  const v = new DataView(out.buffer);
  setU64(v, 0, e.tableOffset);
  v.setUint32(8, e.tableSize);
  v.setUint32(12, e.flags);
  v.setUint8(16, BITMAP_TYPE_DIRTY);
  v.setUint8(17, e.granularityBits);
  v.setUint16(18, name.length);
  v.setUint32(20, 0);
  out.set(name, ENTRY_FIXED_BYTES);
  return out;
}

/** Byte offset of the flags field inside an entry. */
export const ENTRY_FLAGS_AT = 12;

export type TableEntry = { kind: 'zeroes' } | { kind: 'ones' } | { kind: 'data'; offset: number };

/** Decodes bitmap table entry `i` of `table`. @throws ERR_QCOW2_CORRUPT for reserved bits or a misaligned offset */
export function decodeTableEntry(table: DataView, i: number, clusterBytes: number, label: string): TableEntry {
  const hi = table.getUint32(i * 8);
  const lo = table.getUint32(i * 8 + 4);
  if (hi & TABLE_RESERVED_HI || lo & TABLE_RESERVED_LO) throw corrupt(`entry ${i} of the table of ${label} has reserved bits set`);
  const offset = hi * 2 ** 32 + ((lo & 0xfffffe00) >>> 0);
  if (offset === 0) return lo & TABLE_ALL_ONES ? { kind: 'ones' } : { kind: 'zeroes' };
  if (lo & TABLE_ALL_ONES) throw corrupt(`entry ${i} of the table of ${label} has both an offset and the all-ones flag`);
  if (offset % clusterBytes !== 0) throw corrupt(`entry ${i} of the table of ${label} points at unaligned offset ${offset}`);
  return { kind: 'data', offset };
}

export function encodeTableEntry(table: DataView, i: number, e: TableEntry): void {
  const x = e.kind === 'data' ? e.offset : e.kind === 'ones' ? TABLE_ALL_ONES : 0;
  table.setUint32(i * 8, Math.floor(x / 2 ** 32));
  table.setUint32(i * 8 + 4, x % 2 ** 32);
}
