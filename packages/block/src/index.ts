export type { BlockIO, BlockStatusExtent, WriteOptions, WriteZeroesOptions } from './io.js';
export {
  PERM_CONSISTENT_READ,
  PERM_WRITE,
  PERM_WRITE_UNCHANGED,
  PERM_RESIZE,
  PERM_ALL,
  permNames,
  filterChildPerms,
  storageChildPerms,
  backingChildPerms,
  formatChildPerms,
  type PermPair,
  type ChildPermsFn,
} from './permissions.js';
export { BlockNode, ChildEdge, parentName, type BlockUser, type Parent, type DriverInfo } from './node.js';
export { BlockGraph, type AddNodeSpec, type ChildSpec } from './graph.js';
export { checkNodeName, MAX_NODE_NAME_CHARS } from './node-name.js';
export { MemoryDriver, type MemoryDriverOptions } from './drivers/memory.js';
export { NullDriver } from './drivers/null.js';
export { FileDriver, type FileDriverOptions } from './drivers/file.js';
