import { statfs } from 'node:fs/promises';
import { ShearError } from '@shear/base';
import { formatBytes } from '../progress-bar.js';
import type { BackupSummary } from './backup.js';

/** The one line `shear backup` prints on success (without --json). */
export function summaryLine(s: BackupSummary): string {
  return (
    `backed up ${s.source} -> ${s.target}: ${formatBytes(s.bytes)} in ${s.seconds.toFixed(2)} s (${s.mibPerSec} MiB/s), ` +
    `${formatBytes(s.copiedBytes)} copied, ${formatBytes(s.skippedBytes)} zero or unallocated, ${s.workers} worker(s)` +
    `${s.retries > 0 ? `, ${s.retries} range(s) retried after I/O errors` : ''}${s.verified ? ', verified' : ''}`
  );
}

/** Free bytes for an unprivileged writer on the file system holding `dir`, or undefined. */
export async function freeBytes(dir: string): Promise<number | undefined> {
  const st = await statfs(dir).catch(() => undefined);
  return st ? st.bavail * st.bsize : undefined;
}

export interface FailureFacts {
  source: string;
  target: string;
  /** Data bytes written to the target before the failure. */
  written: number;
  /** About how much data the whole copy writes. */
  needs: number;
  /** Free space where the target goes, measured before the backup started. */
  free: number | undefined;
}

/**
 * Rewrites the low-level failures a user can act on into messages that say what to do:
 * a full target names the target, what was written and what the copy needs; a corrupt source
 * names the image. Everything else (and the error's code and kind) passes unchanged.
 */
export function explainFailure(err: unknown, f: FailureFacts): unknown {
  if (!(err instanceof ShearError)) return err;
  if (err.kind === 'no-space') {
    const free = f.free === undefined ? '' : ` and ${formatBytes(f.free)} were free when the backup started`;
    return new ShearError(
      err.code,
      `Cannot write target "${f.target}": no space left on its file system after ${formatBytes(f.written)} of data were written; ` +
        `the copy needs about ${formatBytes(f.needs)}${free}. Free some space or choose another target; nothing was left behind`,
      { ...err.context, path: f.target, bytes: f.written },
      { cause: err },
    );
  }
  if (err.kind === 'corrupt' && !err.message.includes(f.source)) {
    const why = err.message.replace(/^Cannot [^:]*qcow2[^:]*: /, '');
    return new ShearError(err.code, `Cannot back up "${f.source}": the image is corrupt: ${why} (see qemu-img check)`, { ...err.context, path: f.source }, { cause: err });
  }
  return err;
}
