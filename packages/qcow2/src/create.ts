import { ShearError, isPowerOfTwo, log2Exact } from '@shear/base';
import { MAX_CLUSTER_BITS, MAX_L1_TABLE_BYTES, MIN_CLUSTER_BITS, buildHeaderCluster } from './header.js';
import type { GrowableIO } from './growable-io.js';

export const DEFAULT_CLUSTER_BYTES = 65536;
export const DEFAULT_REFCOUNT_BITS = 16;

export interface Qcow2CreateOptions {
  /** Virtual size in bytes; rounded up to a multiple of 512 as qemu-img does. */
  size: number;
  clusterBytes?: number;
  /** Stored as given; relative names are resolved by whoever opens the image. */
  backingFile?: string;
  backingFormat?: string;
  refcountBits?: number;
}

/** The on-disk layout `formatQcow2` writes: header, refcount table, refcount blocks, L1 table. */
export interface Qcow2Layout {
  clusterBytes: number;
  size: number;
  l1Size: number;
  refcountTableClusters: number;
  refcountBlocks: number;
  l1Clusters: number;
}

export function planLayout(opts: Qcow2CreateOptions): Qcow2Layout {
  const clusterBytes = opts.clusterBytes ?? DEFAULT_CLUSTER_BYTES;
  const refcountBits = opts.refcountBits ?? DEFAULT_REFCOUNT_BITS;
  if (!Number.isSafeInteger(opts.size) || opts.size < 0) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot create qcow2 image: size ${opts.size} is not a non-negative integer`);
  }
  if (!isPowerOfTwo(clusterBytes) || clusterBytes < 2 ** MIN_CLUSTER_BITS || clusterBytes > 2 ** MAX_CLUSTER_BITS) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot create qcow2 image: cluster size ${clusterBytes} must be a power of two from 512 to 2 MiB`);
  }
  if (!isPowerOfTwo(refcountBits) || refcountBits > 64) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot create qcow2 image: refcount bits ${refcountBits} must be a power of two from 1 to 64`);
  }
  if (opts.backingFormat !== undefined && opts.backingFile === undefined) {
    throw new ShearError('ERR_INVALID_ARGUMENT', 'Cannot create qcow2 image: a backing format needs a backing file');
  }
  const size = Math.ceil(opts.size / 512) * 512;
  const l1Size = Math.ceil(size / (clusterBytes * (clusterBytes / 8)));
  if (l1Size * 8 > MAX_L1_TABLE_BYTES) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot create qcow2 image: size ${size} needs an L1 table above 32 MiB; use bigger clusters`);
  }
  const l1Clusters = Math.ceil((l1Size * 8) / clusterBytes);
  const perBlock = (clusterBytes * 8) / refcountBits;
  let tableClusters = 1;
  let blocks = 1;
  for (;;) {
    const total = 1 + tableClusters + blocks + l1Clusters;
    const needBlocks = Math.ceil(total / perBlock);
    const needTable = Math.ceil((needBlocks * 8) / clusterBytes);
    if (needBlocks <= blocks && needTable <= tableClusters) break;
    blocks = Math.max(blocks, needBlocks);
    tableClusters = Math.max(tableClusters, needTable);
  }
  return { clusterBytes, size, l1Size, refcountTableClusters: tableClusters, refcountBlocks: blocks, l1Clusters };
}

/**
 * Writes an empty version 3 qcow2 image into `file` (whatever it held is dropped). QEMU's
 * layout: header in cluster 0, then the refcount table, the refcount blocks and the L1 table;
 * each metadata cluster has refcount 1. The header is written last.
 */
export async function formatQcow2(file: GrowableIO, opts: Qcow2CreateOptions): Promise<Qcow2Layout> {
  const layout = planLayout(opts);
  const C = layout.clusterBytes;
  const refcountBits = opts.refcountBits ?? DEFAULT_REFCOUNT_BITS;
  const tableAt = 1;
  const blocksAt = tableAt + layout.refcountTableClusters;
  const l1At = blocksAt + layout.refcountBlocks;
  const total = l1At + layout.l1Clusters;
  const header = buildHeaderCluster({
    clusterBits: log2Exact(C),
    size: layout.size,
    l1Size: layout.l1Size,
    l1TableOffset: layout.l1Size === 0 ? 0 : l1At * C,
    refcountTableOffset: tableAt * C,
    refcountTableClusters: layout.refcountTableClusters,
    refcountOrder: log2Exact(refcountBits),
    backingFile: opts.backingFile,
    backingFormat: opts.backingFormat,
  });
  await file.truncate(0);
  await file.truncate(total * C);

  const perBlock = (C * 8) / refcountBits;
  for (let b = 0; b < layout.refcountBlocks; b++) {
    const block = new Uint8Array(C);
    const first = b * perBlock;
    const count = Math.min(perBlock, total - first);
    for (let i = 0; i < count; i++) setRefcountOne(block, i, refcountBits);
    await file.write((blocksAt + b) * C, block);
  }
  const table = new Uint8Array(layout.refcountTableClusters * C);
  const tv = new DataView(table.buffer);
  for (let b = 0; b < layout.refcountBlocks; b++) tv.setBigUint64(b * 8, BigInt((blocksAt + b) * C));
  await file.write(tableAt * C, table);
  await file.flush();
  await file.write(0, header);
  await file.flush();
  return layout;
}

function setRefcountOne(block: Uint8Array, i: number, bits: number): void {
  const bit = i * bits;
  if (bits < 8) block[bit >> 3] = block[bit >> 3]! | (1 << (bit & 7));
  else block[(bit >> 3) + bits / 8 - 1] = 1;
}
