import {
  COMMAND_NAMES,
  MAX_PAYLOAD_BYTES,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_ENOSPC,
  NBD_EPERM,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
} from '../protocol/constants.js';
import type { RequestHeader } from '../protocol/transmission.js';

export interface RequestContext {
  /** Export size in bytes, as told to the client. */
  size: number;
  /** The transmission flags the client was given. */
  transmissionFlags: number;
  structured: boolean;
  /** Metadata contexts selected for this connection. */
  contextCount: number;
}

/** A refusal: the error value to send and a short message for people. */
export interface RequestRefusal {
  error: number;
  message: string;
}

/** Flags each command accepts (FUA is accepted on every command, as QEMU does). */
function allowedFlags(type: number, tflags: number): number {
  switch (type) {
    case NBD_CMD_READ:
      return NBD_CMD_FLAG_FUA | ((tflags & NBD_FLAG_SEND_DF) !== 0 ? NBD_CMD_FLAG_DF : 0);
    case NBD_CMD_WRITE_ZEROES:
      return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | ((tflags & NBD_FLAG_SEND_FAST_ZERO) !== 0 ? NBD_CMD_FLAG_FAST_ZERO : 0);
    case NBD_CMD_BLOCK_STATUS:
      return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE;
    default:
      return NBD_CMD_FLAG_FUA;
  }
}

/**
 * Everything that can be said about a request from its header alone: unknown commands and
 * flags, read-only exports, bounds (in 64-bit arithmetic), oversize reads, zero-length block
 * status, block status without contexts. Null when the request may run.
 *
 * DISC never reaches this (it has no reply), and a WRITE over the maximum payload is refused
 * before its payload is read (the connection then closes).
 */
export function checkRequest(req: RequestHeader, ctx: RequestContext): RequestRefusal | null {
  const name = COMMAND_NAMES[req.type];
  if (name === undefined || req.type === NBD_CMD_DISC) return { error: NBD_EINVAL, message: `invalid request type (${req.type}) received` };
  const bad = req.flags & ~allowedFlags(req.type, ctx.transmissionFlags);
  if (bad !== 0) return { error: NBD_EINVAL, message: `unsupported flags for command ${name} (got 0x${req.flags.toString(16)})` };
  const writes = req.type === NBD_CMD_WRITE || req.type === NBD_CMD_WRITE_ZEROES || req.type === NBD_CMD_TRIM;
  if (writes && (ctx.transmissionFlags & NBD_FLAG_READ_ONLY) !== 0) return { error: NBD_EPERM, message: 'export is read-only' };
  if (req.type === NBD_CMD_FLUSH) return null;
  const size = BigInt(ctx.size);
  if (req.offset > size || BigInt(req.length) > size - req.offset) {
    const past = `operation past EOF (offset ${req.offset}, length ${req.length}, size ${ctx.size})`;
    return { error: req.type === NBD_CMD_WRITE || req.type === NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL, message: past };
  }
  if (req.type === NBD_CMD_READ && req.length > MAX_PAYLOAD_BYTES) {
    return { error: NBD_EINVAL, message: `length ${req.length} is larger than the maximum payload ${MAX_PAYLOAD_BYTES}` };
  }
  if (req.type === NBD_CMD_BLOCK_STATUS) {
    if (!ctx.structured || ctx.contextCount === 0) return { error: NBD_EINVAL, message: 'block status was not negotiated (no metadata context selected)' };
    if (req.length === 0) return { error: NBD_EINVAL, message: 'block status needs a non-zero length' };
  }
  return null;
}

/** Whether a request changes data (takes a write slot in the arrival order). */
export function isWriteCommand(type: number): boolean {
  return type === NBD_CMD_WRITE || type === NBD_CMD_WRITE_ZEROES || type === NBD_CMD_TRIM;
}

/** Whether a request is ordered against overlapping writes. */
export function isOrderedCommand(type: number): boolean {
  return isWriteCommand(type) || type === NBD_CMD_READ || type === NBD_CMD_BLOCK_STATUS;
}
