import { ShearError } from '@shear/base';
import type { ClusterEntry } from './entries.js';
import { readPadded } from './file-util.js';
import type { GrowableIO } from './growable-io.js';
import type { Qcow2Header } from './header.js';

/**
 * Structural checks of a qcow2 image against its own file: tables and clusters that point past
 * the end of the file, misaligned offsets, reserved bits set. Bytes past the end of a file read
 * as zeroes, so without these checks a truncated image reads as a disk full of zeroes, which
 * hides the loss (QEMU's `qemu-img check` calls the same images corrupt).
 *
 * "Past the end" follows qemu-img check: a region reaching one whole cluster or more past the
 * end of the file. A file may end inside its last cluster (qemu-img writes an empty image's L1
 * table as the file's last 8 bytes), so a shorter overhang is not an error.
 */

function corrupt(why: string, offset: number): ShearError {
  return new ShearError('ERR_QCOW2_CORRUPT', `Cannot read qcow2 image: ${why}`, { offset });
}

export function pastEnd(offset: number, bytes: number, fileLength: number, clusterBytes: number): boolean {
  return offset + bytes - fileLength >= clusterBytes;
}

function checkRegion(what: string, offset: number, bytes: number, fileLength: number, clusterBytes: number): void {
  if (pastEnd(offset, bytes, fileLength, clusterBytes)) {
    throw corrupt(`${what} at offset ${offset} (${bytes} bytes) lies past the end of the file (${fileLength} bytes)`, offset);
  }
}

/** Reserved bits of an L1 entry or refcount table entry: 0-8 (lo) and 56-62 (hi); refcount entries have no bit 63 either. */
const TABLE_RESERVED_LO = 0x1ff;
const L1_RESERVED_HI = 0x7f000000;
const REFTABLE_RESERVED_HI = 0xff000000;
/** Reserved bits of a standard L2 entry: 1-8 (lo) and 56-61 (hi). */
const L2_RESERVED_LO = 0x1fe;
const L2_RESERVED_HI = 0x3f000000;

/**
 * Reads the L1 table and checks it, the refcount table and every table they point at against
 * the file: what open can check cheaply (both tables are small and read once).
 * @returns the raw L1 table
 * @throws ERR_QCOW2_CORRUPT naming the first bad offset
 */
export async function loadCheckedTables(file: GrowableIO, h: Qcow2Header, clusterBytes: number): Promise<Uint8Array> {
  const len = file.length;
  checkRegion('the L1 table', h.l1TableOffset, h.l1Size * 8, len, clusterBytes);
  checkRegion('the refcount table', h.refcountTableOffset, h.refcountTableClusters * clusterBytes, len, clusterBytes);
  const l1Raw = new Uint8Array(h.l1Size * 8);
  if (h.l1Size > 0) await readPadded(file, h.l1TableOffset, l1Raw);
  checkTable(l1Raw, 'L1 entry', 'an L2 table', L1_RESERVED_HI, len, clusterBytes, h.l1TableOffset);
  const reftable = new Uint8Array(h.refcountTableClusters * clusterBytes);
  await readPadded(file, h.refcountTableOffset, reftable);
  checkTable(reftable, 'refcount table entry', 'a refcount block', REFTABLE_RESERVED_HI, len, clusterBytes, h.refcountTableOffset);
  return l1Raw;
}

function checkTable(raw: Uint8Array, entry: string, points: string, reservedHi: number, len: number, clusterBytes: number, tableOffset: number): void {
  const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
  for (let i = 0; i < raw.length / 8; i++) {
    const hi = view.getUint32(i * 8);
    const lo = view.getUint32(i * 8 + 4);
    if (hi === 0 && lo === 0) continue;
    const at = tableOffset + i * 8;
    if (hi & reservedHi || lo & TABLE_RESERVED_LO) {
      throw corrupt(`${entry} ${i} (at offset ${at}) has reserved bits set (0x${hi.toString(16).padStart(8, '0')}${lo.toString(16).padStart(8, '0')})`, at);
    }
    const offset = (hi & 0x00ffffff) * 2 ** 32 + lo;
    if (offset === 0) continue;
    if (offset % clusterBytes !== 0) throw corrupt(`${entry} ${i} points to ${points} at offset ${offset}, which is not cluster aligned`, offset);
    checkRegion(`${points} (${entry} ${i})`, offset, clusterBytes, len, clusterBytes);
  }
}

/**
 * Checks the L2 entry of guest cluster `g` before it is used: reserved bits, alignment, and
 * that its data lies inside the file.
 * @throws ERR_QCOW2_CORRUPT naming the first bad offset
 */
export function checkL2Entry(e: ClusterEntry, g: number, fileLength: number, clusterBytes: number): ClusterEntry {
  if (e.kind === 'unallocated' || e.kind === 'zero-plain') {
    if (e.hi & L2_RESERVED_HI || e.lo & L2_RESERVED_LO) throw reserved(e, g, clusterBytes);
    return e;
  }
  if (e.kind === 'compressed') {
    checkRegion(`the compressed data of guest cluster ${g} (guest offset ${g * clusterBytes})`, e.hostOffset, e.compressedBytes, fileLength, clusterBytes);
    return e;
  }
  if (e.hi & L2_RESERVED_HI || e.lo & L2_RESERVED_LO) throw reserved(e, g, clusterBytes);
  if (e.hostOffset % clusterBytes !== 0) {
    throw corrupt(`the L2 entry of guest cluster ${g} (guest offset ${g * clusterBytes}) points to host offset ${e.hostOffset}, which is not cluster aligned`, e.hostOffset);
  }
  checkRegion(`the data of guest cluster ${g} (guest offset ${g * clusterBytes})`, e.hostOffset, clusterBytes, fileLength, clusterBytes);
  return e;
}

function reserved(e: ClusterEntry, g: number, clusterBytes: number): ShearError {
  const raw = `0x${e.hi.toString(16).padStart(8, '0')}${e.lo.toString(16).padStart(8, '0')}`;
  return corrupt(`the L2 entry of guest cluster ${g} (guest offset ${g * clusterBytes}) has reserved bits set (${raw})`, g * clusterBytes);
}
