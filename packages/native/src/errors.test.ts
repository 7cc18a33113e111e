import t from 'tap';
import { ShearError } from '@shear/base';
import { codeForErrno, errnoName, ioError } from './errors.js';

t.test('errno names map to the codes callers branch on', async (t) => {
  t.equal(codeForErrno('ENOSPC'), 'ERR_NO_SPACE');
  t.equal(codeForErrno('EDQUOT'), 'ERR_NO_SPACE');
  for (const name of ['EOPNOTSUPP', 'ENOTSUP', 'ENOSYS', 'EXDEV']) t.equal(codeForErrno(name), 'ERR_IO_UNSUPPORTED', name);
  for (const name of ['EACCES', 'EPERM', 'EROFS']) t.equal(codeForErrno(name), 'ERR_PERMISSION_DENIED', name);
  t.equal(codeForErrno('ENOENT'), 'ERR_FILE_NOT_FOUND');
  t.equal(codeForErrno('EIO'), 'ERR_IO');
  t.equal(codeForErrno('EBADF'), 'ERR_IO');
});

t.test('errnoName reads Node fs errors and addon errors', async (t) => {
  t.equal(errnoName(Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC', errno: -28 })), 'ENOSPC');
  t.equal(errnoName(Object.assign(new Error('No space left on device'), { errno: 28, syscall: 'fallocate' })), 'ENOSPC');
  t.equal(errnoName(new TypeError('Expected a number')), undefined);
  t.equal(errnoName(Object.assign(new Error('x'), { code: 'ERR_INVALID_ARG_TYPE' })), undefined, 'Node argument errors are not system errors');
  t.equal(errnoName(undefined), undefined);
});

t.test('ioError builds the message, keeps the cause, passes ShearErrors through', async (t) => {
  const cause = Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC', errno: -28, syscall: 'write' });
  const err = ioError(cause, "write (0, 10) to 'a.img'", { offset: 0, bytes: 10, path: 'a.img' });
  t.equal(err.code, 'ERR_NO_SPACE');
  t.equal(err.kind, 'no-space');
  t.equal(err.message, "Cannot write (0, 10) to 'a.img': ENOSPC (no space left on device, write)");
  t.same(err.context, { offset: 0, bytes: 10, path: 'a.img', errno: 'ENOSPC' });
  t.equal(err.cause, cause);
  const shear = new ShearError('ERR_READ_ONLY', 'Cannot write: read-only');
  t.equal(ioError(shear, 'x'), shear);
  const bug = ioError(new TypeError('oops'), 'seek');
  t.equal(bug.code, 'ERR_INTERNAL');
  t.equal(bug.context.errno, undefined);
});
