import { ShearError } from '@shear/base';
import { readPadded } from './file-util.js';
import type { GrowableIO } from './growable-io.js';

export const BITMAP_IN_USE = 1;
export const BITMAP_AUTO = 2;

export interface BitmapDirEntry {
  name: string;
  flags: number;
  /** File offset of this entry's 32-bit flags field. */
  flagsOffset: number;
}

/** Reads the bitmap directory named by the bitmaps header extension (`ext` is the extension's data). */
export async function readBitmapDirectory(file: GrowableIO, ext: Uint8Array): Promise<BitmapDirEntry[]> {
  if (ext.length < 24) throw corrupt('the bitmaps extension is shorter than 24 bytes');
  const v = new DataView(ext.buffer, ext.byteOffset, ext.byteLength);
  const count = v.getUint32(0);
  const dirBytes = Number(v.getBigUint64(8));
  const dirOffset = Number(v.getBigUint64(16));
  if (dirBytes > 64 * 1024 * 1024) throw corrupt(`the bitmap directory is ${dirBytes} bytes`);
  const dir = new Uint8Array(dirBytes);
  await readPadded(file, dirOffset, dir);
  const dv = new DataView(dir.buffer);
  const out: BitmapDirEntry[] = [];
  let at = 0;
  for (let i = 0; i < count; i++) {
    if (at + 24 > dir.length) throw corrupt('the bitmap directory is truncated');
    const flags = dv.getUint32(at + 12);
    const nameBytes = dv.getUint16(at + 18);
    const extraBytes = dv.getUint32(at + 20);
    const nameAt = at + 24 + extraBytes;
    if (nameAt + nameBytes > dir.length) throw corrupt('a bitmap directory entry is truncated');
    out.push({ name: new TextDecoder().decode(dir.subarray(nameAt, nameAt + nameBytes)), flags, flagsOffset: dirOffset + at + 12 });
    at += Math.ceil((24 + extraBytes + nameBytes) / 8) * 8;
  }
  return out;
}

/** Sets the in_use flag of `entries` in place: their content is no longer trusted by anyone. */
export async function markBitmapsInUse(file: GrowableIO, entries: readonly BitmapDirEntry[]): Promise<void> {
  for (const e of entries) {
    const raw = new Uint8Array(4);
    new DataView(raw.buffer).setUint32(0, e.flags | BITMAP_IN_USE);
    await file.write(e.flagsOffset, raw);
  }
  await file.flush();
}

function corrupt(why: string): ShearError {
  return new ShearError('ERR_QCOW2_CORRUPT', `Cannot read qcow2 bitmaps: ${why}`);
}
