import { getSystemErrorName } from 'node:util';
import { ShearError, type ErrorCode, type ErrorContext } from '@shear/base';

/** errno names meaning "this file system or kernel cannot do that": callers fall back. */
const UNSUPPORTED_ERRNOS = new Set(['EOPNOTSUPP', 'ENOTSUP', 'ENOSYS', 'EXDEV']);
const PERMISSION_ERRNOS = new Set(['EACCES', 'EPERM', 'EROFS']);
const NO_SPACE_ERRNOS = new Set(['ENOSPC', 'EDQUOT']);

/**
 * The errno name ('ENOENT') of a system error: Node's fs errors carry it as `code`, the addon's
 * errors carry a positive `errno` number. Undefined when the error is not a system error.
 */
export function errnoName(err: unknown): string | undefined {
  if (typeof err !== 'object' || err === null) return undefined;
  const { code, errno, syscall } = err as { code?: unknown; errno?: unknown; syscall?: unknown };
  if (typeof code === 'string' && /^E[A-Z0-9]+$/.test(code)) return code;
  if (typeof errno === 'number' && Number.isInteger(errno) && errno !== 0 && typeof syscall === 'string') {
    try {
      return getSystemErrorName(-Math.abs(errno));
    } catch {
      return undefined;
    }
  }
  return undefined;
}

/** The Shear code for an errno name: the kind callers branch on (fall back, report no space, ...). */
export function codeForErrno(name: string): ErrorCode {
  if (UNSUPPORTED_ERRNOS.has(name)) return 'ERR_IO_UNSUPPORTED';
  if (NO_SPACE_ERRNOS.has(name)) return 'ERR_NO_SPACE';
  if (PERMISSION_ERRNOS.has(name)) return 'ERR_PERMISSION_DENIED';
  if (name === 'ENOENT') return 'ERR_FILE_NOT_FOUND';
  return 'ERR_IO';
}

/**
 * Wraps a failed system call as a ShearError: "Cannot <action>: <ERRNO> (<text>)", the errno name
 * in context.errno, the original error as cause. A ShearError passes through unchanged; an
 * error that is not a system error (a bug) becomes ERR_INTERNAL.
 */
export function ioError(cause: unknown, action: string, context: ErrorContext = {}): ShearError {
  if (cause instanceof ShearError) return cause;
  const name = errnoName(cause);
  const text = describe(cause, name);
  if (name === undefined) return new ShearError('ERR_INTERNAL', `Cannot ${action}: ${text}`, context, { cause });
  return new ShearError(codeForErrno(name), `Cannot ${action}: ${name} (${text})`, { ...context, errno: name }, { cause });
}

/** The human part of a system error's message, without Node's "ENOENT: " prefix. */
function describe(cause: unknown, name: string | undefined): string {
  const message = cause instanceof Error ? cause.message : String(cause);
  if (name !== undefined && message.startsWith(`${name}: `)) return message.slice(name.length + 2);
  return message;
}

/** How an error of copyFileRange names what it failed to do, in the addon and the fallback alike. */
export function copyAction(fdIn: number, offsetIn: number, fdOut: number, offsetOut: number, bytes: number): string {
  return `copy (${offsetIn}, ${bytes}) of fd ${fdIn} to offset ${offsetOut} of fd ${fdOut}`;
}
