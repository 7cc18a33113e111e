import { open, type FileHandle } from 'node:fs/promises';
import { ShearError, assertRange } from '@shear/base';
import { dirname, isAbsolute, join } from 'node:path';
import type { BlockIO, BlockStatusExtent, HostExtent, WriteMapping, WriteOptions, WriteZeroesOptions } from '@shear/block';
import type { GrowableIO } from './growable-io.js';
import { Qcow2Image, type Qcow2OpenOptions } from './image.js';

/**
 * A minimal file-backed GrowableIO for this package's tests only (the real driver is the block
 * package's `file` driver). Reads past EOF return zeroes; writes past EOF grow the file.
 */
export class TestFileIO implements GrowableIO {
  #fh: FileHandle | null;
  #length: number;
  readonly #readOnly: boolean;

  private constructor(fh: FileHandle, length: number, readOnly: boolean) {
    this.#fh = fh;
    this.#length = length;
    this.#readOnly = readOnly;
  }

  /** Opens `path`; `create` makes or empties it. */
  static async open(path: string, opts: { create?: boolean; readOnly?: boolean } = {}): Promise<TestFileIO> {
    const flags = opts.create ? 'w+' : opts.readOnly ? 'r' : 'r+';
    const fh = await open(path, flags);
    const st = await fh.stat();
    return new TestFileIO(fh, st.size, opts.readOnly ?? false);
  }

  get length(): number {
    return this.#length;
  }

  #handle(): FileHandle {
    if (!this.#fh) throw new ShearError('ERR_INVALID_ARGUMENT', 'Cannot use test file: it is closed');
    return this.#fh;
  }

  async read(offset: number, buf: Uint8Array): Promise<void> {
    const fh = this.#handle();
    let done = 0;
    while (done < buf.length) {
      const { bytesRead } = await fh.read(buf, done, buf.length - done, offset + done);
      if (bytesRead === 0) {
        buf.fill(0, done);
        return;
      }
      done += bytesRead;
    }
  }

  async write(offset: number, buf: Uint8Array, opts?: WriteOptions): Promise<void> {
    const fh = this.#handle();
    if (this.#readOnly) throw new ShearError('ERR_INVALID_ARGUMENT', 'Cannot write test file: it is read-only');
    let done = 0;
    while (done < buf.length) {
      const { bytesWritten } = await fh.write(buf, done, buf.length - done, offset + done);
      done += bytesWritten;
    }
    this.#length = Math.max(this.#length, offset + buf.length);
    if (opts?.fua) await fh.datasync();
  }

  async writeZeroes(offset: number, bytes: number, opts?: WriteZeroesOptions): Promise<void> {
    if (opts?.fastOnly) throw new ShearError('ERR_NOT_IMPLEMENTED', 'Cannot write zeroes fast to test file: not supported');
    await this.write(offset, new Uint8Array(bytes), opts);
  }

  async discard(_offset: number, _bytes: number): Promise<void> {
    // A hint: the test file keeps the bytes.
  }

  async flush(): Promise<void> {
    await this.#handle().datasync();
  }

  async blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    assertRange(offset, bytes, this.#length);
    return [{ offset, bytes, data: true, zero: false, allocated: true }];
  }

  /** fd extents, as the file driver's host mapping gives them (for the worker-thread path). */
  async mapRead(offset: number, bytes: number): Promise<HostExtent[]> {
    assertRange(offset, bytes, this.#length, 'mapped range');
    return bytes === 0 ? [] : [{ kind: 'fd', fd: this.#handle().fd, hostOffset: offset, bytes }];
  }

  async mapWrite(offset: number, bytes: number): Promise<WriteMapping> {
    return { extents: await this.mapRead(offset, bytes), commit: async () => {}, abort: async () => {} };
  }

  async truncate(length: number): Promise<void> {
    await this.#handle().truncate(length);
    this.#length = length;
  }

  async close(): Promise<void> {
    const fh = this.#fh;
    this.#fh = null;
    await fh?.close();
  }
}

/**
 * Opens a qcow2 image file for tests, resolving backing files relative to the image's folder:
 * raw backing files become TestFileIO, qcow2 ones read-only Qcow2Image (recursively).
 */
export async function openTestImage(path: string, opts: Omit<Qcow2OpenOptions, 'openBacking'> = {}): Promise<Qcow2Image> {
  const file = await TestFileIO.open(path, { readOnly: opts.readOnly ?? false });
  return Qcow2Image.open(file, { ...opts, openBacking: backingOpener(dirname(path)) });
}

export function backingOpener(dir: string): (name: string, format: string | null) => Promise<BlockIO> {
  return async (name, format) => {
    const path = isAbsolute(name) ? name : join(dir, name);
    if (format === 'qcow2') return openTestImage(path, { readOnly: true });
    if (format === 'raw' || format === null) return TestFileIO.open(path, { readOnly: true });
    throw new ShearError('ERR_NOT_IMPLEMENTED', `Cannot open backing file '${name}': format '${format}' is not supported in tests`);
  };
}
