import { NodeBitmaps, concludeBitmapSync } from '@shear/dirty-bitmap';
import { MiB, GiB } from '@shear/base';

/**
 * A walk through the bitmap layer on a simulated 64 GiB disk: tracking writes, freezing a
 * bitmap for a backup, a backup that fails two thirds of the way, and what each bitmap sync
 * mode leaves for the retry. Prints what happens; touches no files.
 */
export function runBitmapDemo(out: (line: string) => void = console.log): void {
  const DISK = 64 * GiB;
  const G = 64 * 1024;
  const node = new NodeBitmaps('disk0', DISK);
  const show = (label: string, bytes: number) => out(`  ${label.padEnd(58)} ${(bytes / MiB).toFixed(0).padStart(7)} MiB`);

  out('Shear bitmap demo: a 64 GiB disk, dirty bitmaps at 64 KiB granularity\n');
  for (const mode of ['on-success', 'always'] as const) {
    const name = `inc-${mode}`;
    const bm = node.add({ name, granularity: G });
    // A day of guest writes: 48 GiB of the disk changes (3/4, as in seed 004).
    node.markDirty(0, 48 * GiB);
    out(`bitmap "${name}" (sync mode ${mode}):`);
    show('dirty after the writes since the last backup', bm.bits.countBytes());

    // Backup starts: the bitmap freezes, a successor records new writes.
    node.createSuccessor(bm);
    const toCopy = bm.bits.copy();
    // The backup copies 32 GiB (2/3 of the increment), then the target fails.
    toCopy.reset(0, 32 * GiB);
    node.markDirty(60 * GiB, 256 * MiB); // writes while the backup ran
    const after = concludeBitmapSync(node, bm, mode, 'failure', toCopy);
    show('left for the retry after a failure at 2/3', after.bits.countBytes());
    node.remove(name);
  }
  out('\n`always` keeps only the uncopied third plus the new writes; `on-success` makes the retry');
  out('copy the whole increment again. Count, merge and search run on the shared words directly:');
  const big = node.add({ name: 'big', granularity: G });
  const t0 = process.hrtime.bigint();
  big.bits.set(DISK - G, G);
  const found = big.bits.nextDirty(0);
  const us = Number(process.hrtime.bigint() - t0) / 1000;
  out(`  next dirty cluster of a 64 GiB bitmap with one bit set: offset ${found} found in ${us.toFixed(0)} us`);
}
