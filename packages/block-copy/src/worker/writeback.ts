import { SYNC_FILE_RANGE, type NativeIO } from '@shear/native';

/**
 * Writeback pacing, per thread and per target fd. Written pieces are gathered into runs of up to
 * `startBytes`; a full (or broken) run's writeback is started with one SYNC_FILE_RANGE_WRITE, no
 * wait; only when more than `lagBytes` of started runs are outstanding does the thread wait for
 * the oldest and drop it from the page cache. So the disk has up to `lagBytes` per worker to work
 * on, a worker waits only for data written long ago (usually on disk already), and dirty plus
 * writeback pages stay bounded by workers × (startBytes + lagBytes) whatever the disk size; the
 * final fsync finds little left.
 *
 * The earlier scheme started each 1 MiB piece and waited for the piece written just before: at
 * most 2 MiB per worker at the disk, a wait on nearly every piece, and two sync_file_range calls
 * per MiB (profile of a 1 GiB copy: 1.3 s of the workers' time blocked in sync_file_range,
 * against 0.4–0.7 s with this pacing).
 *
 * Best effort: errors are ignored (EBADF for an fd the coordinator closed meanwhile, a file
 * system without the call); the final flush reports real write errors. State for an fd that is
 * closed and reused costs at most one useless sync of another file's range.
 */
export const PACE_START_BYTES = 4 * 1024 * 1024;
export const PACE_LAG_BYTES = 8 * 1024 * 1024;

export interface PaceLimits {
  startBytes: number;
  lagBytes: number;
}

interface Range {
  offset: number;
  bytes: number;
}

interface FdState {
  /** Written, writeback not started yet. */
  gathering: Range | undefined;
  /** Writeback started, not waited for; oldest first. */
  started: Range[];
  startedBytes: number;
}

const states = new Map<number, FdState>();

function envMiB(name: string, fallback: number): number {
  const v = process.env[name];
  return v && Number.isFinite(Number(v)) && Number(v) >= 0 ? Number(v) * 1024 * 1024 : fallback;
}

/** The limits, overridable for measurements (SHEAR_PACE_START_MIB, SHEAR_PACE_LAG_MIB). */
export const defaultLimits: PaceLimits = {
  startBytes: envMiB('SHEAR_PACE_START_MIB', PACE_START_BYTES),
  lagBytes: envMiB('SHEAR_PACE_LAG_MIB', PACE_LAG_BYTES),
};

export function paceWriteback(fd: number, offset: number, bytes: number, native: NativeIO, limits: PaceLimits = defaultLimits): void {
  let s = states.get(fd);
  if (!s) states.set(fd, (s = { gathering: undefined, started: [], startedBytes: 0 }));
  const g = s.gathering;
  if (g && g.offset + g.bytes === offset) {
    g.bytes += bytes;
  } else {
    if (g) start(fd, s, native, limits);
    s.gathering = { offset, bytes };
  }
  if (s.gathering!.bytes >= limits.startBytes) start(fd, s, native, limits);
}

function start(fd: number, s: FdState, native: NativeIO, limits: PaceLimits): void {
  const g = s.gathering!;
  s.gathering = undefined;
  try {
    native.syncFileRange(fd, g.offset, g.bytes, SYNC_FILE_RANGE.WRITE);
  } catch {
    return;
  }
  s.started.push(g);
  s.startedBytes += g.bytes;
  while (s.startedBytes > limits.lagBytes && s.started.length > 0) {
    const old = s.started.shift()!;
    s.startedBytes -= old.bytes;
    try {
      native.syncFileRange(fd, old.offset, old.bytes, SYNC_FILE_RANGE.WAIT_BEFORE | SYNC_FILE_RANGE.WRITE | SYNC_FILE_RANGE.WAIT_AFTER);
      native.fadvise(fd, old.offset, old.bytes, 'dontneed');
    } catch {
      // Pacing is an optimisation; correctness comes from the flush at the end.
    }
  }
}

/** Bytes this thread has written to `fd` and not yet waited for (gathering + started). */
export function outstandingWriteback(fd: number): number {
  const s = states.get(fd);
  return s ? (s.gathering?.bytes ?? 0) + s.startedBytes : 0;
}
