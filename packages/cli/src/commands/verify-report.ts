import { ShearError } from '@shear/base';
import type { ChunkDiff } from '../backup-manifest.js';
import { EXIT } from '../exit-codes.js';

/** How many differing chunks a message lists before it says "and N more" (--json lists all). */
const LISTED = 20;

/** "MiB 5" for a 1 MiB chunk; a short last chunk gets its byte range. */
export function describeChunk(d: ChunkDiff): string {
  const mib = d.offset / 2 ** 20;
  return d.bytes === 2 ** 20 ? `MiB ${mib}` : `MiB ${mib} (bytes ${d.offset}..${d.offset + d.bytes - 1})`;
}

export function describeChunks(diffs: readonly ChunkDiff[]): string {
  const shown = diffs.slice(0, LISTED).map(describeChunk).join(', ');
  return diffs.length > LISTED ? `${shown} and ${diffs.length - LISTED} more` : shown;
}

/** The verification failure: every differing MiB named, exit status 7. */
export function mismatchError(what: string, diffs: readonly ChunkDiff[], after: string): ShearError {
  const n = diffs.length;
  const err = new ShearError(
    'ERR_VERIFY_MISMATCH',
    `Verification failed: ${what} differs from the manifest in ${n} chunk${n === 1 ? '' : 's'}: ${describeChunks(diffs)}; ${after}`,
    { offset: diffs[0]!.offset, bytes: diffs[0]!.bytes },
  );
  (err as ShearError & { exitCode?: number }).exitCode = EXIT.VERIFY_MISMATCH;
  return err;
}
