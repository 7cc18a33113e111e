import { constants, deflateRawSync, inflateRawSync } from 'node:zlib';
import { ShearError } from '@shear/base';

/**
 * qcow2 compressed clusters (compression type zlib) are raw deflate streams. QEMU inflates with
 * a 4 KiB window (windowBits 12), so Shear must deflate with windowBits 12 too or QEMU could
 * not read the data back.
 */
const WINDOW_BITS = 12;

/** Inflates one cluster from `raw`, which may carry trailing bytes of the last sector. */
export function inflateCluster(raw: Uint8Array, clusterBytes: number, where: number): Uint8Array {
  let out: Buffer;
  try {
    out = inflateRawSync(raw, { finishFlush: constants.Z_SYNC_FLUSH, maxOutputLength: clusterBytes });
  } catch (err) {
    throw new ShearError('ERR_QCOW2_CORRUPT', `Cannot decompress qcow2 cluster at host offset ${where}: the deflate data is invalid`, { offset: where }, { cause: err });
  }
  if (out.length !== clusterBytes) {
    throw new ShearError('ERR_QCOW2_CORRUPT', `Cannot decompress qcow2 cluster at host offset ${where}: it holds ${out.length} bytes, not ${clusterBytes}`, { offset: where });
  }
  return new Uint8Array(out.buffer, out.byteOffset, out.length);
}

/** Deflates a whole cluster; null when the result would not be smaller than the cluster. */
export function deflateCluster(data: Uint8Array): Uint8Array | null {
  const out = deflateRawSync(data, { windowBits: WINDOW_BITS });
  if (out.length >= data.length) return null;
  return new Uint8Array(out.buffer, out.byteOffset, out.length);
}
