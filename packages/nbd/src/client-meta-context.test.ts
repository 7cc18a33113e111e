import t from 'tap';
import { join } from 'node:path';
import { requireTools } from '@shear/testkit';
import { NbdClientDriver } from './client/driver.js';
import { shortDir } from './setup.fixture.js';
import { runOk, startDaemon } from './tools.fixture.js';

/**
 * The client's extra meta contexts and multi-conn flag against qemu-nbd 7.2 (the oracle for
 * qemu:dirty-bitmap): a persistent bitmap that qemu-io's writes set is read back extent by
 * extent, base:allocation still answers on the same connection, and a context the server does
 * not have is reported as missing, not as an error.
 */
const KiB = 1024;
const MiB = 1024 * KiB;

t.test('qemu:dirty-bitmap extents and multi-conn from qemu-nbd', async (t) => {
  if (!requireTools(t, 'qemu-nbd', 'qemu-img', 'qemu-io')) return;
  const dir = shortDir(t);
  const img = join(dir, 'd.qcow2');
  await runOk(t, 'qemu-img', ['create', '-q', '-f', 'qcow2', img, String(8 * MiB)]);
  await runOk(t, 'qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 1M', img]);
  await runOk(t, 'qemu-img', ['bitmap', '--add', img, 'b0']);
  await runOk(t, 'qemu-io', ['-f', 'qcow2', '-c', 'write -P 2 2M 64k', '-c', 'write -P 3 5M 128k', img]);
  const sock = join(dir, 'q.sock');
  await startDaemon(t, 'qemu-nbd', ['-t', '-r', '-e', '4', '-k', sock, '-x', 'disk', '-f', 'qcow2', '-B', 'b0', img], sock);

  const c = await NbdClientDriver.connect({ address: { type: 'unix', path: sock }, exportName: 'disk', metaContexts: ['qemu:dirty-bitmap:b0', 'qemu:dirty-bitmap:nope'] });
  t.teardown(() => c.close());
  t.ok(c.canMultiConn, 'a read-only qemu-nbd export shared by 4 allows multi-conn');
  t.ok(c.hasContext('qemu:dirty-bitmap:b0'));
  t.notOk(c.hasContext('qemu:dirty-bitmap:nope'), 'a bitmap the export lacks is simply not selected');
  const dirty: [number, number][] = [];
  for (let at = 0; at < c.length; ) {
    for (const e of await c.contextStatus('qemu:dirty-bitmap:b0', at, c.length - at)) {
      if (e.flags & 1) dirty.push([e.offset, e.bytes]);
      at = e.offset + e.bytes;
    }
  }
  t.same(dirty, [[2 * MiB, 64 * KiB], [5 * MiB, 128 * KiB]]);
  // base:allocation on the same connection still answers (both contexts come in one reply).
  const alloc = await c.blockStatus(0, 8 * MiB);
  t.match(alloc[0], { offset: 0, data: true });
  await t.rejects(c.contextStatus('qemu:dirty-bitmap:nope', 0, 4096), { code: 'ERR_INVALID_ARGUMENT' });
});
