import t, { type Test } from 'tap';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { requireTools } from '@shear/testkit';
import { RawClient, replyError } from '../../packages/nbd/src/raw-client.fixture.js';
import { startDaemon, type DaemonHandle } from '../lib/daemon.js';
import { makeRawImage } from '../lib/images.js';

/**
 * Issue 14 item 2: a client that has left (NBD_CMD_DISC, EOF, or a broken request) no longer
 * counts, so a safe block-export-del sent right after succeeds, as in QEMU. Each round asks over
 * QMP the moment the client's last bytes are in the kernel: no sleep, no retry. Run it beside
 * `stress-ng --cpu 2` to see it hold on a loaded machine.
 */

const run = promisify(execFile);
const CMD_READ = 0;
const CMD_WRITE = 1;
const CMD_DISC = 2;
const ROUNDS = 100;

/** How the client leaves; each round uses one, in turn. */
const ENDINGS = ['disc then close', 'disc, socket left open', 'eof without disc', 'broken request'] as const;

async function withDaemon(t: Test): Promise<{ d: DaemonHandle; nbdSock: string; disk: string }> {
  const dir = t.testdir();
  const sockDir = mkdtempSync(path.join(os.tmpdir(), 'shear-nbd-'));
  t.teardown(() => rmSync(sockDir, { recursive: true, force: true }));
  const nbdSock = path.join(sockDir, 'nbd.sock');
  const disk = path.join(dir, 'disk.raw');
  makeRawImage(disk, 1024 * 1024, 7);
  const d = await startDaemon(dir, ['--blockdev', `driver=file,node-name=disk0,filename=${disk}`, '--nbd-server', `addr.type=unix,addr.path=${nbdSock}`]);
  t.teardown(() => d.stop());
  return { d, nbdSock, disk };
}

/** Resolves once `data` is written to the socket (in the kernel, so the daemon can read it). */
function written(c: RawClient, data: Buffer): Promise<void> {
  return new Promise((resolve, reject) => c.socket.write(data, (err) => (err ? reject(err) : resolve())));
}

function request(type: number, cookie: bigint, offset = 0, length = 0): Buffer {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(0x25609513, 0);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(cookie, 8);
  h.writeBigUInt64BE(BigInt(offset), 16);
  h.writeUInt32BE(length, 24);
  return h;
}

t.test(`block-export-del (safe) right after the client leaves succeeds, ${ROUNDS} rounds`, async (t) => {
  const { d, nbdSock } = await withDaemon(t);
  const refusals: string[] = [];
  const clients: RawClient[] = [];
  t.teardown(() => clients.forEach((c) => c.close()));
  for (let i = 0; i < ROUNDS; i++) {
    const id = `e${i}`;
    const ending = ENDINGS[i % ENDINGS.length]!;
    await d.cmd('block-export-add', { type: 'nbd', id, 'node-name': 'disk0', name: id });
    const c = await RawClient.connect({ type: 'unix', path: nbdSock });
    clients.push(c);
    await c.go(id);
    // One answered READ first: the connection has been serving, not just negotiating.
    await written(c, request(CMD_READ, 1n, 0, 512));
    t.equal(replyError(await c.reply()).error, 0);
    if (ending === 'disc then close') {
      await written(c, request(CMD_DISC, 2n));
      c.socket.end();
    } else if (ending === 'disc, socket left open') {
      await written(c, request(CMD_DISC, 2n));
    } else if (ending === 'eof without disc') {
      await new Promise<void>((resolve) => c.socket.end(resolve));
    } else {
      const bad = request(CMD_READ, 3n);
      bad.writeUInt32BE(0xdeadbeef, 0);
      await written(c, bad);
    }
    try {
      t.same(await d.cmd('block-export-del', { id }), {}, `round ${i} (${ending}): removed`);
    } catch (err) {
      refusals.push(`round ${i} (${ending}): ${(err as Error).message}`);
    }
    await c.closedByServer();
  }
  t.same(refusals, [], 'no round was refused');
  const deleted = d.events.filter((e) => e.event === 'BLOCK_EXPORT_DELETED').map((e) => e.data?.['id']);
  t.equal(deleted.length, ROUNDS - refusals.length, 'every removed export was announced');
  t.same(await d.cmd('query-block-exports'), [], 'nothing left');
});

t.test('a DISC behind a request in flight: the export counts until that request is done, and it is answered', async (t) => {
  const { d, nbdSock, disk } = await withDaemon(t);
  await d.cmd('block-export-add', { type: 'nbd', id: 'w', 'node-name': 'disk0', name: 'w', writable: true });
  const c = await RawClient.connect({ type: 'unix', path: nbdSock });
  t.teardown(() => c.close());
  await c.go('w');
  const payload = Buffer.alloc(256 * 1024, 0x5a);
  await written(c, Buffer.concat([request(CMD_WRITE, 9n, 0, payload.length), payload, request(CMD_DISC, 10n)]));
  // Refused while the WRITE runs, accepted once it is done: never removed under it.
  let refused = 0;
  for (;;) {
    try {
      await d.cmd('block-export-del', { id: 'w' });
      break;
    } catch (err) {
      t.match((err as Error).message, /still has 1 connection/, 'only refused for the connection still writing');
      refused++;
    }
  }
  const r = await c.reply();
  t.equal(r.cookie, 9n);
  t.equal(replyError(r).error, 0, 'the WRITE sent before DISC was answered');
  await c.closedByServer();
  t.ok(readFileSync(disk).subarray(0, payload.length).equals(payload), `and its data is in the image (refused ${refused} time(s) meanwhile)`);
});

t.test('nbdinfo (libnbd: DISC, then exit) then block-export-del at once', async (t) => {
  if (!requireTools(t, 'nbdinfo')) return;
  const { d, nbdSock } = await withDaemon(t);
  for (let i = 0; i < 10; i++) {
    await d.cmd('block-export-add', { type: 'nbd', id: 'n', 'node-name': 'disk0', name: 'n' });
    await run('nbdinfo', ['--size', `nbd+unix:///n?socket=${nbdSock}`]);
    t.same(await d.cmd('block-export-del', { id: 'n' }), {}, `round ${i}`);
    // The name is free again once the export is gone (BLOCK_EXPORT_DELETED).
    while (d.events.filter((e) => e.event === 'BLOCK_EXPORT_DELETED').length <= i) await d.cmd('query-block-exports');
  }
});
