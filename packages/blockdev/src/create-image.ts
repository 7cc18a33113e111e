import { open, rm } from 'node:fs/promises';
import { ShearError } from '@shear/base';
import { FileDriver } from '@shear/block';
import { Qcow2Image } from '@shear/qcow2';
import { ioError } from '@shear/native';

export interface CreateImageOptions {
  path: string;
  format: 'raw' | 'qcow2';
  /** Virtual size in bytes. */
  size: number;
  /** Refuse to replace an existing file (default true). */
  exclusive?: boolean;
  clusterBytes?: number;
  backingFile?: string;
  backingFormat?: string;
}

/**
 * Creates an empty image file (QEMU's blockdev-create for `file` and `qcow2`, or
 * `qemu-img create`): a sparse raw file of `size` bytes, or a qcow2 v3 image. A failure
 * removes what it created.
 * @throws ERR_INVALID_ARGUMENT (existing file with exclusive, bad size), and I/O errors
 */
export async function createImage(opts: CreateImageOptions): Promise<void> {
  if (!Number.isSafeInteger(opts.size) || opts.size < 0) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot create image '${opts.path}': size ${opts.size} must be a non-negative integer`, { path: opts.path });
  }
  const exclusive = opts.exclusive ?? true;
  let created = false;
  try {
    if (opts.format === 'raw') {
      if (opts.backingFile) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot create raw image '${opts.path}': raw images have no backing file`);
      const fh = await open(opts.path, exclusive ? 'wx' : 'w').catch((err) => { throw existsError(err, opts.path); });
      created = true;
      try {
        await fh.truncate(opts.size);
        await fh.sync();
      } finally {
        await fh.close();
      }
      return;
    }
    const file = await FileDriver.open(opts.path, { create: { size: 0, exclusive } }).catch((err) => { throw existsError(err, opts.path); });
    created = true;
    // Only the header is written: the backing file is named, not opened.
    const img = await Qcow2Image.create(file, {
      size: opts.size,
      ...(opts.clusterBytes !== undefined ? { clusterBytes: opts.clusterBytes } : {}),
      ...(opts.backingFile !== undefined ? { backingFile: opts.backingFile, backing: null } : {}),
      ...(opts.backingFormat !== undefined ? { backingFormat: opts.backingFormat } : {}),
    });
    await img.close();
  } catch (err) {
    if (created) await rm(opts.path, { force: true });
    throw err;
  }
}

function existsError(err: unknown, file: string): unknown {
  if ((err as { code?: string })?.code === 'EEXIST' || (err as ShearError)?.context?.errno === 'EEXIST') {
    return new ShearError('ERR_INVALID_ARGUMENT', `Cannot create image '${file}': the file already exists`, { path: file }, { cause: err });
  }
  return ioError(err, `create image '${file}'`, { path: file });
}
