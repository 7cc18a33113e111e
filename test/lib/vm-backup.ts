// One backup of a running guest, checked against the disk at its point in time: the VM is paused,
// its disk copied with `qemu-img convert -U`, the point-in-time export set up, the VM resumed;
// the guest writes on while the copier pulls; the chain restored by qemu-img must equal the copy
// block for block, with no torn block and no block from another point in time.
import path from 'node:path';
import type { Copier, PullOutcome } from './vm-pull.js';
import { readImage } from './vm-pull.js';
import { checkPointInTime, type PointInTimeCheck } from './vm-pattern.js';

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
