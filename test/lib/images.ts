import { randomBytes } from 'node:crypto';
import { closeSync, ftruncateSync, openSync, writeSync } from 'node:fs';
import { execFileSync } from 'node:child_process';

/**
 * A raw image of `bytes` with random data in about half of its 64 KiB clusters (chosen by
 * `seed`), holes elsewhere, and a run of written zeroes. Returns the content.
 */
export function makeRawImage(file: string, bytes: number, seed = 1): Buffer {
  const content = Buffer.alloc(bytes);
  const fd = openSync(file, 'w');
  try {
    ftruncateSync(fd, bytes);
    let x = seed >>> 0 || 1;
    for (let o = 0; o < bytes; o += 65536) {
      x = (Math.imul(x, 1103515245) + 12345) >>> 0;
      const n = Math.min(65536, bytes - o);
      if ((x >>> 16) % 2 === 0) {
        randomBytes(n).copy(content, o);
        writeSync(fd, content, o, n, o);
      } else if ((x >>> 16) % 7 === 1) {
        writeSync(fd, Buffer.alloc(n), 0, n, o);
      }
    }
  } finally {
    closeSync(fd);
  }
  return content;
}

export function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8' });
}

/** `qemu-img check --output=json` parsed; throws if qemu-img reports errors (non-zero exit). */
export function qemuImgCheck(file: string): { errors?: number; leaks?: number; 'check-errors': number; 'corruptions'?: number } {
  try {
    return JSON.parse(qemuImg('check', '--output=json', file));
  } catch (err) {
    const out = (err as { stdout?: string }).stdout;
    if (out) return JSON.parse(out);
    throw err;
  }
}

/** True when qemu-img compare finds the two images equal (exit 0). */
export function qemuImgSame(a: string, b: string): boolean {
  try {
    qemuImg('compare', a, b);
    return true;
  } catch {
    return false;
  }
}
