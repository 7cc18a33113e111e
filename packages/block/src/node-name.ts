import { ShearError } from '@shear/base';

/** QEMU keeps node names in a 32-byte field: at most 31 characters. */
export const MAX_NODE_NAME_CHARS = 31;

/**
 * QEMU's id_wellformed: a letter first, then letters, digits, '-', '.' or '_'. Names Shear
 * generates start with '#', which no user name can, so the two never collide.
 * @throws ERR_BLOCK_NODE_NAME
 */
export function checkNodeName(name: string, what = 'node-name'): void {
  if (typeof name !== 'string' || !/^[A-Za-z][A-Za-z0-9._-]*$/.test(name)) {
    throw new ShearError('ERR_BLOCK_NODE_NAME', `Invalid ${what} "${name}": it must start with a letter and contain only letters, digits, '-', '.' and '_'`);
  }
  if (name.length > MAX_NODE_NAME_CHARS) {
    throw new ShearError('ERR_BLOCK_NODE_NAME', `Invalid ${what} "${name}": it is longer than ${MAX_NODE_NAME_CHARS} characters`);
  }
}
