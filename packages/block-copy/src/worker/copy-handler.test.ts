import t from 'tap';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import path from 'node:path';
import { getNative } from '@shear/native';
import type { HostExtent } from '@shear/block';
import type { CopyTaskMessage } from '../protocol.js';
import { runCopyTask } from './copy-handler.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const native = getNative();

function task(src: HostExtent[], dst: HostExtent[], bytes: number, extra: Partial<CopyTaskMessage> = {}): CopyTaskMessage {
  return { offset: 0, bytes, src, dst, chunkBytes: 256 * KiB, dropCache: true, inKernelCopy: true, cancel: new SharedArrayBuffer(4), cancelIndex: 0, ...extra };
}

function openFd(t: Tap, file: string, flags: string): number {
  const fd = fs.openSync(file, flags);
  t.teardown(() => fs.closeSync(fd));
  return fd;
}

type Tap = typeof t;

t.test('file-to-file pieces are copied in the kernel across extent boundaries that differ on both sides', async (t) => {
  t.ok(native.supports.copyFileRange, 'the addon is built');
  const dir = t.testdir();
  const content = randomBytes(3 * MiB);
  fs.writeFileSync(path.join(dir, 'src'), content);
  fs.writeFileSync(path.join(dir, 'dst'), Buffer.alloc(0));
  const s = openFd(t, path.join(dir, 'src'), 'r');
  const d = openFd(t, path.join(dir, 'dst'), 'r+');
  // Source in two extents (second one from the file's end), target in three, none aligned alike.
  const src: HostExtent[] = [
    { kind: 'fd', fd: s, hostOffset: 2 * MiB, bytes: MiB },
    { kind: 'fd', fd: s, hostOffset: 0, bytes: 2 * MiB },
  ];
  const dst: HostExtent[] = [
    { kind: 'fd', fd: d, hostOffset: 5 * MiB, bytes: 700 * KiB },
    { kind: 'fd', fd: d, hostOffset: 0, bytes: 2 * MiB },
    { kind: 'fd', fd: d, hostOffset: 3 * MiB, bytes: MiB - 700 * KiB },
  ];
  const r = runCopyTask(task(src, dst, 3 * MiB));
  t.equal(r.ok, true);
  if (!r.ok) return;
  t.equal(r.inKernelBytes, 3 * MiB, 'every byte went through copy_file_range');
  const expected = Buffer.concat([content.subarray(2 * MiB), content.subarray(0, 2 * MiB)]);
  const out = fs.readFileSync(path.join(dir, 'dst'));
  t.ok(out.subarray(5 * MiB, 5 * MiB + 700 * KiB).equals(expected.subarray(0, 700 * KiB)));
  t.ok(out.subarray(0, 2 * MiB).equals(expected.subarray(700 * KiB, 700 * KiB + 2 * MiB)));
  t.ok(out.subarray(3 * MiB, 3 * MiB + MiB - 700 * KiB).equals(expected.subarray(700 * KiB + 2 * MiB)));
});

t.test('the kernel refusing the copy (EINVAL: overlapping ranges of one file) falls back to pread/pwrite', async (t) => {
  const dir = t.testdir();
  const content = randomBytes(2 * MiB);
  fs.writeFileSync(path.join(dir, 'f'), content);
  const fd = openFd(t, path.join(dir, 'f'), 'r+');
  const r = runCopyTask(task([{ kind: 'fd', fd, hostOffset: 0, bytes: MiB }], [{ kind: 'fd', fd, hostOffset: 4 * KiB, bytes: MiB }], MiB, { chunkBytes: MiB }));
  t.equal(r.ok, true);
  if (!r.ok) return;
  t.equal(r.inKernelBytes, 0, 'nothing was copied in the kernel');
  const out = fs.readFileSync(path.join(dir, 'f'));
  t.ok(out.subarray(4 * KiB, 4 * KiB + MiB).equals(content.subarray(0, MiB)), 'the piece was read whole, then written');
});

t.test('a source file shorter than the range: the kernel copies what exists, the rest reads as zeroes', async (t) => {
  const dir = t.testdir();
  const content = randomBytes(300 * KiB);
  fs.writeFileSync(path.join(dir, 'src'), content);
  fs.writeFileSync(path.join(dir, 'dst'), Buffer.alloc(MiB, 0xaa));
  const s = openFd(t, path.join(dir, 'src'), 'r');
  const d = openFd(t, path.join(dir, 'dst'), 'r+');
  const r = runCopyTask(task([{ kind: 'fd', fd: s, hostOffset: 0, bytes: MiB }], [{ kind: 'fd', fd: d, hostOffset: 0, bytes: MiB }], MiB));
  t.equal(r.ok, true);
  if (!r.ok) return;
  t.equal(r.inKernelBytes, 300 * KiB);
  t.ok(fs.readFileSync(path.join(dir, 'dst')).equals(Buffer.concat([content, Buffer.alloc(MiB - 300 * KiB)])));
});

t.test('zero source extents and inKernelCopy false go through pread/pwrite; results are the same', async (t) => {
  const dir = t.testdir();
  const content = randomBytes(MiB);
  fs.writeFileSync(path.join(dir, 'src'), content);
  for (const inKernelCopy of [true, false]) {
    const file = path.join(dir, `dst-${inKernelCopy}`);
    fs.writeFileSync(file, Buffer.alloc(2 * MiB, 0xaa));
    const s = openFd(t, path.join(dir, 'src'), 'r');
    const d = openFd(t, file, 'r+');
    const src: HostExtent[] = [{ kind: 'fd', fd: s, hostOffset: 0, bytes: MiB }, { kind: 'zero', bytes: MiB }];
    const r = runCopyTask(task(src, [{ kind: 'fd', fd: d, hostOffset: 0, bytes: 2 * MiB }], 2 * MiB, { inKernelCopy }));
    t.equal(r.ok, true);
    if (!r.ok) continue;
    t.equal(r.inKernelBytes, inKernelCopy ? MiB : 0, `inKernelCopy ${inKernelCopy}`);
    t.equal(r.zeroBytes, MiB);
    t.ok(fs.readFileSync(file).equals(Buffer.concat([content, Buffer.alloc(MiB)])));
  }
});

t.test('across file systems (tmpfs to the test dir) the copy is exact, whichever path the kernel allows', async (t) => {
  if (!fs.existsSync('/dev/shm')) return t.skip('no /dev/shm on this machine');
  const dir = t.testdir();
  const shm = fs.mkdtempSync('/dev/shm/shear-h5-');
  t.teardown(() => fs.rmSync(shm, { recursive: true, force: true }));
  const content = randomBytes(MiB);
  fs.writeFileSync(path.join(shm, 'src'), content);
  fs.writeFileSync(path.join(dir, 'dst'), Buffer.alloc(0));
  const s = openFd(t, path.join(shm, 'src'), 'r');
  const d = openFd(t, path.join(dir, 'dst'), 'r+');
  const r = runCopyTask(task([{ kind: 'fd', fd: s, hostOffset: 0, bytes: MiB }], [{ kind: 'fd', fd: d, hostOffset: 0, bytes: MiB }], MiB));
  t.equal(r.ok, true);
  if (!r.ok) return;
  t.comment(`in kernel: ${r.inKernelBytes} of ${MiB} bytes (EXDEV makes it 0)`);
  t.ok(fs.readFileSync(path.join(dir, 'dst')).equals(content));
});

t.test('a real failure under copy_file_range is reported as the read or the write failure it is', async (t) => {
  const dir = t.testdir();
  fs.writeFileSync(path.join(dir, 'a'), randomBytes(MiB));
  fs.writeFileSync(path.join(dir, 'b'), randomBytes(MiB));
  // A source opened write-only and a target opened read-only: copy_file_range fails with EBADF.
  const unreadable = openFd(t, path.join(dir, 'a'), 'w');
  const readable = openFd(t, path.join(dir, 'b'), 'r');
  const writable = openFd(t, path.join(dir, 'b'), 'r+');
  const readOnly = openFd(t, path.join(dir, 'a'), 'r');
  const bad1 = runCopyTask(task([{ kind: 'fd', fd: unreadable, hostOffset: 0, bytes: MiB }], [{ kind: 'fd', fd: writable, hostOffset: 0, bytes: MiB }], MiB));
  t.equal(bad1.ok, false);
  if (!bad1.ok) t.match(bad1.error, { code: 'ERR_COPY_READ_FAILED', context: { op: 'read', errno: 'EBADF' } });
  const bad2 = runCopyTask(task([{ kind: 'fd', fd: readable, hostOffset: 0, bytes: MiB }], [{ kind: 'fd', fd: readOnly, hostOffset: 0, bytes: MiB }], MiB));
  t.equal(bad2.ok, false);
  if (!bad2.ok) t.match(bad2.error, { code: 'ERR_COPY_WRITE_FAILED', context: { op: 'write', errno: 'EBADF' } });
});
