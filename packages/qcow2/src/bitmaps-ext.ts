import { ShearError } from '@shear/base';
import { BITMAPS_EXT_BYTES, encodeBitmapsExt, type BitmapsExt } from './bitmaps-format.js';
import { readPadded } from './file-util.js';
import type { GrowableIO } from './growable-io.js';
import { AUTOCLEAR_BITMAPS, EXT_BITMAPS, EXT_FEATURE_TABLE, FIELD_AUTOCLEAR, parseHeaderCluster, type HeaderExtension, type ParsedHeader } from './header.js';

/**
 * Changes to the bitmaps header extension and autoclear bit 0, ordered so that a crash between
 * any two writes (each write reaching the disk whole, in order, as the flushes enforce) leaves
 * either the old bitmaps or the new ones, never a directory the header describes wrongly:
 *
 * - Every header write is one of: 8 aligned bytes (autoclear field, backing file offset, an
 *   extension's type/length), or the 24 bytes of the extension's data. Aligned 8-byte writes
 *   never straddle a 512-byte sector; the 24 bytes are written in place only when they lie in
 *   one sector, else with autoclear bit 0 cleared around the write.
 * - The autoclear bit is never set while the extension is absent (the spec calls that an
 *   error); windows where the extension is present and the bit clear make QEMU ignore all
 *   bitmaps and report their clusters as leaked, which loses bitmaps but trusts nothing wrong.
 *
 * Shear otherwise never rewrites the extension area: an extension is added by writing its data
 * and a new end marker past the current end marker (bytes nobody reads), then its type and
 * length over the old end marker in one 8-byte write. The backing file name, stored right
 * after the end marker, is first copied further into the header cluster if it is in the way
 * and the header pointed at the copy.
 *
 * When the header cluster is full (Shear's 512-byte-cluster images: the feature name table
 * fills it) and the feature name table is the last extension, the table gives up its last
 * entries: the new extension is written over them, then the table's length shrinks in one
 * aligned write. The table only names features for error messages, so the entries garbled
 * meanwhile cost nothing but names.
 */

const SECTOR_BYTES = 512;
const EXT_HEADER_BYTES = 8;
const FIELD_BACKING_FILE_OFFSET = 8;
const FEATURE_ENTRY_BYTES = 48;
/** Room the bitmaps extension needs: its type/length, its data, the new end marker. */
const ADDED_BYTES = EXT_HEADER_BYTES + BITMAPS_EXT_BYTES + EXT_HEADER_BYTES;

function sameSector(offset: number, bytes: number): boolean {
  return Math.floor(offset / SECTOR_BYTES) === Math.floor((offset + bytes - 1) / SECTOR_BYTES);
}

function pad8(n: number): number {
  return Math.ceil(n / 8) * 8;
}

function u64Bytes(x: bigint | number): Uint8Array {
  const raw = new Uint8Array(8);
  new DataView(raw.buffer).setBigUint64(0, BigInt(x));
  return raw;
}

/** The header as it is on disk now (bitmap operations never trust a cached copy). */
export async function readHeader(file: GrowableIO, clusterBytes: number): Promise<ParsedHeader> {
  const cluster0 = new Uint8Array(clusterBytes);
  await readPadded(file, 0, cluster0);
  return parseHeaderCluster(cluster0);
}

export function bitmapsExtension(p: ParsedHeader): HeaderExtension | undefined {
  return p.extensions.find((e) => e.type === EXT_BITMAPS);
}

/** Whether the bitmaps extension is there and trusted (autoclear bit 0 set). */
export function bitmapsConsistent(p: ParsedHeader): boolean {
  return bitmapsExtension(p) !== undefined && (p.header.autoclearFeatures & AUTOCLEAR_BITMAPS) !== 0n;
}

async function writeSync(file: GrowableIO, offset: number, data: Uint8Array): Promise<void> {
  await file.write(offset, data);
  await file.flush();
}

async function setAutoclear(file: GrowableIO, p: ParsedHeader, on: boolean): Promise<void> {
  const value = on ? p.header.autoclearFeatures | AUTOCLEAR_BITMAPS : p.header.autoclearFeatures & ~AUTOCLEAR_BITMAPS;
  if (value === p.header.autoclearFeatures) return;
  await writeSync(file, FIELD_AUTOCLEAR, u64Bytes(value));
  p.header.autoclearFeatures = value;
}

/** Where the extension area's end marker is: after the last extension. */
function endMarkerAt(p: ParsedHeader): number {
  const last = p.extensions[p.extensions.length - 1];
  return last ? last.dataOffset + pad8(last.data.length) : p.header.headerLength;
}

/**
 * Points the header at a new bitmap directory (`next`), or removes the bitmaps (`null`). The
 * directory `next` names must already be durable, with its refcounts. `p` is the header as read
 * just before; it is updated to match the disk.
 * @throws ERR_NOT_IMPLEMENTED when the extension must be added and the header cluster has no room
 */
export async function switchBitmapsExt(file: GrowableIO, clusterBytes: number, p: ParsedHeader, next: BitmapsExt | null): Promise<void> {
  const ext = bitmapsExtension(p);
  if (next === null) {
    if (!ext) return;
    await setAutoclear(file, p, false);
    // With the bit clear the extension is ignored; drop it when that is one aligned 8-byte write.
    const isLast = ext === p.extensions[p.extensions.length - 1];
    if (isLast) {
      await writeSync(file, ext.dataOffset - EXT_HEADER_BYTES, new Uint8Array(EXT_HEADER_BYTES));
      p.extensions = p.extensions.filter((e) => e !== ext);
    }
    return;
  }
  const data = encodeBitmapsExt(next);
  if (ext) {
    if (ext.data.length !== BITMAPS_EXT_BYTES) {
      throw new ShearError('ERR_QCOW2_CORRUPT', `Cannot update qcow2 bitmaps: the bitmaps extension is ${ext.data.length} bytes, not ${BITMAPS_EXT_BYTES}`);
    }
    if (!sameSector(ext.dataOffset, BITMAPS_EXT_BYTES)) await setAutoclear(file, p, false);
    await writeSync(file, ext.dataOffset, data);
    ext.data = data;
    await setAutoclear(file, p, true);
    return;
  }
  await addBitmapsExt(file, clusterBytes, p, data);
}

/**
 * How many feature table entries to keep so that the new extension fits before `limit`, or
 * null when the table is not the last extension or cannot shrink enough.
 */
function featureEntriesToKeep(p: ParsedHeader, limit: number): number | null {
  const ft = p.extensions[p.extensions.length - 1];
  if (!ft || ft.type !== EXT_FEATURE_TABLE) return null;
  for (let k = Math.floor(ft.data.length / FEATURE_ENTRY_BYTES) - 1; k >= 0; k--) {
    if (ft.dataOffset + pad8(k * FEATURE_ENTRY_BYTES) + ADDED_BYTES <= limit) return k;
  }
  return null;
}

async function addBitmapsExt(file: GrowableIO, clusterBytes: number, p: ParsedHeader, data: Uint8Array): Promise<void> {
  const h = p.header;
  const nameBytes = h.backingFileOffset !== 0 ? h.backingFileSize : 0;
  const noRoom = (why: string): ShearError =>
    new ShearError('ERR_NOT_IMPLEMENTED', `Cannot add the bitmaps extension to qcow2 image: ${why} in its ${clusterBytes}-byte header cluster`);
  let endAt = endMarkerAt(p);
  let keepFeatures: number | null = null;
  if (endAt + ADDED_BYTES > clusterBytes) {
    // Shrinking the feature table is only done where the backing file name need not move too.
    const limit = nameBytes > 0 && h.backingFileOffset >= endAt ? h.backingFileOffset : clusterBytes;
    keepFeatures = featureEntriesToKeep(p, limit);
    if (keepFeatures === null) throw noRoom('there is no room');
    const ft = p.extensions[p.extensions.length - 1]!;
    endAt = ft.dataOffset + pad8(keepFeatures * FEATURE_ENTRY_BYTES);
  }
  const newEnd = endAt + ADDED_BYTES;
  if (nameBytes > 0 && h.backingFileOffset < newEnd && h.backingFileOffset + nameBytes > endAt) {
    const to = Math.max(newEnd, h.backingFileOffset + nameBytes);
    if (to + nameBytes > clusterBytes) throw noRoom('the backing file name cannot be moved');
    const name = new Uint8Array(nameBytes);
    await readPadded(file, h.backingFileOffset, name);
    await writeSync(file, to, name);
    await writeSync(file, FIELD_BACKING_FILE_OFFSET, u64Bytes(to));
    h.backingFileOffset = to;
  }
  // Data and the new end marker where no reader looks yet, then the type/length that links
  // them in (over the old end marker; or inside the feature table, which then shrinks).
  const body = new Uint8Array(BITMAPS_EXT_BYTES + EXT_HEADER_BYTES);
  body.set(data);
  await writeSync(file, endAt + EXT_HEADER_BYTES, body);
  const head = new Uint8Array(EXT_HEADER_BYTES);
  const hv = new DataView(head.buffer);
  hv.setUint32(0, EXT_BITMAPS);
  hv.setUint32(4, BITMAPS_EXT_BYTES);
  await writeSync(file, endAt, head);
  if (keepFeatures !== null) {
    const ft = p.extensions[p.extensions.length - 1]!;
    const len = new Uint8Array(4);
    new DataView(len.buffer).setUint32(0, keepFeatures * FEATURE_ENTRY_BYTES);
    await writeSync(file, ft.dataOffset - 4, len);
    ft.data = ft.data.slice(0, keepFeatures * FEATURE_ENTRY_BYTES);
  }
  p.extensions.push({ type: EXT_BITMAPS, dataOffset: endAt + EXT_HEADER_BYTES, data });
  await setAutoclear(file, p, true);
}
