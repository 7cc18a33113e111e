import { ShearError } from '@shear/base';
import type { Allocator } from './allocator.js';
import type { Qcow2Metadata } from './metadata.js';
import type { Refcounts } from './refcounts.js';

/**
 * The check every entry point of an image starts with: is it still open, and (for changes)
 * writable. Shared by the image and its collaborators so that each reports the same errors.
 */
export class ImageGuard {
  readonly #md: Qcow2Metadata;
  #open = true;

  constructor(md: Qcow2Metadata) {
    this.#md = md;
  }

  checkOpen(op: string): void {
    if (!this.#open) throw new ShearError('ERR_QCOW2_CLOSED', `Cannot ${op} qcow2 image: it is closed`, { op });
  }

  checkWritable(op: string): { rc: Refcounts; alloc: Allocator } {
    this.checkOpen(op);
    return this.#md.writable(op);
  }

  /** Refuses every request from now on (the image is closing). */
  shut(): void {
    this.#open = false;
  }
}
