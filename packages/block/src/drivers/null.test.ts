import t from 'tap';
import { performance } from 'node:perf_hooks';
import { NULL_DEFAULT_LENGTH_BYTES, NullDriver } from './null.js';
import { runBlockIOConformance } from '@shear/testkit';

void runBlockIOConformance(t, 'null-co', {
  open: async (_t, length) => new NullDriver({ length }),
  persistsData: false,
});

t.test('read-zeroes (default) fills buffers with zeroes; without it buffers are left alone', async (t) => {
  const zeroes = new NullDriver({ length: 4096 });
  t.equal(zeroes.readZeroes, true);
  const buf = new Uint8Array(100).fill(7);
  await zeroes.write(0, buf);
  await zeroes.read(0, buf);
  t.equal(buf.findIndex((b) => b !== 0), -1);
  t.same(await zeroes.blockStatus(10, 100), [{ offset: 10, bytes: 100, data: false, zero: true, allocated: true }]);

  const garbage = new NullDriver({ length: 4096, readZeroes: false });
  buf.fill(7);
  await garbage.read(0, buf);
  t.equal(buf.findIndex((b) => b !== 7), -1, 'buffer unchanged, as QEMU with read-zeroes=off');
  t.same(await garbage.blockStatus(0, 4096), [{ offset: 0, bytes: 4096, data: false, zero: false, allocated: true }]);
  await zeroes.close();
  await garbage.close();
});

t.test('length defaults to QEMU size default; latency-ns delays each request', async (t) => {
  t.equal(new NullDriver().length, NULL_DEFAULT_LENGTH_BYTES);
  const io = new NullDriver({ length: 4096, latencyNs: 20_000_000 });
  const start = performance.now();
  await io.read(0, new Uint8Array(1));
  t.ok(performance.now() - start >= 18, 'at least the latency (timers never fire much early)');
  t.throws(() => new NullDriver({ latencyNs: -1 }), { code: 'ERR_INVALID_ARGUMENT' });
  t.throws(() => new NullDriver({ length: -5 }), { code: 'ERR_INVALID_ARGUMENT' });
});
