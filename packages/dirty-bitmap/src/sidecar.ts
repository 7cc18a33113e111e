import { randomBytes } from 'node:crypto';
import { open, readFile, readdir, rename, stat, unlink } from 'node:fs/promises';
import { basename, dirname } from 'node:path';
import { ShearError, crashPoint, type ErrorCode } from '@shear/base';
import type { SharedBitmap } from '@shear/bitmap';
import { checkBitmapName, checkGranularity } from './limits.js';
import {
  SIDECAR_ENABLED,
  SIDECAR_IN_USE,
  decodeSidecar,
  encodeSidecar,
  recordFor,
  type DecodedSidecar,
  type ImageIdentity,
  type SidecarRecord,
} from './sidecar-format.js';

/**
 * Persistent bitmaps for images that cannot hold them (raw): a sidecar file beside the image,
 * `<image>.shear-bitmaps`, replaced atomically on every change (temporary file, fsync, rename,
 * fsync of the folder), so a crash leaves the old file or the new one.
 *
 * The protocol mirrors qcow2's in_use flag: a bitmap whose in-memory copy may change (it records
 * writes, or will be cleared or merged) is first marked in use (markSidecarInUse), and is stored
 * consistent (storeSidecar with inUse false) only when the image is quiet, before the next
 * write: a crash in between leaves it in use, so it is reported inconsistent, never stale.
 *
 * The file also records the image's size, modification time and inode when it was written. A
 * raw image has no metadata of its own, so this is how a change made by another program while
 * Shear did not have the image open is caught: then every bitmap is reported inconsistent, and
 * records carried over into a new file are marked in use. (The modification time guards against
 * other programs only, not against crashes: its update is not ordered with the data.)
 */

export const SIDECAR_SUFFIX = '.shear-bitmaps';

export function sidecarPath(imagePath: string): string {
  return `${imagePath}${SIDECAR_SUFFIX}`;
}

export interface SidecarBitmap {
  name: string;
  granularity: number;
  /** Records writes (QEMU's auto flag). */
  enabled: boolean;
  /** The in_use flag as stored. */
  inUse: boolean;
  /** In use, or the image changed since the sidecar was written: the bits are not trusted. */
  inconsistent: boolean;
  /** The bits, null when inconsistent. */
  bits: SharedBitmap | null;
}

export interface SidecarContents {
  imageSize: number;
  /** The image's size, modification time or inode differs from what the sidecar recorded. */
  imageChanged: boolean;
  bitmaps: SidecarBitmap[];
}

export interface SidecarBitmapToStore {
  name: string;
  /** Must equal bits.granularity. */
  granularity: number;
  /** Covers exactly the image's size. */
  bits: SharedBitmap;
  enabled: boolean;
}

function errnoCode(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

function ioFail(err: unknown, action: string, path: string): ShearError {
  if (err instanceof ShearError) return err;
  const errno = errnoCode(err);
  const code: ErrorCode =
    errno === 'ENOENT'
      ? 'ERR_FILE_NOT_FOUND'
      : errno === 'ENOSPC' || errno === 'EDQUOT'
        ? 'ERR_NO_SPACE'
        : errno === 'EACCES' || errno === 'EPERM' || errno === 'EROFS'
          ? 'ERR_PERMISSION_DENIED'
          : 'ERR_IO';
  const why = err instanceof Error ? err.message : String(err);
  return new ShearError(code, `Cannot ${action} '${path}': ${why}`, { path, ...(errno ? { errno } : {}) }, { cause: err });
}

async function imageIdentity(imagePath: string): Promise<ImageIdentity> {
  try {
    const st = await stat(imagePath, { bigint: true });
    return { size: Number(st.size), mtimeNs: st.mtimeNs, ino: st.ino };
  } catch (err) {
    throw ioFail(err, 'stat image', imagePath);
  }
}

function sameImage(a: ImageIdentity, b: ImageIdentity): boolean {
  return a.size === b.size && a.mtimeNs === b.mtimeNs && a.ino === b.ino;
}

async function readSidecar(imagePath: string): Promise<DecodedSidecar | null> {
  const path = sidecarPath(imagePath);
  let data: Buffer;
  try {
    data = await readFile(path);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return null;
    throw ioFail(err, 'read bitmap sidecar', path);
  }
  return decodeSidecar(data, path);
}

/**
 * The bitmaps stored beside `imagePath`, or null when there is no sidecar. With `checkImage`
 * (default) the image's size, modification time and inode are compared with what the sidecar
 * recorded; any difference makes every bitmap inconsistent.
 * @throws ERR_BITMAP_CORRUPT for a damaged sidecar, ERR_FILE_NOT_FOUND when the image is missing
 */
export async function loadSidecar(imagePath: string, opts: { checkImage?: boolean } = {}): Promise<SidecarContents | null> {
  const decoded = await readSidecar(imagePath);
  if (!decoded) return null;
  const imageChanged = (opts.checkImage ?? true) && !sameImage(decoded.image, await imageIdentity(imagePath));
  return {
    imageSize: decoded.image.size,
    imageChanged,
    bitmaps: decoded.records.map((r) => {
      const inUse = (r.flags & SIDECAR_IN_USE) !== 0;
      const inconsistent = inUse || imageChanged;
      return { name: r.name, granularity: 2 ** r.granularityLog2, enabled: (r.flags & SIDECAR_ENABLED) !== 0, inUse, inconsistent, bits: inconsistent ? null : r.bits! };
    }),
  };
}

/** One change at a time per sidecar within this process (each is read, change, replace). */
const queues = new Map<string, Promise<unknown>>();

function serialised<T>(path: string, fn: () => Promise<T>): Promise<T> {
  const prev = queues.get(path) ?? Promise.resolve();
  const next = prev.then(fn, fn);
  const tail = next.catch(() => undefined);
  queues.set(path, tail);
  void tail.then(() => {
    if (queues.get(path) === tail) queues.delete(path);
  });
  return next;
}

/**
 * Reads the sidecar, lets `change` edit its records, writes the result (or deletes the file
 * when no record is left). Records carried over from a file written for another state of the
 * image are marked in use: their bits did not follow its changes.
 */
function rewrite(imagePath: string, change: (records: SidecarRecord[]) => SidecarRecord[], step?: (name: string) => void): Promise<void> {
  return serialised(sidecarPath(imagePath), async () => {
    const existing = await readSidecar(imagePath);
    const now = await imageIdentity(imagePath);
    let records = existing?.records ?? [];
    if (existing && !sameImage(existing.image, now)) records = records.map((r) => ({ ...r, flags: r.flags | SIDECAR_IN_USE }));
    records = change(records);
    if (records.length === 0) {
      if (existing) await removeAtomically(sidecarPath(imagePath));
      return;
    }
    await writeAtomically(sidecarPath(imagePath), encodeSidecar(now, records), step);
  });
}

/**
 * Stores `bitmaps` in the sidecar (new names added, same names replaced, other records kept).
 * With `inUse` they are stored marked in use. Call with `inUse: false` only when no write to
 * the image is under way and none will be issued before markSidecarInUse.
 * @throws ERR_BITMAP_NAME, ERR_BITMAP_GRANULARITY, ERR_BITMAP_SIZE_MISMATCH, ERR_INVALID_ARGUMENT, ERR_BITMAP_CORRUPT (the existing sidecar is damaged: remove it to start over)
 */
export async function storeSidecar(imagePath: string, bitmaps: readonly SidecarBitmapToStore[], opts: { inUse: boolean }): Promise<void> {
  const names = new Set<string>();
  for (const b of bitmaps) {
    checkBitmapName(b.name);
    checkGranularity(b.granularity);
    if (names.has(b.name)) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot store bitmaps beside '${imagePath}': "${b.name}" is given twice`, { bitmap: b.name });
    names.add(b.name);
    if (b.granularity !== b.bits.granularity) {
      throw new ShearError('ERR_BITMAP_GRANULARITY', `Cannot store bitmap "${b.name}": granularity ${b.granularity} does not match its bits (${b.bits.granularity})`, { bitmap: b.name });
    }
  }
  const { size } = await imageIdentity(imagePath);
  for (const b of bitmaps) {
    if (b.bits.size !== size) {
      throw new ShearError('ERR_BITMAP_SIZE_MISMATCH', `Cannot store bitmap "${b.name}" beside '${imagePath}': it covers ${b.bits.size} bytes, the image ${size}`, { bitmap: b.name, path: imagePath });
    }
  }
  const fresh = bitmaps.map((b) => recordFor(b.name, b.bits, (opts.inUse ? SIDECAR_IN_USE : 0) | (b.enabled ? SIDECAR_ENABLED : 0)));
  await rewrite(
    imagePath,
    (records) => [...records.map((r) => fresh.find((f) => f.name === r.name) ?? r), ...fresh.filter((f) => !records.some((r) => r.name === f.name))],
    // Test-only crash points (SHEAR_CRASH_AT=bitmap-store:<step>) of a consistent store.
    opts.inUse ? undefined : (name) => crashPoint('bitmap-store', name),
  );
}

/**
 * Marks the named bitmaps (all when `names` is omitted) in use, durably: do it before the
 * first write to the image after they were loaded or stored consistent.
 * @throws ERR_BITMAP_NOT_FOUND for a name the sidecar does not hold
 */
export async function markSidecarInUse(imagePath: string, names?: readonly string[]): Promise<void> {
  await rewrite(imagePath, (records) => {
    for (const n of names ?? []) {
      if (!records.some((r) => r.name === n)) {
        throw new ShearError('ERR_BITMAP_NOT_FOUND', `Cannot mark bitmap "${n}" in use: the sidecar of '${imagePath}' does not hold it`, { bitmap: n, path: imagePath });
      }
    }
    return records.map((r) => (names === undefined || names.includes(r.name) ? { ...r, flags: r.flags | SIDECAR_IN_USE } : r));
  });
}

/** Removes the named bitmaps (names not stored are ignored); the sidecar is deleted when none is left. */
export async function removeFromSidecar(imagePath: string, names: readonly string[]): Promise<void> {
  await rewrite(imagePath, (records) => records.filter((r) => !names.includes(r.name)));
}

async function syncFolder(path: string): Promise<void> {
  const dir = dirname(path);
  let fh;
  try {
    fh = await open(dir, 'r');
    await fh.sync();
  } catch (err) {
    // Some file systems cannot fsync a folder; the rename itself stands.
    if (errnoCode(err) !== 'EINVAL' && errnoCode(err) !== 'EISDIR') throw ioFail(err, 'sync folder', dir);
  } finally {
    await fh?.close();
  }
}

async function writeAtomically(path: string, data: Uint8Array, step: (name: string) => void = () => {}): Promise<void> {
  await removeStrayTemps(path);
  const tmp = `${path}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    const fh = await open(tmp, 'wx', 0o644);
    try {
      await fh.writeFile(data);
      await fh.sync();
    } finally {
      await fh.close();
    }
    step('sidecar-tmp');
    await rename(tmp, path);
    step('sidecar-rename');
  } catch (err) {
    await unlink(tmp).catch(() => undefined);
    throw ioFail(err, 'write bitmap sidecar', path);
  }
  await syncFolder(path);
  step('sidecar-dir');
}

/**
 * Temporary sidecars a crashed process left (`<sidecar>.tmp-<pid>-<hex>`, killed between write
 * and rename): never read, but they would stay forever. Those of a live process are another
 * writer's, and are left alone.
 */
async function removeStrayTemps(path: string): Promise<void> {
  const prefix = `${basename(path)}.tmp-`;
  const names = await readdir(dirname(path)).catch(() => [] as string[]);
  for (const name of names) {
    if (!name.startsWith(prefix)) continue;
    const pid = Number(name.slice(prefix.length).split('-')[0]);
    if (!Number.isSafeInteger(pid) || pid <= 0 || processAlive(pid)) continue;
    await unlink(`${dirname(path)}/${name}`).catch(() => undefined);
  }
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return errnoCode(err) === 'EPERM';
  }
}

async function removeAtomically(path: string): Promise<void> {
  try {
    await unlink(path);
  } catch (err) {
    if (errnoCode(err) !== 'ENOENT') throw ioFail(err, 'remove bitmap sidecar', path);
  }
  await syncFolder(path);
}
