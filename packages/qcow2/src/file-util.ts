import type { GrowableIO } from './growable-io.js';

/** Reads `buf` at `offset`; bytes past the end of the file read as zeroes (qcow2 files need not end on a cluster). */
export async function readPadded(file: GrowableIO, offset: number, buf: Uint8Array): Promise<void> {
  const inside = Math.max(0, Math.min(buf.length, file.length - offset));
  if (inside > 0) await file.read(offset, inside === buf.length ? buf : buf.subarray(0, inside));
  if (inside < buf.length) buf.fill(0, inside);
}

/** Extends the file to at least `end` bytes. */
export async function ensureLength(file: GrowableIO, end: number): Promise<void> {
  if (file.length < end) await file.truncate(end);
}
