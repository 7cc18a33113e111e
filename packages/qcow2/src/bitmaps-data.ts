/**
 * Bitmap data as qcow2 stores it, against SharedBitmap's leaf words. qcow2: bit n of the bitmap
 * is bit (n % 8) of data byte floor(n / 8). SharedBitmap: bit n is bit (n % 32) of 32-bit word
 * floor(n / 32). So word w is data bytes 4w..4w+3 read little-endian, and a cluster of data
 * (a multiple of 4 bytes) holds whole words.
 */

export type ClusterImage = { kind: 'zeroes' } | { kind: 'ones' } | { kind: 'data'; bytes: Uint8Array };

/**
 * The content of data cluster `k` of a bitmap of `bits` bits whose leaf words are `words`,
 * snapshotted once (the words may change under us; the decision and the bytes written come
 * from the same snapshot). A cluster of zeroes needs no host cluster; a cluster whose every
 * bit is a real bit and set is stored as an all-ones table entry. Tail bits past `bits` are
 * zero (SharedBitmap never sets them), as the spec requires.
 */
export function clusterImage(words: Int32Array, k: number, clusterBytes: number, bits: number): ClusterImage {
  const wordsPerCluster = clusterBytes / 4;
  const first = k * wordsPerCluster;
  const end = Math.min(words.length, first + wordsPerCluster);
  const bytes = new Uint8Array(clusterBytes);
  const v = new DataView(bytes.buffer);
  let any = 0;
  let all = -1;
  for (let w = first; w < end; w++) {
    const x = words[w]!;
    any |= x;
    all &= x;
    if (x !== 0) v.setInt32((w - first) * 4, x, true);
  }
  if (any === 0) return { kind: 'zeroes' };
  const wholeCluster = (k + 1) * clusterBytes * 8 <= bits && end - first === wordsPerCluster;
  if (wholeCluster && all === -1) return { kind: 'ones' };
  return { kind: 'data', bytes };
}

/**
 * Leaf words from qcow2 bitmap data bytes (`data` holds at least ceil(bits / 8) bytes, zero
 * padded to a multiple of 4). Bits past `bits` are dropped: they mean nothing, and SharedBitmap
 * must not hold them.
 */
export function wordsFromData(data: Uint8Array, bits: number): Int32Array {
  const n = Math.ceil(bits / 32);
  const v = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const words = new Int32Array(n);
  for (let w = 0; w < n; w++) words[w] = v.getInt32(w * 4, true);
  const tail = bits % 32;
  if (tail !== 0) words[n - 1]! &= (1 << tail) - 1;
  return words;
}
