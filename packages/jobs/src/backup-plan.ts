import { ShearError, alignDown, alignUp } from '@shear/base';
import type { BlockNode } from '@shear/block';
import type { BlockCopy, BlockCopyOptions } from '@shear/block-copy';
import { concludeBitmapSync, type BitmapSyncMode, type DirtyBitmap, type JobOutcome } from '@shear/dirty-bitmap';

/**
 * The one backup composition: the decisions that make a block-copy a backup, shared by the
 * offline `shear backup`, the daemon's blockdev-backup job and the coming `shear pull`. Each
 * caller owns its own I/O wiring (a temporary file and rename, or a copy-before-write filter)
 * and its own job states; what data is copied, in which units, and what the dirty bitmap holds
 * afterwards is decided here, once, so the two paths cannot drift apart.
 */

/** Sync modes after `incremental` has become `bitmap` (checkBackupArgs). */
export type BackupSync = 'full' | 'top' | 'bitmap' | 'none';

/** The copy engine's settings a backup decides; the caller adds source, target, length and pool. */
export type BackupCopyOptions = Omit<BlockCopyOptions, 'source' | 'target' | 'length' | 'pool'>;

/** Block-copy's list of clusters still to copy. */
type CopyBitmap = BlockCopy['copyBitmap'];

export interface BackupPlanParams {
  source: BlockNode;
  target: BlockNode;
  sync: BackupSync;
  /** The job's dirty bitmap, already looked up and checked (not busy, not inconsistent). */
  bitmap?: DirtyBitmap | undefined;
  /** Required with a bitmap. */
  bitmapMode?: BitmapSyncMode | undefined;
  compress?: boolean | undefined;
  /** Largest copy task; raised to the cluster size. Absent: block-copy's default. */
  maxChunk?: number | undefined;
  /** Copy tasks running at once. Absent: block-copy's default (twice the pool's workers). */
  maxTasks?: number | undefined;
  /** One task at a time: the single-coroutine baseline. */
  singleTask?: boolean | undefined;
  /** Bytes per second; 0 or absent: unlimited. */
  speed?: number | undefined;
  /** Attempts at a range after an I/O error before the error is the caller's. */
  retries?: number | undefined;
  /** The target reads as zeroes everywhere (a freshly created image): zero ranges need no write. */
  targetIsZero?: boolean | undefined;
  /**
   * Whether what reached the target survives a failure. A job's target does (a retry with
   * bitmap mode `always` copies only the rest); a one-shot backup deletes its partial file, so
   * after a failure its bitmap must keep every bit, whatever the mode says.
   */
  partialTargetKept: boolean;
}

export interface BackupPlan {
  /** The copy's unit: at least 64 KiB, and never below the target's cluster (compressed writes are per cluster). */
  readonly clusterBytes: number;
  readonly copyOptions: BackupCopyOptions;
  /**
   * The backup's point in time: freezes the bitmap behind a successor (writes from now on go to
   * the successor) and fills the copy bitmap, from the bitmap for sync=bitmap, with everything
   * otherwise. Synchronous, so the caller can do it in one step with inserting its filter, with
   * the source drained. Returns the undo (successor merged back, copy bitmap emptied).
   */
  takePointInTime(copyBitmap: CopyBitmap): () => void;
  /**
   * sync=top: clusters the top layer leaves wholly unallocated leave the copy bitmap before
   * the copy, as QEMU does, so they count neither in the progress total nor, under bitmap mode
   * `always` after a failure, in what is left to copy. Returns the bytes left out.
   */
  leaveOutUnallocated(copyBitmap: CopyBitmap, signal: AbortSignal): Promise<number>;
  /** Ends the bitmap's freeze by the bitmap sync mode; a no-op without a frozen bitmap, or the second time. */
  settle(outcome: JobOutcome, copyBitmap: CopyBitmap): void;
}

/** What a format target offers for compressed writes (qcow2). */
interface CompressingTarget {
  clusterBytes: number;
  writeDeflated(offset: number, packed: Uint8Array): Promise<void>;
}

/**
 * A structural check rather than a driver class, so any target that can store deflated
 * clusters qualifies without this package knowing it.
 */
function compressingTarget(driver: unknown): CompressingTarget | undefined {
  if (typeof driver !== 'object' || driver === null) return undefined;
  if (!('clusterBytes' in driver) || typeof driver.clusterBytes !== 'number') return undefined;
  if (!('writeDeflated' in driver) || typeof driver.writeDeflated !== 'function') return undefined;
  const write = driver.writeDeflated;
  return { clusterBytes: driver.clusterBytes, writeDeflated: (o, d) => Promise.resolve(write.call(driver, o, d)) };
}

/** The target's own cluster size, if its format has one (qcow2); 0 otherwise. */
function targetClusterBytes(driver: unknown): number {
  if (typeof driver !== 'object' || driver === null || !('clusterBytes' in driver)) return 0;
  return typeof driver.clusterBytes === 'number' ? driver.clusterBytes : 0;
}

/** Below this the per-task overhead dominates; it is also QEMU's backup cluster floor. */
const MIN_COPY_CLUSTER_BYTES = 65536;
/** zlib window of compressed clusters: 4 KiB, as qcow2 readers (QEMU) expect raw deflate with it. */
const DEFLATE_WINDOW_BITS = 12;

/**
 * Decides the copy for a backup of `source` to `target`.
 * @throws ERR_INVALID_ARGUMENT when compression is asked of a target that cannot store it, or a bitmap comes without a mode
 */
export function planBackup(p: BackupPlanParams): BackupPlan {
  if (p.bitmap && !p.bitmapMode) throw new ShearError('ERR_INVALID_ARGUMENT', 'Bitmap sync mode must be given when providing a bitmap');
  if (p.sync === 'bitmap' && !p.bitmap) throw new ShearError('ERR_INVALID_ARGUMENT', "must provide a valid bitmap name for 'bitmap' sync mode");
  const targetDriver = p.target.isOpen ? p.target.driver : undefined;
  const clusterBytes = Math.max(MIN_COPY_CLUSTER_BYTES, targetClusterBytes(targetDriver));
  const deflating = p.compress ? compressingTarget(targetDriver) : undefined;
  if (p.compress && !deflating) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot start backup: compression is not supported by target node "${p.target.name}" (it needs a qcow2 target)`);
  }
  const copyOptions: BackupCopyOptions = {
    clusterBytes,
    ...(p.maxChunk ? { maxChunkBytes: Math.max(p.maxChunk, clusterBytes) } : {}),
    ...(p.maxTasks ? { maxTasks: p.maxTasks } : {}),
    ...(p.singleTask ? { singleTask: true } : {}),
    speed: p.speed ?? 0,
    retryAttempts: p.retries ?? 0,
    skipUnallocated: p.sync === 'top',
    ...(p.targetIsZero ? { targetIsZero: true } : {}),
    ...(deflating ? { compress: { clusterBytes, windowBits: DEFLATE_WINDOW_BITS, writeDeflated: deflating.writeDeflated } } : {}),
  };
  const { source, bitmap } = p;
  const bitmapMode = p.bitmapMode;
  return {
    clusterBytes,
    copyOptions,
    takePointInTime(copyBitmap) {
      if (bitmap) source.bitmaps.createSuccessor(bitmap);
      try {
        if (p.sync === 'bitmap') copyBitmap.merge(bitmap!.bits);
        else copyBitmap.set(0, Math.max(1, source.length));
      } catch (err) {
        if (bitmap?.frozen) source.bitmaps.reclaim(bitmap);
        throw err;
      }
      return () => {
        copyBitmap.clear();
        if (bitmap?.frozen) source.bitmaps.reclaim(bitmap);
      };
    },
    async leaveOutUnallocated(copyBitmap, signal) {
      if (p.sync !== 'top') return 0;
      const cluster = clusterBytes;
      const length = source.length;
      let left = 0;
      for (let at = 0; at < length; ) {
        signal.throwIfAborted();
        const extents = await source.blockStatus(at, length - at);
        if (extents.length === 0) break;
        for (const e of extents) {
          if (!e.allocated) {
            // Only whole clusters: a cluster the top layer partly allocates is copied whole.
            const from = alignUp(e.offset, cluster);
            const to = e.offset + e.bytes >= length ? length : alignDown(e.offset + e.bytes, cluster);
            if (to > from) {
              left += to - from;
              copyBitmap.reset(from, to - from);
            }
          }
          at = Math.max(at, e.offset + e.bytes);
        }
      }
      return left;
    },
    settle(outcome, copyBitmap) {
      if (!bitmap?.frozen || !bitmapMode) return;
      const mode = outcome !== 'success' && bitmapMode === 'always' && !p.partialTargetKept ? 'on-success' : bitmapMode;
      concludeBitmapSync(source.bitmaps, bitmap, mode, outcome, copyBitmap);
    },
  };
}
