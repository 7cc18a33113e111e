export type { BlockIO, BlockStatusExtent, WriteOptions, WriteZeroesOptions } from './io.js';
export { isHostMappable, type HostExtent, type HostMappable, type WriteMapping } from './host-mapping.js';
export {
  hasHostFile,
  isResizable,
  hasHostMappingSource,
  hasPersistentBitmapStore,
  isSnapshotSource,
  isPointInTimeView,
  isBoundedCache,
  type HostFile,
  type Resizable,
  type HostMappingSource,
  type PersistentBitmapStore,
  type StoredBitmapRecord,
  type BitmapRecordToStore,
  type SnapshotSource,
  type PointInTimeView,
  type BoundedCache,
} from './capabilities.js';
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
export { FileDriver, ZERO_CHUNK_BYTES, BOUNCE_CHUNK_BYTES, BLOCK_STATUS_MAX_EXTENTS, DEFAULT_DIRECT_ALIGNMENT_BYTES, type FileDriverOptions } from './drivers/file.js';
export { NullDriver, NULL_DEFAULT_LENGTH_BYTES, type NullDriverOptions } from './drivers/null.js';
export { MemoryDriver, DEFAULT_MEMORY_CHUNK_BYTES, type MemoryDriverOptions } from './drivers/memory.js';
export { BlkdebugDriver, BLKDEBUG_CHILD_PERMISSIONS, type BlkdebugOptions, type BlkdebugChildPermission } from './drivers/blkdebug.js';
export {
  BlkdebugRuleEngine,
  BLKDEBUG_EVENTS,
  BLKDEBUG_IO_TYPES,
  BLKDEBUG_DEFAULT_IO_TYPES,
  BLKDEBUG_SECTOR_BYTES,
  type BlkdebugEvent,
  type BlkdebugIOType,
  type BlkdebugInjectErrorOptions,
  type BlkdebugSetStateOptions,
  type BlkdebugRule,
  type BlkdebugInjectErrorRule,
  type BlkdebugSetStateRule,
} from './drivers/blkdebug-rules.js';
export { RawFormatDriver, RAW_SIZE_ALIGNMENT_BYTES, type RawFormatOptions } from './drivers/raw-format.js';
export { compareContent, COMPARE_CHUNK_BYTES } from './compare.js';
