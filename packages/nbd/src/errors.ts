import { ShearError, isShearError, type ErrorCode, type ErrorKind } from '@shear/base';
import { NBD_EINVAL, NBD_EIO, NBD_ENOMEM, NBD_ENOSPC, NBD_ENOTSUP, NBD_EOVERFLOW, NBD_EPERM, NBD_ESHUTDOWN } from './protocol/constants.js';

/**
 * The one table between Shear's errors and NBD's error values, both directions.
 *
 * Server side (a node's failure → the error value on the wire): the OS-style `context.errno`
 * of a ShearError wins when it names an NBD error (the snapshot view says EPERM for writes and
 * EINVAL for discarded clusters); otherwise the error's kind decides.
 *
 * Client side (an error value from a remote server → a ShearError): one code per value, with
 * the errno kept in the context, so callers can branch on kinds as for local nodes.
 */

export const NBD_ERRNO_NAMES: Readonly<Record<number, string>> = {
  [NBD_EPERM]: 'EPERM',
  [NBD_EIO]: 'EIO',
  [NBD_ENOMEM]: 'ENOMEM',
  [NBD_EINVAL]: 'EINVAL',
  [NBD_ENOSPC]: 'ENOSPC',
  [NBD_EOVERFLOW]: 'EOVERFLOW',
  [NBD_ENOTSUP]: 'ENOTSUP',
  [NBD_ESHUTDOWN]: 'ESHUTDOWN',
};

/** Host errno names (as in ShearError context.errno and Node's err.code) → NBD error value. */
const ERRNO_TO_NBD: Readonly<Record<string, number>> = {
  EPERM: NBD_EPERM,
  EACCES: NBD_EPERM,
  EROFS: NBD_EPERM,
  EIO: NBD_EIO,
  ENOMEM: NBD_ENOMEM,
  EINVAL: NBD_EINVAL,
  ENOSPC: NBD_ENOSPC,
  EDQUOT: NBD_ENOSPC,
  EFBIG: NBD_ENOSPC,
  EOVERFLOW: NBD_EOVERFLOW,
  ENOTSUP: NBD_ENOTSUP,
  EOPNOTSUPP: NBD_ENOTSUP,
  ESHUTDOWN: NBD_ESHUTDOWN,
};

/** ShearError kind → NBD error value, when no errno says otherwise. */
const KIND_TO_NBD: Readonly<Record<ErrorKind, number>> = {
  io: NBD_EIO,
  'invalid-argument': NBD_EINVAL,
  'not-found': NBD_EINVAL,
  busy: NBD_EIO,
  permission: NBD_EPERM,
  // ENOTSUP is reserved for FAST_ZERO refusals (spec); see nbdErrorFor.
  unsupported: NBD_EINVAL,
  corrupt: NBD_EIO,
  'out-of-bounds': NBD_EINVAL,
  'no-space': NBD_ENOSPC,
  cancelled: NBD_ESHUTDOWN,
  timeout: NBD_EIO,
  internal: NBD_EIO,
};

/**
 * The NBD error value for a failure of a request. `fastZero`: the request carried FAST_ZERO,
 * the only case in which the spec lets a server answer ENOTSUP.
 */
export function nbdErrorFor(err: unknown, opts: { fastZero?: boolean } = {}): number {
  let value = NBD_EIO;
  if (isShearError(err)) {
    const errno = err.context.errno;
    value = (errno !== undefined ? ERRNO_TO_NBD[errno] : undefined) ?? KIND_TO_NBD[err.kind];
  } else if (err && typeof err === 'object' && typeof (err as { code?: unknown }).code === 'string') {
    value = ERRNO_TO_NBD[(err as { code: string }).code] ?? NBD_EIO;
  }
  if (opts.fastZero && isShearError(err) && err.kind === 'unsupported') return NBD_ENOTSUP;
  if (value === NBD_ENOTSUP && !opts.fastZero) return NBD_EINVAL;
  return value;
}

/** NBD error value (from a remote server) → the ShearError code the client driver throws. */
const NBD_TO_CODE: Readonly<Record<number, ErrorCode>> = {
  [NBD_EPERM]: 'ERR_PERMISSION_DENIED',
  [NBD_EIO]: 'ERR_IO',
  [NBD_ENOMEM]: 'ERR_IO',
  [NBD_EINVAL]: 'ERR_INVALID_ARGUMENT',
  [NBD_ENOSPC]: 'ERR_NO_SPACE',
  [NBD_EOVERFLOW]: 'ERR_INVALID_ARGUMENT',
  [NBD_ENOTSUP]: 'ERR_NOT_IMPLEMENTED',
  [NBD_ESHUTDOWN]: 'ERR_NBD_DISCONNECTED',
};

export function errorFromNbd(value: number, message: string, context: { op: string; offset?: number; bytes?: number }): ShearError {
  const name = NBD_ERRNO_NAMES[value];
  // Unknown values are treated as EINVAL, as the spec asks of clients.
  const code = NBD_TO_CODE[value] ?? 'ERR_INVALID_ARGUMENT';
  const why = message !== '' ? message : `the server answered ${name ?? `error ${value}`}`;
  return new ShearError(code, `Cannot ${context.op} over NBD: ${why}`, { ...context, errno: name ?? 'EINVAL' });
}
