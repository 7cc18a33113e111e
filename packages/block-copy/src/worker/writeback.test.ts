import t from 'tap';
import * as fs from 'node:fs';
import path from 'node:path';
import { SYNC_FILE_RANGE, getNative, type NativeIO } from '@shear/native';
import { outstandingWriteback, paceWriteback } from './writeback.js';

const MiB = 1024 * 1024;
const WAIT = SYNC_FILE_RANGE.WAIT_BEFORE | SYNC_FILE_RANGE.WRITE | SYNC_FILE_RANGE.WAIT_AFTER;

/** The real addon, with its pacing calls recorded. */
function recording(): { native: NativeIO; calls: { op: string; offset: number; bytes: number; flags?: number }[] } {
  const real = getNative();
  const calls: { op: string; offset: number; bytes: number; flags?: number }[] = [];
  const native = Object.create(real) as NativeIO;
  native.syncFileRange = (fd, offset, bytes, flags) => {
    calls.push({ op: 'sync', offset, bytes, flags });
    real.syncFileRange(fd, offset, bytes, flags);
  };
  native.fadvise = (fd, offset, bytes, advice) => {
    calls.push({ op: advice, offset, bytes });
    real.fadvise(fd, offset, bytes, advice);
  };
  return { native, calls };
}

t.test('streaming writes: started in runs, waited for only far behind, outstanding bytes bounded', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'target');
  const fd = fs.openSync(file, 'w+');
  t.teardown(() => fs.closeSync(fd));
  const { native, calls } = recording();
  const limits = { startBytes: 4 * MiB, lagBytes: 8 * MiB };
  const piece = Buffer.alloc(MiB, 7);
  let peak = 0;
  // Two interleaved streams, as two tasks of one worker: 0.. and 64 MiB..
  for (let i = 0; i < 32; i++) {
    for (const base of [0, 64 * MiB]) {
      fs.writeSync(fd, piece, 0, MiB, base + i * MiB);
      paceWriteback(fd, base + i * MiB, MiB, native, limits);
      peak = Math.max(peak, outstandingWriteback(fd));
    }
  }
  t.ok(peak <= limits.startBytes + limits.lagBytes + MiB, `at most start + lag outstanding (peak ${peak / MiB} MiB)`);
  const starts = calls.filter((c) => c.op === 'sync' && c.flags === SYNC_FILE_RANGE.WRITE);
  const waits = calls.filter((c) => c.op === 'sync' && c.flags === WAIT);
  t.ok(starts.every((c) => c.bytes >= MiB), `${starts.length} starts for 64 pieces, none smaller than a piece`);
  t.ok(starts.length < 64, 'fewer starts than pieces: runs are gathered');
  t.ok(waits.length > 0, 'old runs are waited for');
  // Every wait is followed by dropping the same range, and covers a range started before.
  for (const w of waits) {
    const i = calls.indexOf(w);
    t.same(calls[i + 1], { op: 'dontneed', offset: w.offset, bytes: w.bytes });
    t.ok(starts.some((s) => s.offset === w.offset && s.bytes === w.bytes && calls.indexOf(s) < i));
  }
  // What is still outstanding is at most start + lag; the final fsync covers it.
  const waited = waits.reduce((n, w) => n + w.bytes, 0);
  t.equal(waited + outstandingWriteback(fd), 64 * MiB, 'every written byte is either waited for or still outstanding');
});
