// One backup of a running guest, checked against the disk at its point in time: the VM is paused,
// its disk copied with `qemu-img convert -U`, the point-in-time export set up, the VM resumed;
// the guest writes on while the copier pulls; the chain restored by qemu-img must equal the copy
// block for block, with no torn block and no block from another point in time.
import path from 'node:path';
import type { Copier, PullOutcome } from './vm-pull.js';
import { readImage } from './vm-pull.js';
import { BLOCK, changedBlocks, checkPointInTime, type PointInTimeCheck } from './vm-pattern.js';

export interface PointInTimeExport {
  url: string;
  /** The bitmap to read for an incremental. */
  bitmap: string | undefined;
  /** Ends the export (and whatever job holds the point in time). */
  end(): Promise<void>;
}

export interface BackupStep {
  dir: string;
  /** Names this backup's files. */
  tag: string;
  /** The guest's live disk image (read with -U while the guest is paused). */
  disk: string;
  pause(): Promise<void>;
  resume(): Promise<void>;
  /** Sets up the export at the current point in time (called while paused). */
  startExport(): Promise<PointInTimeExport>;
  /** Runs after the guest has resumed and before the pull: makes the guest write past the point. */
  afterResume(): Promise<void>;
  copier: Copier;
  /** The previous backup, for an incremental. */
  backing: string | undefined;
  /** Extra copier arguments (e.g. --trim). */
  trim?: boolean;
  diskId?: string;
}

export interface BackupResult {
  target: string;
  /** The disk at the point in time, from the paused VM. */
  copy: Buffer;
  /** What the chain up to `target` reads. */
  restored: Buffer;
  outcome: PullOutcome;
  check: PointInTimeCheck;
  bitmap: string | undefined;
}

export async function checkedBackup(s: BackupStep): Promise<BackupResult> {
  const target = path.join(s.dir, `backup-${s.tag}.qcow2`);
  await s.pause();
  let exp: PointInTimeExport | undefined;
  let copy: Buffer;
  try {
    copy = await readImage(s.disk, path.join(s.dir, `copy-${s.tag}.raw`), { shareLock: true });
    exp = await s.startExport();
  } finally {
    await s.resume();
  }
  let outcome: PullOutcome;
  try {
    await s.afterResume();
    outcome = await s.copier.pull({ url: exp.url, target, bitmap: exp.bitmap, backing: s.backing, trim: s.trim, diskId: s.diskId });
  } finally {
    await exp.end();
  }
  const restored = await readImage(target, path.join(s.dir, `restored-${s.tag}.raw`));
  return { target, copy, restored, outcome, check: checkPointInTime(restored, copy), bitmap: exp.bitmap };
}

/** The part of tap's Test the checks use. */
interface Asserts {
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  ok(...args: any[]): unknown;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  same(...args: any[]): unknown;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  equal(...args: any[]): unknown;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  comment(...args: any[]): unknown;
}

/**
 * The checks every backup of the guest must pass: the restored chain is the disk at the point in
 * time (no torn block, no block from another point), the guest had written past that point
 * before the pull began (`genAtPull`), and an incremental copied exactly the 64 KiB clusters the
 * guest changed since the previous backup. Returns those dirty bytes (0 for a full backup).
 */
export function assertBackup(t: Asserts, kind: string, r: BackupResult, prev: BackupResult | undefined, genAtPull: number): number {
  t.comment(`${kind}: copied ${r.outcome.copiedBytes} bytes; the guest had written ${r.check.written} blocks up to generation ${r.check.newest}`);
  t.ok(r.check.written > 0, `${kind}: the guest had written its pattern`);
  t.same(r.check.torn.slice(0, 10), [], `${kind}: no torn or misplaced block in the restored chain`);
  t.same(r.check.mixed.slice(0, 10), [], `${kind}: every block is from the backup's point in time`);
  t.ok(r.restored.equals(r.copy), `${kind}: the restored chain equals the disk copied while the VM was paused`);
  t.ok(genAtPull > r.check.newest, `${kind}: the guest had written generations up to ${genAtPull} when the pull began; none after ${r.check.newest} is in the backup`);
  if (!prev) return 0;
  const changed = changedBlocks(prev.copy, r.copy);
  const dirty = new Set(changed.map((b) => Math.floor((b * BLOCK) / DIRTY_GRANULARITY))).size * DIRTY_GRANULARITY;
  t.ok(changed.length > 0, `${kind}: the guest changed ${changed.length} blocks since the previous backup`);
  t.equal(r.outcome.copiedBytes, dirty, `${kind}: the copier copied exactly the ${DIRTY_GRANULARITY / 1024} KiB clusters the guest changed`);
  t.ok(r.outcome.copiedBytes < r.copy.length, `${kind}: an incremental, not a full copy`);
  return dirty;
}

/** Granularity of the dirty bitmaps QEMU and libvirt create on a qcow2 with 64 KiB clusters. */
export const DIRTY_GRANULARITY = 65536;
