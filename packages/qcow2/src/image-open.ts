import { ShearError } from '@shear/base';
import type { BlockIO, HostMappable } from '@shear/block';
import { bitmapsAtOpen, type EnabledBitmapsPolicy } from './bitmap-lifecycle.js';
import { markInUse, type BitmapContext, type StoredBitmap } from './bitmaps-store.js';
import { readPadded } from './file-util.js';
import type { GrowableIO } from './growable-io.js';
import {
  AUTOCLEAR_BITMAPS,
  EXT_BITMAPS,
  FIELD_AUTOCLEAR,
  KNOWN_AUTOCLEAR,
  V3_MIN_HEADER_BYTES,
  parseFixedHeader,
  parseHeaderCluster,
  type ParsedHeader,
} from './header.js';
import { checkOpenable } from './open-checks.js';
import { Refcounts } from './refcounts.js';
import { loadCheckedTables } from './validate.js';

export interface Qcow2OpenOptions {
  readOnly?: boolean;
  /**
   * The backing image. `null` means none, even if the header names one. When absent and the
   * header names a backing file, `openBacking` is called. A given `backing` stays the caller's
   * (not closed by the image); one opened through `openBacking` is owned and closed by the image.
   */
  backing?: BlockIO | null;
  /** Opens the backing file named in the header (the name as stored: relative names are the caller's to resolve). */
  openBacking?: (name: string, format: string | null) => Promise<BlockIO>;
  /** Memory for the L2 table cache; default 32 MiB. */
  l2CacheBytes?: number;
  /**
   * What to do, when opening for writing, with persistent bitmaps that are enabled ("auto") and
   * consistent: the image alone cannot keep them up to date, so by default the open is refused.
   * - 'mark-inconsistent' sets their in_use flag (QEMU then reports them inconsistent).
   * - 'take' loads every consistent bitmap (enabled or not; `takenBitmaps`) and sets its in_use
   *   flag on disk, as QEMU does when it opens an image read-write: the caller now owns them,
   *   records writes in them and stores them back (`storeBitmaps(..., { inUse: false })`) on a
   *   clean close. A crash before that leaves them inconsistent, never silently stale.
   */
  enabledBitmaps?: EnabledBitmapsPolicy;
  /**
   * Direct access to the protocol file's bytes for worker threads (the graph passes its child
   * edge's hostMapping()); null for none. Default: `file` itself when it is HostMappable or
   * has a hostMapping() method.
   */
  fileMapping?: HostMappable | null;
}

/** What an open image is built from, once everything that can make the open fail has passed. */
export interface LoadedImage {
  backing: BlockIO | null;
  ownsBacking: boolean;
  readOnly: boolean;
  parsed: ParsedHeader;
  l1Raw: Uint8Array;
  /** Null when read-only. */
  rc: Refcounts | null;
  taken: StoredBitmap[];
}

/**
 * Reads and checks the header and tables of the image in `file`, applies the open policy for
 * persistent bitmaps and opens the backing image. On failure it closes `file` and a backing
 * image it opened.
 */
export async function loadImage(file: GrowableIO, opts: Qcow2OpenOptions): Promise<LoadedImage> {
  let backing: BlockIO | null = null;
  let ownsBacking = false;
  try {
    const readOnly = opts.readOnly ?? false;
    const fixed = new Uint8Array(V3_MIN_HEADER_BYTES + 8);
    await readPadded(file, 0, fixed);
    const { clusterBits } = parseFixedHeader(fixed);
    const cluster0 = new Uint8Array(2 ** clusterBits);
    await readPadded(file, 0, cluster0);
    const parsed = parseHeaderCluster(cluster0);
    const h = parsed.header;
    checkOpenable(parsed, !readOnly);
    const l1Raw = await loadCheckedTables(file, h, 2 ** clusterBits);
    const rc = readOnly
      ? null
      : await Refcounts.load(file, 2 ** clusterBits, h.refcountOrder, h.refcountTableOffset, h.refcountTableClusters);

    let toMark: string[] = [];
    let taken: StoredBitmap[] = [];
    const bitmapCtx: BitmapContext = { file, clusterBytes: 2 ** clusterBits, diskBytes: h.size, rc: null, alloc: null };
    const bitmapsExt = parsed.extensions.find((e) => e.type === EXT_BITMAPS);
    if (!readOnly && bitmapsExt && h.autoclearFeatures & AUTOCLEAR_BITMAPS) {
      ({ taken, toMark } = await bitmapsAtOpen(bitmapCtx, opts.enabledBitmaps));
    }

    if (opts.backing !== undefined) {
      backing = opts.backing;
    } else if (parsed.backingFile !== null) {
      if (!opts.openBacking) {
        throw new ShearError(
          'ERR_INVALID_ARGUMENT',
          `Cannot open qcow2 image: it has backing file '${parsed.backingFile}' but no way to open it was given (pass backing or openBacking)`,
        );
      }
      backing = await opts.openBacking(parsed.backingFile, parsed.backingFormat);
      ownsBacking = true;
    }

    // Changes to the image come last, once nothing else can make the open fail.
    if (!readOnly) {
      if (toMark.length > 0) await markInUse(bitmapCtx, toMark);
      const unknownAutoclear = h.autoclearFeatures & ~KNOWN_AUTOCLEAR;
      if (unknownAutoclear !== 0n) {
        // The spec lets a writer that does not know an autoclear feature write only after clearing it.
        const raw = new Uint8Array(8);
        new DataView(raw.buffer).setBigUint64(0, h.autoclearFeatures & KNOWN_AUTOCLEAR);
        await file.write(FIELD_AUTOCLEAR, raw);
        await file.flush();
        h.autoclearFeatures &= KNOWN_AUTOCLEAR;
      }
    }
    return { backing, ownsBacking, readOnly, parsed, l1Raw, rc, taken };
  } catch (err) {
    if (ownsBacking) await backing?.close().catch(() => undefined);
    await file.close().catch(() => undefined);
    throw err;
  }
}
