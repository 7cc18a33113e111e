/**
 * Numbers of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md). Everything on the wire is
 * big-endian. 64-bit magics are BigInt; everything else fits a JS number.
 */

// ---- magics ----
export const NBD_INIT_MAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const NBD_OPTS_MAGIC = 0x49484156454f5054n; // "IHAVEOPT"
export const NBD_REP_MAGIC = 0x0003e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// ---- handshake ----
export const NBD_FLAG_FIXED_NEWSTYLE = 1;
export const NBD_FLAG_NO_ZEROES = 2;
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1;
export const NBD_FLAG_C_NO_ZEROES = 2;
export const NBD_KNOWN_CLIENT_FLAGS = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

export const GREETING_BYTES = 18;
export const CLIENT_FLAGS_BYTES = 4;
export const OPTION_HEADER_BYTES = 16;
export const OPTION_REPLY_HEADER_BYTES = 20;
/** Size and flags after NBD_OPT_EXPORT_NAME, and the zero padding old clients expect. */
export const EXPORT_NAME_REPLY_BYTES = 10;
export const EXPORT_NAME_PADDING_BYTES = 124;

export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_PEEK_EXPORT = 4;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const NBD_OPT_EXTENDED_HEADERS = 11;

export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
const ERR = 0x80000000;
export const NBD_REP_FLAG_ERROR = ERR;
export const NBD_REP_ERR_UNSUP = ERR + 1;
export const NBD_REP_ERR_POLICY = ERR + 2;
export const NBD_REP_ERR_INVALID = ERR + 3;
export const NBD_REP_ERR_PLATFORM = ERR + 4;
export const NBD_REP_ERR_TLS_REQD = ERR + 5;
export const NBD_REP_ERR_UNKNOWN = ERR + 6;
export const NBD_REP_ERR_SHUTDOWN = ERR + 7;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = ERR + 8;
export const NBD_REP_ERR_TOO_BIG = ERR + 9;

export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// ---- transmission flags (per export, u16) ----
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

// ---- requests ----
export const REQUEST_HEADER_BYTES = 28;
export const SIMPLE_REPLY_HEADER_BYTES = 16;
export const STRUCTURED_REPLY_HEADER_BYTES = 20;

export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;

export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

export const COMMAND_NAMES: Readonly<Record<number, string>> = {
  [NBD_CMD_READ]: 'read',
  [NBD_CMD_WRITE]: 'write',
  [NBD_CMD_DISC]: 'disconnect',
  [NBD_CMD_FLUSH]: 'flush',
  [NBD_CMD_TRIM]: 'trim',
  [NBD_CMD_CACHE]: 'cache',
  [NBD_CMD_WRITE_ZEROES]: 'write zeroes',
  [NBD_CMD_BLOCK_STATUS]: 'block status',
};

// ---- structured reply chunks ----
export const NBD_REPLY_FLAG_DONE = 1;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_ERROR = 0x8001;
export const NBD_REPLY_TYPE_ERROR_OFFSET = 0x8002;
export const NBD_REPLY_TYPE_FLAG_ERROR = 0x8000;

// ---- NBD errno values (the wire's own numbering, not the host's) ----
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

// ---- metadata contexts ----
export const BASE_ALLOCATION = 'base:allocation';
export const QEMU_ALLOCATION_DEPTH = 'qemu:allocation-depth';
export const QEMU_DIRTY_BITMAP_PREFIX = 'qemu:dirty-bitmap:';
/** base:allocation flags. */
export const NBD_STATE_HOLE = 1;
export const NBD_STATE_ZERO = 2;
/** qemu:dirty-bitmap flag. */
export const NBD_STATE_DIRTY = 1;

// ---- limits ----
/** Strings (names, messages) MUST NOT exceed this (spec). */
export const MAX_STRING_BYTES = 4096;
/** Error messages we send are kept short: QEMU's client rejects long non-data payloads. */
export const MAX_ERROR_MESSAGE_BYTES = 256;
/** Largest READ/WRITE payload we advertise and accept, as qemu-nbd does (32 MiB). */
export const MAX_PAYLOAD_BYTES = 32 * 1024 * 1024;
export const PREFERRED_BLOCK_BYTES = 4096;
export const MIN_BLOCK_BYTES = 1;
/** An option payload above this closes the connection (QEMU caps at 32 MiB, nbdkit lower). */
export const MAX_OPTION_BYTES = 1024 * 1024;
/** Extents per BLOCK_STATUS chunk (QEMU's cap: 1 MiB of extent descriptors). */
export const MAX_BLOCK_STATUS_EXTENTS = 131072;
/** Largest non-data chunk payload a reply decoder accepts (block status of MAX extents + id). */
export const MAX_METADATA_CHUNK_BYTES = 4 + 8 * (1 << 20);
