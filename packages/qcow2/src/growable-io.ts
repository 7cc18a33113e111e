import type { BlockIO } from '@shear/block';

/**
 * The protocol child of a qcow2 image: a byte store whose length the image changes. qcow2
 * appends clusters, so before it writes past `length` it calls `truncate` to extend the store
 * (with zeroes, sparsely where the store can), and `length` reports the new size at once.
 * Reads and writes inside `length` follow the BlockIO contract; the image never relies on
 * reads or writes past `length`.
 */
export interface GrowableIO extends BlockIO {
  /** Sets the length in bytes; growing adds zeroes, shrinking drops the tail. */
  truncate(length: number): Promise<void>;
}
