/**
 * The one registry of error codes. A code is stable: scripts and tests branch on it, so a
 * code is never renamed or reused for another condition. `docs/errors.md` documents each
 * one, and a test keeps the two in step.
 */
export const ERROR_CODES = {
  ERR_INVALID_ARGUMENT: 'invalid-argument',
  ERR_OUT_OF_BOUNDS: 'out-of-bounds',
  ERR_ABORTED: 'cancelled',
  ERR_TIMEOUT: 'timeout',
  ERR_NOT_IMPLEMENTED: 'unsupported',
  ERR_INTERNAL: 'internal',

  ERR_BITMAP_GRANULARITY: 'invalid-argument',
  ERR_BITMAP_SIZE_MISMATCH: 'invalid-argument',
  ERR_BITMAP_CORRUPT: 'corrupt',
  ERR_BITMAP_NOT_FOUND: 'not-found',
  ERR_BITMAP_EXISTS: 'invalid-argument',
  ERR_BITMAP_NAME: 'invalid-argument',
  ERR_BITMAP_BUSY: 'busy',
  ERR_BITMAP_READONLY: 'permission',
  ERR_BITMAP_INCONSISTENT: 'corrupt',
  ERR_BITMAP_NO_SUCCESSOR: 'invalid-argument',
  ERR_BITMAP_SYNC_MODE: 'invalid-argument',
  ERR_BITMAP_HAS_SUCCESSOR: 'busy',

  ERR_REQLIST_CONFLICT: 'busy',

  ERR_BLOCK_NODE_NAME: 'invalid-argument',
  ERR_BLOCK_NODE_EXISTS: 'invalid-argument',
  ERR_BLOCK_NODE_NOT_FOUND: 'not-found',
  ERR_BLOCK_NODE_IN_USE: 'busy',
  ERR_BLOCK_PERMISSION_CONFLICT: 'permission',
  ERR_BLOCK_PERMISSION_MISSING: 'internal',
  ERR_BLOCK_GRAPH: 'invalid-argument',

  ERR_COPY_READ_FAILED: 'io',
  ERR_COPY_WRITE_FAILED: 'io',
  ERR_COPY_WORKER_DIED: 'io',

  ERR_CBW_FAILED: 'io',
  ERR_SNAPSHOT_BROKEN: 'io',
  ERR_SNAPSHOT_DISCARDED: 'invalid-argument',

  ERR_JOB_NOT_FOUND: 'not-found',
  ERR_JOB_ID: 'invalid-argument',
  ERR_JOB_VERB_NOT_ALLOWED: 'invalid-argument',
  ERR_JOB_FAILED: 'io',

  ERR_QCOW2_CORRUPT: 'corrupt',
  ERR_QCOW2_UNKNOWN_FEATURE: 'unsupported',
  ERR_QCOW2_NEEDS_REPAIR: 'corrupt',
  ERR_QCOW2_READ_ONLY: 'permission',
  ERR_QCOW2_CLOSED: 'invalid-argument',

  ERR_IO: 'io',
  ERR_NO_SPACE: 'no-space',
  ERR_IO_UNSUPPORTED: 'unsupported',
  ERR_FILE_NOT_FOUND: 'not-found',
  ERR_PERMISSION_DENIED: 'permission',
  ERR_READ_ONLY: 'permission',
  ERR_CLOSED: 'invalid-argument',

  ERR_QMP_COMMAND_NOT_FOUND: 'not-found',
  ERR_QMP_COMMAND_EXISTS: 'invalid-argument',
  ERR_QMP_SOCKET_IN_USE: 'busy',
  ERR_QMP_ERROR_REPLY: 'io',
  ERR_QMP_DISCONNECTED: 'io',
  ERR_QMP_PROTOCOL: 'io',

  ERR_NBD_PROTOCOL: 'io',
  ERR_NBD_DISCONNECTED: 'io',
  ERR_NBD_EXPORT_NOT_FOUND: 'not-found',
  ERR_NBD_EXPORT_EXISTS: 'invalid-argument',
  ERR_NBD_EXPORT_IN_USE: 'busy',
  ERR_NBD_ADDRESS: 'permission',

  ERR_MANIFEST_NOT_FOUND: 'not-found',
  ERR_MANIFEST_INVALID: 'corrupt',
  ERR_BACKING_MISMATCH: 'invalid-argument',
  ERR_PULL_STATE_MISMATCH: 'invalid-argument',

  ERR_CHAIN_LINK_MISSING: 'not-found',
  ERR_CHAIN_BROKEN: 'corrupt',
  ERR_CHAIN_UNFINISHED: 'corrupt',
  ERR_VERIFY_MISMATCH: 'corrupt',
} as const;

export type ErrorCode = keyof typeof ERROR_CODES;

/** What a caller branches on. Protocol layers map kinds to QMP classes, NBD errnos, exit codes. */
export type ErrorKind =
  | 'io'
  | 'invalid-argument'
  | 'not-found'
  | 'busy'
  | 'permission'
  | 'unsupported'
  | 'corrupt'
  | 'out-of-bounds'
  | 'no-space'
  | 'cancelled'
  | 'timeout'
  | 'internal';

export function kindOf(code: ErrorCode): ErrorKind {
  return ERROR_CODES[code];
}
