import { open as openFile, readFile, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import { ShearError } from '@shear/base';

/**
 * The resumable state of an unfinished pull, `T.shear-pull-state` beside the target: what it
 * pulls (so --resume refuses another export or another kind of pull), the hidden partial image
 * it writes, and the chunks (CHUNK_BYTES each) whose planned ranges are durably in that image.
 * It is only rewritten after the partial image was flushed, so a chunk it lists is on disk.
 */
export interface PullState {
  format: 'shear-pull-state';
  version: 1;
  source: string;
  exportName: string;
  size: number;
  identity: string;
  kind: 'full' | 'incremental';
  bitmap: string | null;
  targetFormat: 'raw' | 'qcow2';
  backing: string | null;
  /** Basename of the hidden partial image beside the target. */
  partial: string;
  /** Done chunk indexes as [first, end) runs. */
  done: [number, number][];
  copiedBytes: number;
  trimmedBytes: number;
}

export type PullIdentity = Pick<PullState, 'exportName' | 'size' | 'identity' | 'kind' | 'bitmap' | 'targetFormat' | 'backing'>;

export const statePathFor = (target: string): string => target + '.shear-pull-state';
export const partialPathFor = (target: string): string => path.join(path.dirname(target), `.${path.basename(target)}.shear-pull-partial`);

export function runsOf(done: Iterable<number>): [number, number][] {
  const sorted = [...done].sort((a, b) => a - b);
  const runs: [number, number][] = [];
  for (const i of sorted) {
    const last = runs[runs.length - 1];
    if (last && last[1] === i) last[1] = i + 1;
    else if (!last || last[1] < i) runs.push([i, i + 1]);
  }
  return runs;
}

export function chunksOf(runs: readonly [number, number][]): Set<number> {
  const s = new Set<number>();
  for (const [a, b] of runs) for (let i = a; i < b; i++) s.add(i);
  return s;
}

/** Writes the state atomically (tmp, fsync, rename, fsync of the directory). */
export async function writePullState(target: string, state: PullState): Promise<void> {
  const file = statePathFor(target);
  const tmp = file + '.tmp';
  const fh = await openFile(tmp, 'w');
  try {
    await fh.writeFile(JSON.stringify(state) + '\n');
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, file);
  const dir = await openFile(path.dirname(file), 'r');
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}

export async function readPullState(target: string): Promise<PullState | undefined> {
  const file = statePathFor(target);
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  let s: PullState;
  try {
    s = JSON.parse(text) as PullState;
  } catch {
    throw new ShearError('ERR_PULL_STATE_MISMATCH', `Cannot resume: "${file}" is not a pull state file (not JSON); delete it and the hidden partial file to start over`, { path: file });
  }
  if (s?.format !== 'shear-pull-state' || s.version !== 1 || !Array.isArray(s.done) || typeof s.partial !== 'string' || s.partial !== path.basename(s.partial)) {
    throw new ShearError('ERR_PULL_STATE_MISMATCH', `Cannot resume: "${file}" is not a version 1 pull state file; delete it and the hidden partial file to start over`, { path: file });
  }
  return s;
}

/** Throws unless `s` records a pull of the same export, disk, kind and target. */
export function checkResumable(s: PullState, want: PullIdentity, target: string): void {
  const diffs: string[] = [];
  for (const k of ['exportName', 'size', 'identity', 'kind', 'bitmap', 'targetFormat', 'backing'] as const) {
    if (s[k] !== want[k]) diffs.push(`${k} ${JSON.stringify(s[k])} there, ${JSON.stringify(want[k])} now`);
  }
  if (diffs.length > 0) {
    throw new ShearError('ERR_PULL_STATE_MISMATCH', `Cannot resume the pull into "${target}": its state file records another pull (${diffs.join('; ')}); delete ${statePathFor(target)} to start over`, { path: statePathFor(target) });
  }
}

export async function removePullState(target: string): Promise<void> {
  await rm(statePathFor(target), { force: true });
}
