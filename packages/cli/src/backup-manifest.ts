/**
 * Backup manifests (docs/plans/pull-client.md, "Manifest (JSON, version 1)"): the one module
 * that writes and reads `T.shear-manifest.json`. API: `manifestPathFor(image)` names the file
 * beside an image; `computeChunkDigests(view, opts)` hashes a chain view (anything with `length`
 * and `read`, e.g. a block edge over T and its backing chain) per `CHUNK_BYTES`, recomputing only
 * `opts.only` chunk indexes and copying the rest from `opts.reuse` (the parent's digests);
 * `wholeDigest(chunks)` is the SHA-256 over the raw 32-byte chunk digests; `buildManifest(fields)`
 * fills format/version/created/sha256 and checks the result; `writeManifestTmp(image, m)` writes
 * and fsyncs `T.shear-manifest.json.tmp`, `commitManifest(image)` renames it into place and fsyncs
 * the directory (the finalise order is: writeManifestTmp, rename the image to T, commitManifest —
 * `finaliseBackup` does all three); `readManifest(image)` reads and validates, throwing
 * ERR_MANIFEST_NOT_FOUND (exit 3) or ERR_MANIFEST_INVALID (exit 6); `validateManifest(json)`
 * validates a parsed value; `diffChunks(expected, actual)` lists the chunks that differ with
 * their byte ranges. This API is shared with restore/verify: keep it stable.
 */
import { createHash } from 'node:crypto';
import { open as openFile, readFile, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import { ShearError } from '@shear/base';

export const MANIFEST_FORMAT = 'shear-backup-manifest';
export const MANIFEST_VERSION = 1;
export const CHUNK_BYTES = 1024 * 1024;
export const MANIFEST_SUFFIX = '.shear-manifest.json';

export interface BackupManifest {
  format: typeof MANIFEST_FORMAT;
  version: typeof MANIFEST_VERSION;
  created: string;
  kind: 'full' | 'incremental';
  image: string;
  imageFormat: 'raw' | 'qcow2';
  disk: { size: number; identity: string; source: string };
  parent: null | { image: string; sha256: string };
  bitmap: string | null;
  chunkBytes: number;
  chunks: string[];
  sha256: string;
  copiedBytes: number;
  trimmedBytes: number;
}

/** What a caller supplies; the rest is derived. */
export type ManifestFields = Omit<BackupManifest, 'format' | 'version' | 'created' | 'sha256' | 'chunkBytes'> & { created?: string };

/** A readable view of a disk as a chain reads it. */
export interface ChainView {
  readonly length: number;
  read(offset: number, buf: Uint8Array): Promise<void>;
  /** Optional: lets zero ranges be hashed without reading them. */
  blockStatus?(offset: number, bytes: number): Promise<{ offset: number; bytes: number; zero: boolean }[]>;
}

export interface ChunkDiff {
  index: number;
  offset: number;
  bytes: number;
  expected: string | undefined;
  actual: string | undefined;
}

export function manifestPathFor(image: string): string {
  return image + MANIFEST_SUFFIX;
}

export function chunkCount(size: number, chunkBytes = CHUNK_BYTES): number {
  return Math.ceil(size / chunkBytes);
}

const zeroDigests = new Map<number, string>();
/** The digest of `bytes` zero bytes (a chunk that reads as zeroes). */
export function zeroChunkDigest(bytes: number): string {
  let d = zeroDigests.get(bytes);
  if (!d) {
    d = createHash('sha256').update(new Uint8Array(bytes)).digest('hex');
    zeroDigests.set(bytes, d);
  }
  return d;
}

/** SHA-256 over the concatenation of the raw 32-byte chunk digests. */
export function wholeDigest(chunks: readonly string[]): string {
  const h = createHash('sha256');
  for (const c of chunks) h.update(Buffer.from(c, 'hex'));
  return h.digest('hex');
}

export interface ChunkDigestOptions {
  /** Chunk indexes to recompute; the others are taken from `reuse`. Default: all. */
  only?: Iterable<number>;
  /** Digests to keep for chunks not in `only` (the parent manifest's `chunks`). */
  reuse?: readonly string[];
  signal?: AbortSignal;
  /** Chunks hashed at once (reads in flight). */
  parallel?: number;
  onChunk?: (index: number) => void;
}

/** SHA-256 of every CHUNK_BYTES chunk of `view` (the last one short), per the manifest contract. */
export async function computeChunkDigests(view: ChainView, opts: ChunkDigestOptions = {}): Promise<string[]> {
  const n = chunkCount(view.length);
  const out = new Array<string>(n);
  let todo: number[];
  if (opts.only) {
    if (!opts.reuse || opts.reuse.length !== n) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot reuse digests: ${opts.reuse?.length ?? 0} given for ${n} chunks`);
    for (let i = 0; i < n; i++) out[i] = opts.reuse[i]!;
    todo = [...new Set(opts.only)].filter((i) => i >= 0 && i < n).sort((a, b) => a - b);
  } else {
    todo = Array.from({ length: n }, (_, i) => i);
  }
  const parallel = Math.max(1, opts.parallel ?? 4);
  let next = 0;
  const worker = async (): Promise<void> => {
    const buf = new Uint8Array(CHUNK_BYTES);
    while (next < todo.length) {
      opts.signal?.throwIfAborted();
      const i = todo[next++]!;
      const offset = i * CHUNK_BYTES;
      const bytes = Math.min(CHUNK_BYTES, view.length - offset);
      out[i] = await digestChunk(view, offset, bytes, buf);
      opts.onChunk?.(i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(parallel, Math.max(1, todo.length)) }, worker));
  return out;
}

async function digestChunk(view: ChainView, offset: number, bytes: number, buf: Uint8Array): Promise<string> {
  if (view.blockStatus) {
    const ext = await view.blockStatus(offset, bytes);
    if (ext.length > 0 && ext[0]!.zero && ext[0]!.offset <= offset && ext[0]!.offset + ext[0]!.bytes >= offset + bytes) return zeroChunkDigest(bytes);
  }
  const b = buf.subarray(0, bytes);
  await view.read(offset, b);
  return createHash('sha256').update(b).digest('hex');
}

/** Chunks whose digests differ (or exist on one side only), with their byte ranges. */
export function diffChunks(expected: readonly string[], actual: readonly string[], size: number, chunkBytes = CHUNK_BYTES): ChunkDiff[] {
  const out: ChunkDiff[] = [];
  const n = Math.max(expected.length, actual.length);
  for (let i = 0; i < n; i++) {
    if (expected[i] === actual[i]) continue;
    const offset = i * chunkBytes;
    out.push({ index: i, offset, bytes: Math.max(0, Math.min(chunkBytes, size - offset)), expected: expected[i], actual: actual[i] });
  }
  return out;
}

export function buildManifest(f: ManifestFields): BackupManifest {
  const m: BackupManifest = {
    format: MANIFEST_FORMAT,
    version: MANIFEST_VERSION,
    created: f.created ?? new Date().toISOString(),
    kind: f.kind,
    image: f.image,
    imageFormat: f.imageFormat,
    disk: { size: f.disk.size, identity: f.disk.identity, source: f.disk.source },
    parent: f.parent ? { image: f.parent.image, sha256: f.parent.sha256 } : null,
    bitmap: f.bitmap,
    chunkBytes: CHUNK_BYTES,
    chunks: [...f.chunks],
    sha256: wholeDigest(f.chunks),
    copiedBytes: f.copiedBytes,
    trimmedBytes: f.trimmedBytes,
  };
  return validateManifest(m, '(new manifest)');
}

function invalid(where: string, why: string): never {
  throw new ShearError('ERR_MANIFEST_INVALID', `Invalid backup manifest "${where}": ${why}`, { path: where });
}

const HEX64 = /^[0-9a-f]{64}$/;
const isCount = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
const isString = (v: unknown): v is string => typeof v === 'string';

/** Checks every field of a parsed manifest, including that chunks and sha256 agree. */
export function validateManifest(v: unknown, where: string): BackupManifest {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) invalid(where, 'not a JSON object');
  const m = v as Record<string, unknown>;
  if (m['format'] !== MANIFEST_FORMAT) invalid(where, `format is ${JSON.stringify(m['format'])}, expected "${MANIFEST_FORMAT}"`);
  if (m['version'] !== MANIFEST_VERSION) invalid(where, `version ${JSON.stringify(m['version'])} is not supported (this Shear reads version ${MANIFEST_VERSION})`);
  if (!isString(m['created']) || Number.isNaN(Date.parse(m['created']))) invalid(where, 'created is not an ISO 8601 date');
  if (m['kind'] !== 'full' && m['kind'] !== 'incremental') invalid(where, 'kind is neither "full" nor "incremental"');
  if (!isString(m['image']) || m['image'] === '' || m['image'] !== path.basename(m['image'])) invalid(where, 'image is not a file name');
  if (m['imageFormat'] !== 'raw' && m['imageFormat'] !== 'qcow2') invalid(where, 'imageFormat is neither "raw" nor "qcow2"');
  const disk = m['disk'] as Record<string, unknown> | null;
  if (typeof disk !== 'object' || disk === null) invalid(where, 'disk is missing');
  if (!isCount(disk['size'])) invalid(where, 'disk.size is not a byte count');
  if (!isString(disk['identity']) || disk['identity'] === '') invalid(where, 'disk.identity is missing');
  if (!isString(disk['source'])) invalid(where, 'disk.source is missing');
  const parent = m['parent'] as Record<string, unknown> | null;
  if (parent !== null) {
    if (typeof parent !== 'object') invalid(where, 'parent is neither null nor an object');
    if (!isString(parent['image']) || parent['image'] === '') invalid(where, 'parent.image is missing');
    if (!isString(parent['sha256']) || !HEX64.test(parent['sha256'])) invalid(where, 'parent.sha256 is not a SHA-256 hex digest');
  }
  if ((m['kind'] === 'incremental') !== (parent !== null)) invalid(where, `a ${m['kind'] as string} backup ${parent ? 'has' : 'lacks'} a parent`);
  if (m['bitmap'] !== null && !isString(m['bitmap'])) invalid(where, 'bitmap is neither null nor a name');
  if (m['chunkBytes'] !== CHUNK_BYTES) invalid(where, `chunkBytes ${JSON.stringify(m['chunkBytes'])} is not ${CHUNK_BYTES}`);
  const chunks = m['chunks'];
  if (!Array.isArray(chunks) || !chunks.every((c) => isString(c) && HEX64.test(c))) invalid(where, 'chunks is not a list of SHA-256 hex digests');
  if (chunks.length !== chunkCount(disk['size'])) invalid(where, `${chunks.length} chunk digests for a ${disk['size']}-byte disk (expected ${chunkCount(disk['size'])})`);
  if (!isString(m['sha256']) || m['sha256'] !== wholeDigest(chunks as string[])) invalid(where, 'sha256 does not match the chunk digests');
  if (!isCount(m['copiedBytes']) || !isCount(m['trimmedBytes'])) invalid(where, 'copiedBytes or trimmedBytes is not a byte count');
  return m as unknown as BackupManifest;
}

/** Reads and validates the manifest of `image`. */
export async function readManifest(image: string): Promise<BackupManifest> {
  const file = manifestPathFor(image);
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new ShearError('ERR_MANIFEST_NOT_FOUND', `Cannot find the manifest of "${image}": no file "${file}" (an interrupted backup, or not a Shear backup)`, { path: file });
    throw new ShearError('ERR_IO', `Cannot read manifest "${file}": ${(err as Error).message}`, { path: file, errno: code ?? 'EIO' }, { cause: err });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    invalid(file, `not JSON (${(err as Error).message})`);
  }
  return validateManifest(json, file);
}

async function fsyncPath(p: string, flags: string): Promise<void> {
  const fh = await openFile(p, flags);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Step 1 of the finalise order: `T.shear-manifest.json.tmp`, written and fsynced. */
export async function writeManifestTmp(image: string, m: BackupManifest): Promise<string> {
  const tmp = manifestPathFor(image) + '.tmp';
  const fh = await openFile(tmp, 'w');
  try {
    await fh.writeFile(JSON.stringify(m, null, 2) + '\n');
    await fh.sync();
  } finally {
    await fh.close();
  }
  return tmp;
}

/** Step 3: the manifest renamed into place, the directory fsynced. */
export async function commitManifest(image: string): Promise<void> {
  const file = manifestPathFor(image);
  await rename(file + '.tmp', file);
  await fsyncPath(path.dirname(file), 'r');
}

/**
 * The whole finalise order: manifest tmp written and fsynced, the (flushed) partial image renamed
 * to `image`, the manifest renamed into place. A crash in between leaves an image without a
 * manifest, which restore/verify refuse.
 */
export async function finaliseBackup(partial: string, image: string, m: BackupManifest): Promise<void> {
  const tmp = await writeManifestTmp(image, m);
  try {
    await rename(partial, image);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
  await fsyncPath(path.dirname(image), 'r');
  await commitManifest(image);
}
