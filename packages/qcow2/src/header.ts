import { ShearError } from '@shear/base';

/** "QFI\xfb" */
export const QCOW2_MAGIC = 0x514649fb;
export const V2_HEADER_BYTES = 72;
export const V3_MIN_HEADER_BYTES = 104;
/** The header Shear writes: the v3 fields plus compression_type (1 byte) and padding. */
export const V3_HEADER_BYTES = 112;
export const MIN_CLUSTER_BITS = 9;
/** QEMU cannot open images with clusters above 2 MiB, so Shear neither reads nor makes them. */
export const MAX_CLUSTER_BITS = 21;
export const MAX_BACKING_FILE_NAME_BYTES = 1023;
export const MAX_L1_TABLE_BYTES = 32 * 1024 * 1024;
export const MAX_REFCOUNT_TABLE_BYTES = 8 * 1024 * 1024;

export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION_TYPE = 1n << 3n;
export const INCOMPAT_EXTENDED_L2 = 1n << 4n;
export const KNOWN_INCOMPAT = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION_TYPE | INCOMPAT_EXTENDED_L2;
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;
export const KNOWN_AUTOCLEAR = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW;

export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

/** Byte offsets of the fields Shear rewrites in place in an existing header. */
export const FIELD_L1_SIZE = 36;
export const FIELD_L1_TABLE_OFFSET = 40;
export const FIELD_REFCOUNT_TABLE_OFFSET = 48;
export const FIELD_INCOMPATIBLE = 72;
export const FIELD_AUTOCLEAR = 88;

export const COMPRESSION_ZLIB = 0;
export const COMPRESSION_ZSTD = 1;

export interface Qcow2Header {
  version: number;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
}

export interface HeaderExtension {
  type: number;
  /** Where the extension's data starts in the image file. */
  dataOffset: number;
  data: Uint8Array;
}

export interface ParsedHeader {
  header: Qcow2Header;
  /** Every extension in file order, known or not (Shear never rewrites this area of an existing image). */
  extensions: HeaderExtension[];
  backingFile: string | null;
  backingFormat: string | null;
  /** "type:bit" -> name, from the feature name table. */
  featureNames: Map<string, string>;
}

function corrupt(why: string, context: Record<string, unknown> = {}): ShearError {
  return new ShearError('ERR_QCOW2_CORRUPT', `Cannot open qcow2 image: ${why}`, context);
}

function u64(view: DataView, at: number, what: string): number {
  const v = view.getBigUint64(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`${what} ${v} is too large`);
  return Number(v);
}

/** Parses the fixed part of the header; `buf` holds at least the first 104 bytes of the file (72 for v2). */
export function parseFixedHeader(buf: Uint8Array): Qcow2Header {
  if (buf.length < V2_HEADER_BYTES) throw corrupt(`the file is too short for a header (${buf.length} bytes)`);
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  if (view.getUint32(0) !== QCOW2_MAGIC) throw corrupt('the file does not start with the qcow2 magic');
  const version = view.getUint32(4);
  if (version !== 2 && version !== 3) {
    throw new ShearError('ERR_NOT_IMPLEMENTED', `Cannot open qcow2 image: version ${version} is not supported (only 2 and 3)`);
  }
  const h: Qcow2Header = {
    version,
    backingFileOffset: u64(view, 8, 'backing_file_offset'),
    backingFileSize: view.getUint32(16),
    clusterBits: view.getUint32(20),
    size: u64(view, 24, 'size'),
    cryptMethod: view.getUint32(32),
    l1Size: view.getUint32(36),
    l1TableOffset: u64(view, 40, 'l1_table_offset'),
    refcountTableOffset: u64(view, 48, 'refcount_table_offset'),
    refcountTableClusters: view.getUint32(56),
    nbSnapshots: view.getUint32(60),
    snapshotsOffset: u64(view, 64, 'snapshots_offset'),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: V2_HEADER_BYTES,
    compressionType: COMPRESSION_ZLIB,
  };
  if (version === 3) {
    if (buf.length < V3_MIN_HEADER_BYTES) throw corrupt('the version 3 header is truncated');
    h.incompatibleFeatures = view.getBigUint64(72);
    h.compatibleFeatures = view.getBigUint64(80);
    h.autoclearFeatures = view.getBigUint64(88);
    h.refcountOrder = view.getUint32(96);
    h.headerLength = view.getUint32(100);
    if (h.headerLength < V3_MIN_HEADER_BYTES || h.headerLength % 8 !== 0) {
      throw corrupt(`header_length ${h.headerLength} is invalid (at least 104 and a multiple of 8)`);
    }
    if (h.headerLength > 104 && buf.length > 104) h.compressionType = view.getUint8(104);
  }
  if (h.clusterBits < MIN_CLUSTER_BITS) throw corrupt(`cluster_bits ${h.clusterBits} is below ${MIN_CLUSTER_BITS}`);
  if (h.clusterBits > MAX_CLUSTER_BITS) {
    throw new ShearError('ERR_NOT_IMPLEMENTED', `Cannot open qcow2 image: clusters of 2^${h.clusterBits} bytes are larger than the 2 MiB supported`);
  }
  if (h.refcountOrder > 6) throw corrupt(`refcount_order ${h.refcountOrder} is above 6`);
  if (h.headerLength > 1 << h.clusterBits) throw corrupt('the header is larger than a cluster');
  const clusterBytes = 2 ** h.clusterBits;
  for (const [name, off] of [['l1_table_offset', h.l1TableOffset], ['refcount_table_offset', h.refcountTableOffset]] as const) {
    if (off % clusterBytes !== 0) throw corrupt(`${name} ${off} is not aligned to the cluster size`);
  }
  // QEMU's limits; larger tables mean a corrupt header (and would only exhaust memory here).
  if (h.l1Size * 8 > MAX_L1_TABLE_BYTES) throw corrupt(`the L1 table of ${h.l1Size} entries is larger than 32 MiB`);
  if (h.refcountTableClusters * clusterBytes > MAX_REFCOUNT_TABLE_BYTES) {
    throw corrupt(`the refcount table of ${h.refcountTableClusters} clusters is larger than 8 MiB`);
  }
  const l2Entries = clusterBytes / 8;
  if (h.l1Size * l2Entries * clusterBytes < h.size) throw corrupt(`the L1 table (${h.l1Size} entries) does not cover the virtual size ${h.size}`);
  if (h.backingFileOffset !== 0 && h.backingFileSize > MAX_BACKING_FILE_NAME_BYTES) {
    throw corrupt(`the backing file name is ${h.backingFileSize} bytes long (at most 1023)`);
  }
  return h;
}

/** Parses header extensions and the backing file name from the header cluster `cluster0`. */
export function parseHeaderCluster(cluster0: Uint8Array): ParsedHeader {
  const header = parseFixedHeader(cluster0);
  const view = new DataView(cluster0.buffer, cluster0.byteOffset, cluster0.byteLength);
  const extensions: HeaderExtension[] = [];
  const decoder = new TextDecoder();
  let backingFormat: string | null = null;
  const featureNames = new Map<string, string>();
  let at = header.headerLength;
  for (;;) {
    if (at + 8 > cluster0.length) break;
    const type = view.getUint32(at);
    const len = view.getUint32(at + 4);
    if (type === EXT_END) break;
    const dataOffset = at + 8;
    if (dataOffset + len > cluster0.length) throw corrupt(`header extension 0x${type.toString(16)} runs past the header cluster`);
    const data = cluster0.slice(dataOffset, dataOffset + len);
    extensions.push({ type, dataOffset, data });
    if (type === EXT_BACKING_FORMAT) backingFormat = decoder.decode(data);
    if (type === EXT_FEATURE_TABLE) {
      for (let e = 0; e + 48 <= data.length; e += 48) {
        const raw = data.subarray(e + 2, e + 48);
        const end = raw.indexOf(0);
        featureNames.set(`${data[e]}:${data[e + 1]}`, decoder.decode(end < 0 ? raw : raw.subarray(0, end)));
      }
    }
    at = dataOffset + Math.ceil(len / 8) * 8;
  }
  let backingFile: string | null = null;
  if (header.backingFileOffset !== 0) {
    const end = header.backingFileOffset + header.backingFileSize;
    if (end > cluster0.length) throw corrupt('the backing file name lies outside the header cluster');
    backingFile = decoder.decode(cluster0.subarray(header.backingFileOffset, end));
  }
  return { header, extensions, backingFile, backingFormat, featureNames };
}

/** Names the set bits of `mask` for error messages, using the image's feature name table where it has one. */
export function describeFeatureBits(mask: bigint, type: 0 | 1 | 2, names: Map<string, string>): string {
  const out: string[] = [];
  for (let bit = 0; bit < 64; bit++) {
    if ((mask >> BigInt(bit)) & 1n) {
      const name = names.get(`${type}:${bit}`);
      out.push(name ? `bit ${bit} '${name}'` : `bit ${bit}`);
    }
  }
  return out.join(', ');
}

export interface NewHeaderFields {
  clusterBits: number;
  size: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  refcountOrder: number;
  backingFile?: string | undefined;
  backingFormat?: string | undefined;
}

/** Feature names Shear records in images it makes, so older tools can name what they do not know. */
const FEATURE_NAMES: readonly [number, number, string][] = [
  [0, 0, 'dirty bit'],
  [0, 1, 'corrupt bit'],
  [0, 2, 'external data file'],
  [0, 3, 'compression type'],
  [0, 4, 'extended L2 entries'],
  [1, 0, 'lazy refcounts'],
  [2, 0, 'bitmaps'],
  [2, 1, 'raw external data'],
];

function padTo8(n: number): number {
  return Math.ceil(n / 8) * 8;
}

/** Builds the header cluster of a new version 3 image (header, extensions, backing file name). */
export function buildHeaderCluster(f: NewHeaderFields): Uint8Array {
  const clusterBytes = 2 ** f.clusterBits;
  const buf = new Uint8Array(clusterBytes);
  const view = new DataView(buf.buffer);
  const enc = new TextEncoder();
  view.setUint32(0, QCOW2_MAGIC);
  view.setUint32(4, 3);
  view.setUint32(20, f.clusterBits);
  view.setBigUint64(24, BigInt(f.size));
  view.setUint32(32, 0);
  view.setUint32(36, f.l1Size);
  view.setBigUint64(40, BigInt(f.l1TableOffset));
  view.setBigUint64(48, BigInt(f.refcountTableOffset));
  view.setUint32(56, f.refcountTableClusters);
  view.setUint32(96, f.refcountOrder);
  view.setUint32(100, V3_HEADER_BYTES);
  let at = V3_HEADER_BYTES;
  const put = (type: number, data: Uint8Array): void => {
    if (at + 8 + padTo8(data.length) + 8 > clusterBytes) {
      throw new ShearError('ERR_INVALID_ARGUMENT', 'Cannot create qcow2 image: the header extensions do not fit in one cluster');
    }
    view.setUint32(at, type);
    view.setUint32(at + 4, data.length);
    buf.set(data, at + 8);
    at += 8 + padTo8(data.length);
  };
  if (f.backingFormat !== undefined) put(EXT_BACKING_FORMAT, enc.encode(f.backingFormat));
  const table = new Uint8Array(FEATURE_NAMES.length * 48);
  FEATURE_NAMES.forEach(([type, bit, name], i) => {
    table[i * 48] = type;
    table[i * 48 + 1] = bit;
    table.set(enc.encode(name), i * 48 + 2);
  });
  if (at + 8 + table.length + 8 <= clusterBytes) put(EXT_FEATURE_TABLE, table);
  at += 8; // the end-of-extensions marker (type 0, length 0) is already zero
  if (f.backingFile !== undefined) {
    const name = enc.encode(f.backingFile);
    if (name.length === 0 || name.length > MAX_BACKING_FILE_NAME_BYTES) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot create qcow2 image: backing file name '${f.backingFile}' must be 1 to 1023 bytes`);
    }
    if (at + name.length > clusterBytes) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot create qcow2 image: backing file name '${f.backingFile}' does not fit in the header cluster`);
    }
    buf.set(name, at);
    view.setBigUint64(8, BigInt(at));
    view.setUint32(16, name.length);
  }
  return buf;
}
