// Peak resident memory of a benchmark's processes: a command's from GNU time (its wait4 rusage,
// worker threads and all), a long-running daemon's from the kernel's high-water mark.
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const GNU_TIME = '/usr/bin/time';

export interface RssWrapped {
  cmd: string;
  args: string[];
  /** The child's peak RSS in bytes once it has exited (undefined without GNU time); cleans up. */
  read(): number | undefined;
}

/** Wraps a command in GNU time when it is installed (Debian package `time`), else runs it as is. */
export function withPeakRss(cmd: string, args: string[]): RssWrapped {
  if (!existsSync(GNU_TIME)) return { cmd, args, read: () => undefined };
  const dir = mkdtempSync(path.join(os.tmpdir(), 'shear-rss-'));
  const out = path.join(dir, 'rss');
  return {
    cmd: GNU_TIME,
    args: ['-f', '%M', '-o', out, cmd, ...args],
    read() {
      try {
        const kib = Number(readFileSync(out, 'utf8').trim().split('\n').pop());
        return Number.isFinite(kib) && kib > 0 ? kib * 1024 : undefined;
      } catch {
        return undefined;
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    },
  };
}

/** A running process's peak RSS so far (VmHWM), in bytes; undefined once it is gone. */
export function processPeakRss(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined;
  try {
    const m = /^VmHWM:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : undefined;
  } catch {
    return undefined;
  }
}
