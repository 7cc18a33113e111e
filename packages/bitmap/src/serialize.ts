import { crc32 } from 'node:zlib';
import { ShearError, isPowerOfTwo } from '@shear/base';
import { SharedBitmap } from './shared-bitmap.js';
import { popcount32 } from './word-bits.js';

/**
 * The portable form of a bitmap, used by persistence. All integers little-endian:
 *
 * ```
 *  0  8 bytes  magic "SHEARBM\0"
 *  8  u32      format version (1)
 * 12  u32      log2(granularity)
 * 16  u64      size in bytes
 * 24  u64      number of set bits
 * 32  u64      number of u32 words that follow
 * 40  u32[n]   the bits, bit i of the map = bit (i % 32) of word floor(i / 32)
 * ..  u32      CRC-32 of everything before it
 * ```
 * Loading checks every field, the checksum, that no bit is set past the end and that the
 * count matches; a damaged form is an error, never a silently different bitmap.
 */
const MAGIC = Buffer.from('SHEARBM\0', 'latin1');
const FORMAT_VERSION = 1;
const HEADER_BYTES = 40;

export function serializeBitmap(bitmap: SharedBitmap): Uint8Array {
  const words = bitmap.leafWords();
  const out = Buffer.alloc(HEADER_BYTES + words.length * 4 + 4);
  MAGIC.copy(out, 0);
  out.writeUInt32LE(FORMAT_VERSION, 8);
  out.writeUInt32LE(Math.log2(bitmap.granularity), 12);
  out.writeBigUInt64LE(BigInt(bitmap.size), 16);
  let count = 0;
  for (let i = 0; i < words.length; i++) {
    const w = words[i]!;
    count += popcount32(w);
    out.writeInt32LE(w, HEADER_BYTES + i * 4);
  }
  // The count is recomputed from the words written, so a bitmap changing under us still
  // serialises to a self-consistent form.
  out.writeBigUInt64LE(BigInt(count), 24);
  out.writeBigUInt64LE(BigInt(words.length), 32);
  out.writeUInt32LE(crc32(out.subarray(0, out.length - 4)), out.length - 4);
  return out;
}

function corrupt(why: string): ShearError {
  return new ShearError('ERR_BITMAP_CORRUPT', `Cannot load bitmap: ${why}`);
}

/** @throws ERR_BITMAP_CORRUPT for anything but an intact serialised bitmap */
export function deserializeBitmap(data: Uint8Array): SharedBitmap {
  const buf = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  if (buf.length < HEADER_BYTES + 4) throw corrupt(`${buf.length} bytes is shorter than a header`);
  if (!buf.subarray(0, 8).equals(MAGIC)) throw corrupt('bad magic');
  const stored = buf.readUInt32LE(buf.length - 4);
  if (crc32(buf.subarray(0, buf.length - 4)) !== stored) throw corrupt('checksum mismatch');
  const version = buf.readUInt32LE(8);
  if (version !== FORMAT_VERSION) throw corrupt(`unknown format version ${version}`);
  const log2 = buf.readUInt32LE(12);
  if (log2 > 40 || !isPowerOfTwo(2 ** log2)) throw corrupt(`granularity 2^${log2} out of range`);
  const size = Number(buf.readBigUInt64LE(16));
  if (!Number.isSafeInteger(size) || size <= 0) throw corrupt(`size ${size} out of range`);
  const count = Number(buf.readBigUInt64LE(24));
  const nWords = Number(buf.readBigUInt64LE(32));
  const bits = Math.ceil(size / 2 ** log2);
  if (nWords !== Math.ceil(bits / 32)) throw corrupt(`${nWords} words do not match ${bits} bits`);
  if (buf.length !== HEADER_BYTES + nWords * 4 + 4) throw corrupt('length does not match the header');

  const leaf = new Int32Array(nWords);
  let seen = 0;
  for (let i = 0; i < nWords; i++) {
    const w = buf.readInt32LE(HEADER_BYTES + i * 4);
    leaf[i] = w;
    seen += popcount32(w);
  }
  const tail = bits % 32;
  if (tail !== 0 && (leaf[nWords - 1]! & (-1 << tail)) !== 0) throw corrupt('bits set past the end');
  if (seen !== count) throw corrupt(`count ${count} does not match ${seen} set bits`);
  return SharedBitmap.fromLeafWords(size, 2 ** log2, leaf);
}
