/**
 * QEMU reports a job that failed with an errno as strerror's text (job_update_rc), and scripts
 * compare it ("Input/output error"). glibc's texts for the errnos a copy meets; Node's own
 * (libuv's) differ in wording and case.
 */
const GLIBC_STRERROR: Record<string, string> = {
  EIO: 'Input/output error',
  ENOSPC: 'No space left on device',
  EDQUOT: 'Disk quota exceeded',
  EACCES: 'Permission denied',
  EPERM: 'Operation not permitted',
  EROFS: 'Read-only file system',
  EINVAL: 'Invalid argument',
  ENOTSUP: 'Operation not supported',
  EOPNOTSUPP: 'Operation not supported',
  ENOMEM: 'Cannot allocate memory',
  EFBIG: 'File too large',
  ENOENT: 'No such file or directory',
  ECANCELED: 'Operation canceled',
  ETIMEDOUT: 'Connection timed out',
  ECONNRESET: 'Connection reset by peer',
  EPIPE: 'Broken pipe',
  ESHUTDOWN: 'Cannot send after transport endpoint shutdown',
};

/** The errno name behind an error: its context, or a system error somewhere in its causes. */
function errnoOf(err: unknown): string | undefined {
  for (let e: unknown = err, depth = 0; e && depth < 8; e = (e as { cause?: unknown }).cause, depth++) {
    const ctx = (e as { context?: { errno?: unknown } }).context;
    if (typeof ctx?.errno === 'string') return ctx.errno;
    const code = (e as { code?: unknown }).code;
    if (typeof code === 'string' && /^E[A-Z0-9]+$/.test(code) && !code.startsWith('ERR')) return code;
  }
  return undefined;
}

/** A failed job's `error` as QEMU words it: strerror's text when an errno caused it. */
export function jobErrorText(err: Error | undefined): string {
  if (!err) return 'Job failed';
  const errno = errnoOf(err);
  return (errno && GLIBC_STRERROR[errno]) ?? err.message;
}
