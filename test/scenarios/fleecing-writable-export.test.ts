import t, { type Test } from 'tap';
import { execFile, spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { QmpClient } from '@shear/qmp';
import { requireTools } from '@shear/testkit';
import { startDaemon } from '../lib/daemon.js';
import { qemuImg } from '../lib/images.js';

/**
 * Issue 14 item 3: libvirt and scripts written for QEMU add the snapshot-access export with
 * `writable: true` (in QEMU that is what lets a client TRIM). The same QMP script and the same
 * libnbd client run against qemu-storage-daemon 7.2 (the oracle) and Shear: flags, the error of
 * every write, what TRIM releases in the scratch file, and the bytes of the view and the source
 * must be equal.
 */

const run = promisify(execFile);
const C = 65536;
const SIZE = 4 * 1024 * 1024;
const PYTHON = '/usr/bin/python3';

/** Writes cluster 3 through the live export, so copy-before-write puts its old data in the scratch file. */
const GUEST = `
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pwrite(b"\\x77" * 65536, 3 * 65536); h.flush(); h.shutdown()
`;

/** Every kind of write against the view, then TRIM of cluster 3, then the view's bytes. */
const CLIENT = `
import nbd, sys, json, hashlib
h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.set_strict_mode(0)
C = 65536
res = {"ro": h.is_read_only(), "can_trim": h.can_trim(), "can_zero": h.can_zero(), "can_fast_zero": h.can_fast_zero(), "size": h.get_size()}
def attempt(name, fn):
    try:
        fn(); res[name] = "ok"
    except nbd.Error as e:
        res[name] = e.errno
attempt("write", lambda: h.pwrite(b"x" * C, 5 * C))
attempt("write_fua", lambda: h.pwrite(b"x" * 512, 6 * C + 512, nbd.CMD_FLAG_FUA))
attempt("write_zeroes", lambda: h.zero(C, 7 * C))
attempt("write_zeroes_no_hole", lambda: h.zero(C, 8 * C, nbd.CMD_FLAG_NO_HOLE))
attempt("write_zeroes_fast", lambda: h.zero(C, 9 * C, nbd.CMD_FLAG_FAST_ZERO))
attempt("flush", lambda: h.flush())
attempt("trim", lambda: h.trim(C, 3 * C))
view = h.pread(3 * C, 0) + h.pread(h.get_size() - 4 * C, 4 * C)
res["view_sha256"] = hashlib.sha256(view).hexdigest()
h.shutdown()
print(json.dumps(res))
`;

/** The QMP script, the same for both daemons. */
function script(dir: string, nbdSock: string): [string, Record<string, unknown>][] {
  return [
    ['blockdev-add', { driver: 'file', 'node-name': 'disk0', filename: path.join(dir, 'disk.raw') }],
    ['blockdev-add', { driver: 'file', 'node-name': 'tmp', filename: path.join(dir, 'fleece.tmp'), discard: 'unmap' }],
    // QEMU 7.2's nbd-server-start takes the older {type, data} form of the address.
    ['nbd-server-start', { addr: { type: 'unix', data: { path: nbdSock } } }],
    ['block-export-add', { type: 'nbd', id: 'live', 'node-name': 'disk0', name: 'live', writable: true }],
    ['blockdev-backup', { 'job-id': 'fleece', device: 'disk0', target: 'tmp', sync: 'none', 'filter-node-name': 'cbw' }],
    ['blockdev-add', { driver: 'snapshot-access', 'node-name': 'snap', file: 'cbw' }],
    ['block-export-add', { type: 'nbd', id: 'pull', 'node-name': 'snap', name: 'pull', writable: true }],
  ];
}

/** Whether the scratch file holds data at cluster 3 (qemu-img map; -U: the daemon holds it). */
function cluster3Allocated(file: string): boolean {
  const map = JSON.parse(qemuImg('map', '-U', '-f', 'raw', '--output=json', file)) as { start: number; length: number; data: boolean }[];
  return map.some((e) => e.data && e.start < 4 * C && e.start + e.length > 3 * C);
}

interface Run {
  client: Record<string, unknown>;
  scratchBefore: boolean;
  scratchAfter: boolean;
  disk: Buffer;
}

/** Runs the script and the clients against one daemon, given how to send QMP to it. */
async function exercise(t: Test, dir: string, nbdSock: string, cmd: (name: string, args: Record<string, unknown>) => Promise<unknown>): Promise<Run> {
  for (const [name, args] of script(dir, nbdSock)) await cmd(name, args);
  const uri = (e: string) => `nbd+unix:///${e}?socket=${nbdSock}`;
  await run(PYTHON, ['-c', GUEST, uri('live')]);
  const scratchBefore = cluster3Allocated(path.join(dir, 'fleece.tmp'));
  const { stdout } = await run(PYTHON, ['-c', CLIENT, uri('pull')]);
  const scratchAfter = cluster3Allocated(path.join(dir, 'fleece.tmp'));
  t.same(await cmd('block-export-del', { id: 'pull' }), {});
  t.same(await cmd('block-export-del', { id: 'live' }), {});
  return { client: JSON.parse(stdout) as Record<string, unknown>, scratchBefore, scratchAfter, disk: readFileSync(path.join(dir, 'disk.raw')) };
}

/** Starts qemu-storage-daemon with a QMP monitor on a socket; returns a client and a stop function. */
async function startQsd(t: Test, sockDir: string): Promise<{ qmp: QmpClient; stop: () => Promise<void> }> {
  const sock = path.join(sockDir, 'qsd-qmp.sock');
  const proc = spawn('qemu-storage-daemon', ['--chardev', `socket,path=${sock},server=on,wait=off,id=m`, '--monitor', 'chardev=m'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (d) => (stderr += d));
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
  while (!existsSync(sock) && proc.exitCode === null) await new Promise((r) => setTimeout(r, 20));
  if (!existsSync(sock)) throw new Error(`qemu-storage-daemon did not start: ${stderr}`);
  const qmp = await QmpClient.connect(sock);
  return {
    qmp,
    async stop() {
      await qmp.execute('quit').catch(() => {});
      const guard = setTimeout(() => proc.kill('SIGKILL'), 30_000);
      await exited;
      clearTimeout(guard);
      await qmp.close();
    },
  };
}

t.test('a writable snapshot-access export: QEMU 7.2 and Shear answer every write alike and change nothing', async (t) => {
  if (!requireTools(t, 'qemu-storage-daemon', 'qemu-img', PYTHON)) return;
  const base = t.testdir();
  // Data in every cluster: copy-before-write preserves cluster 3 as data, not as a hole.
  const original = randomBytes(SIZE);
  writeFileSync(path.join(base, 'original.raw'), original);
  const expectedDisk = Buffer.from(original);
  expectedDisk.fill(0x77, 3 * C, 4 * C);
  const view = Buffer.concat([original.subarray(0, 3 * C), original.subarray(4 * C)]);
  const viewSha = createHash('sha256').update(view).digest('hex');
  const sockDir = mkdtempSync(path.join(os.tmpdir(), 'shear-fl-'));
  t.teardown(() => rmSync(sockDir, { recursive: true, force: true }));

  const prepare = (name: string) => {
    const dir = path.join(base, name);
    mkdirSync(dir);
    copyFileSync(path.join(base, 'original.raw'), path.join(dir, 'disk.raw'));
    qemuImg('create', '-q', '-f', 'raw', path.join(dir, 'fleece.tmp'), String(SIZE));
    return dir;
  };

  const results: Record<string, Run> = {};
  {
    const dir = prepare('qemu');
    const qsd = await startQsd(t, sockDir);
    try {
      results['qemu'] = await exercise(t, dir, path.join(sockDir, 'qsd-nbd.sock'), (n, a) => qsd.qmp.execute(n, a));
    } finally {
      await qsd.stop();
    }
  }
  {
    const dir = prepare('shear');
    const d = await startDaemon(dir);
    try {
      results['shear'] = await exercise(t, dir, path.join(sockDir, 'shear-nbd.sock'), (n, a) => d.cmd(n, a));
    } finally {
      await d.stop();
    }
  }

  const qemu = results['qemu']!;
  const shear = results['shear']!;
  t.same(shear.client, qemu.client, 'the client sees the same flags and the same answer to every request');
  t.match(qemu.client, {
    ro: false, can_trim: true, can_zero: true,
    write: 'ENOTSUP', write_fua: 'ENOTSUP', write_zeroes: 'ENOTSUP', write_zeroes_no_hole: 'ENOTSUP', write_zeroes_fast: 'ENOTSUP',
    flush: 'ok', trim: 'ok', view_sha256: viewSha,
  }, 'QEMU 7.2: writes ENOTSUP, TRIM and FLUSH succeed, the view unchanged');
  for (const [name, r] of Object.entries(results)) {
    t.ok(r.disk.equals(expectedDisk), `${name}: the source holds only the guest's write`);
    t.ok(r.scratchBefore, `${name}: copy-before-write preserved cluster 3 in the scratch file`);
  }
  // Where Shear does better: QEMU 7.2 keeps a trimmed cluster's copy in the scratch file until
  // the job ends; Shear frees it at once (the reader said it has it).
  t.notOk(shear.scratchAfter, 'shear: TRIM released the preserved copy');
});
