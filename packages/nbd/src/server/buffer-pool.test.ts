import t from 'tap';
import { BufferPool } from './buffer-pool.js';

t.test('buffers are reused by size class, exactly as long as asked, and the idle total is bounded', async (t) => {
  const pool = new BufferPool(3 * 65536);
  const a = pool.acquire(65536);
  t.equal(a.length, 65536);
  a[0] = 7;
  pool.release(a);
  t.equal(pool.idleBytes, 65536);
  const b = pool.acquire(40000);
  t.equal(b.length, 40000, 'a smaller request gets a view of the right length');
  t.equal(b.buffer, a.buffer, 'on the buffer given back');
  t.equal(pool.idleBytes, 0);
  const c = pool.acquire(65536);
  t.not(c.buffer, a.buffer, 'a buffer in use is never handed out twice');
  pool.release(Buffer.alloc(65536));
  t.equal(pool.idleBytes, 0, 'foreign buffers are never taken in');
  for (const x of [b, c, pool.acquire(65536), pool.acquire(65536)]) pool.release(x);
  t.equal(pool.idleBytes, 3 * 65536, 'beyond the bound, released buffers are dropped');
  t.equal(pool.acquire(1).length, 1);
});
