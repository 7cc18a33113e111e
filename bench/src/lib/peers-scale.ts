// The peers bench's scale row: Shear and the tools that can skip holes copy a huge sparse image
// (lib/scale-image.ts), tool by tool within each run, cold and warm, every copy verified and
// made durable (fsync of the target counted).
import { rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { closeSync, openSync, readSync } from 'node:fs';
import { CopyFailure, dropCaches, fsyncFile, syncAll, timedCommand, type Timed } from './copy-runner.js';
import type { Cache } from './bench-start.js';
import { ensureScaleImage, verifyScaleCopy, type ScaleImage } from './scale-image.js';

const MiB = 2 ** 20;

export interface ScaleCase {
  id: string;
  label: string;
  shear: boolean;
  run: (src: string, dst: string) => Promise<Timed>;
}

export interface ScaleMeasurement {
  caseId: string;
  label: string;
  cache: Cache;
  run: number;
  ok: boolean;
  error?: string;
  durableSeconds?: number;
  /** Logical image bytes per second (the table's unit, as for every other row). */
  mibPerSec?: number;
  /** Data bytes per second: what "time follows the data" is judged on. */
  dataMibPerSec?: number;
  peakRssBytes?: number;
  loadavg1: number;
}

export function scaleCases(cli: string): ScaleCase[] {
  const shear = (extra: string[]) => (s: string, d: string) => timedCommand(process.execPath, [cli, 'backup', '--source', s, '--target', d, '--json', ...extra]);
  return [
    { id: 'shear-default', label: 'shear (default)', shear: true, run: shear([]) },
    { id: 'shear-single-task', label: 'shear --single-task', shear: true, run: shear(['--single-task']) },
    { id: 'cp', label: 'cp --sparse=auto', shear: false, run: (s, d) => timedCommand('cp', ['--sparse=auto', s, d]) },
    { id: 'qemu-img-m16-W', label: 'qemu-img convert -m 16 -W', shear: false, run: (s, d) => timedCommand('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', '-m', '16', '-W', s, d]) },
    { id: 'nbdcopy', label: 'nbdcopy (defaults)', shear: false, run: (s, d) => timedCommand('nbdcopy', [s, d]) },
  ];
}

/** Reads the image's data extents into the page cache (its holes need no warming). */
function warmData(image: ScaleImage): void {
  const fd = openSync(image.path, 'r');
  const buf = Buffer.alloc(MiB);
  try {
    for (const [off, len] of image.extents) readSync(fd, buf, 0, Math.min(len, buf.length), off);
  } finally {
    closeSync(fd);
  }
}

export async function runScale(o: {
  workDir: string; bytes: number; dataPercent: number; runs: number; caches: Cache[]; cli: string; log: (line: string) => void;
}): Promise<{ image: Omit<ScaleImage, 'extents' | 'hashes'>; measurements: ScaleMeasurement[] }> {
  const image = ensureScaleImage(path.join(o.workDir, 'scale.raw'), o.bytes, o.dataPercent, 20261204);
  o.log(`scale.raw: ${(image.bytes / 2 ** 40).toFixed(3)} TiB logical, ${(image.dataBytes / 2 ** 30).toFixed(2)} GiB data in ${image.extents.length} extents${image.reused ? ' (reused)' : ''}`);
  const cases = scaleCases(o.cli);
  const measurements: ScaleMeasurement[] = [];
  const dst = path.join(o.workDir, 'scale-out.raw');
  for (const cache of o.caches) {
    for (let run = 1; run <= o.runs; run++) {
      // Alternate the order from run to run, so drift on a shared machine hits every tool alike.
      const order = run % 2 === 1 ? cases : [...cases].reverse();
      for (const c of order) {
        rmSync(dst, { force: true });
        if (cache === 'cold') dropCaches();
        else { syncAll(); warmData(image); }
        const m: ScaleMeasurement = { caseId: c.id, label: c.label, cache, run, ok: false, loadavg1: os.loadavg()[0]! };
        try {
          const t = await c.run(image.path, dst);
          const seconds = (t.endedAt - t.startedAt) / 1000 + fsyncFile(dst) / 1000;
          m.durableSeconds = seconds;
          m.mibPerSec = image.bytes / MiB / seconds;
          m.dataMibPerSec = image.dataBytes / MiB / seconds;
          if (t.peakRssBytes) m.peakRssBytes = t.peakRssBytes;
          const bad = verifyScaleCopy(image, dst);
          if (bad) m.error = `MISMATCH: ${bad}`;
          else m.ok = true;
        } catch (err) {
          m.error = err instanceof CopyFailure ? err.message : (err as Error).stack ?? String(err);
        }
        rmSync(dst, { force: true });
        measurements.push(m);
        o.log(`scale ${cache} run ${run}: ${c.label}: ${m.dataMibPerSec?.toFixed(0) ?? '-'} MiB/s of data, ${m.durableSeconds?.toFixed(2) ?? '-'} s${m.ok ? '' : `  !!! ${m.error}`}`);
      }
    }
  }
  const { extents: _e, hashes: _h, ...summary } = image;
  return { image: summary, measurements };
}
