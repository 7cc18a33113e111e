import { ShearError, throwIfAborted } from '@shear/base';
import type { BlockIO } from './io.js';

export const COMPARE_CHUNK_BYTES = 4 * 1024 * 1024;

/**
 * Compares the content of two nodes of the same length, as `qemu-img compare` does for equal
 * sizes: ranges both report as zero are not read. Returns the offset of the first differing
 * byte, or -1 when the content is equal.
 * @throws ERR_INVALID_ARGUMENT when the lengths differ; ERR_ABORTED
 */
export async function compareContent(a: BlockIO, b: BlockIO, opts: { signal?: AbortSignal; chunkBytes?: number } = {}): Promise<number> {
  if (a.length !== b.length) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot compare: lengths differ (${a.length} and ${b.length} bytes)`);
  }
  const chunk = opts.chunkBytes ?? COMPARE_CHUNK_BYTES;
  const bufA = new Uint8Array(chunk);
  const bufB = new Uint8Array(chunk);
  for (let at = 0; at < a.length; ) {
    throwIfAborted(opts.signal, 'compare');
    const n = Math.min(chunk, a.length - at);
    if ((await zeroPrefix(a, at, n)) === n && (await zeroPrefix(b, at, n)) === n) {
      at += n;
      continue;
    }
    const x = bufA.subarray(0, n);
    const y = bufB.subarray(0, n);
    await Promise.all([a.read(at, x), b.read(at, y)]);
    if (!Buffer.from(x.buffer, x.byteOffset, n).equals(Buffer.from(y.buffer, y.byteOffset, n))) {
      for (let i = 0; i < n; i++) if (x[i] !== y[i]) return at + i;
    }
    at += n;
  }
  return -1;
}

/** How many bytes from `offset` (up to `bytes`) the node reports as reading zero. */
async function zeroPrefix(io: BlockIO, offset: number, bytes: number): Promise<number> {
  let at = offset;
  while (at < offset + bytes) {
    const ext = await io.blockStatus(at, offset + bytes - at);
    for (const e of ext) {
      if (!e.zero) return at - offset;
      at = Math.min(offset + bytes, e.offset + e.bytes);
    }
    if (ext.length === 0) break;
  }
  return at - offset;
}
