import { mkdir, open, rm } from 'node:fs/promises';
import { randomFillSync } from 'node:crypto';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { runBackup } from './backup.js';
import { runBitmapDemo } from '../demo-bitmaps.js';
import { formatBytes } from '../progress-bar.js';
import type { Logger } from '../logger.js';
import { EXIT } from '../exit-codes.js';

const MiB = 2 ** 20;

/**
 * Writes a demo disk: runs of random data (incompressible), of repeated text (compressible),
 * of written zeroes, and holes, in 1 MiB pieces chosen by a fixed seed, so that every run of
 * the demo backs up the same disk.
 */
export async function makeDemoDisk(file: string, bytes: number): Promise<{ dataBytes: number }> {
  const fh = await open(file, 'w');
  let dataBytes = 0;
  try {
    await fh.truncate(bytes);
    const piece = Buffer.alloc(MiB);
    const text = Buffer.from('Shear demo disk: this sector holds the same sentence over and over. ');
    let x = 0x5eed;
    for (let at = 0; at < bytes; at += MiB) {
      x = (Math.imul(x, 1103515245) + 12345) >>> 0;
      const kind = (x >>> 16) % 8;
      const n = Math.min(MiB, bytes - at);
      if (kind <= 2) randomFillSync(piece, 0, n);
      else if (kind === 3) for (let i = 0; i < n; i += text.length) text.copy(piece, i, 0, Math.min(text.length, n - i));
      else if (kind === 4) piece.fill(0, 0, n);
      else continue; // a hole
      await fh.write(piece, 0, n, at);
      if (kind !== 4) dataBytes += n;
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
  return { dataBytes };
}

export async function runDemo(argv: string[], log: Logger, signal: AbortSignal): Promise<number> {
  const { values } = parseArgs({ args: argv, options: { dir: { type: 'string' }, size: { type: 'string' }, 'log-level': { type: 'string' } }, strict: true });
  const dir = path.resolve(values.dir ?? 'demo');
  const bytes = Number(values.size ?? 1024 * MiB);
  await mkdir(dir, { recursive: true });
  const disk = path.join(dir, 'disk.raw');
  const out = (s: string) => process.stdout.write(s + '\n');

  out(`1. Making a demo disk: ${disk} (${formatBytes(bytes)}: random data, text, written zeroes and holes)`);
  const { dataBytes } = await makeDemoDisk(disk, bytes);
  out(`   ${formatBytes(dataBytes)} of data, the rest zeroes or holes\n`);

  const raw = path.join(dir, 'backup.raw');
  await rm(raw, { force: true });
  out(`2. Full backup to a raw image, on worker threads, verified against the source:`);
  out(`   shear backup --source ${disk} --target ${raw} --verify`);
  let code = await runBackup(['--source', disk, '--target', raw, '--verify'], log, signal);
  if (code !== EXIT.OK) return code;

  const qcow2 = path.join(dir, 'backup.qcow2');
  await rm(qcow2, { force: true });
  out(`\n3. The same disk to a compressed qcow2 image (readable by qemu-img), verified:`);
  out(`   shear backup --source ${disk} --target ${qcow2} --target-format qcow2 --compress --verify`);
  code = await runBackup(['--source', disk, '--target', qcow2, '--target-format', 'qcow2', '--compress', '--verify'], log, signal);
  if (code !== EXIT.OK) return code;
  out(`   check it with: qemu-img check ${qcow2} && qemu-img compare ${disk} ${qcow2}\n`);

  out('4. Dirty bitmaps and bitmap sync modes:\n');
  runBitmapDemo(out);
  return EXIT.OK;
}
