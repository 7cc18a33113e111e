import { closeSync, constants as fsc, fstatSync, openSync, readFileSync, readSync, statfsSync, unlinkSync, writeFileSync, writeSync, ftruncateSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import t from 'tap';
import type { Test } from 'tap';
import { isShearError } from '@shear/base';
import { loadBinding } from './addon.js';
import { ADDON_PATH, SYNC_FILE_RANGE, loadNative, type NativeIO } from './index.js';
import { requireNativeAddon, skipLoudly } from '@shear/testkit';

const KiB = 1024;
const MiB = 1024 * KiB;
/** An fd number no test process has open. */
const BAD_FD = 0x7ffffff0;
const TMPFS_MAGIC = 0x01021994;

const addon = loadNative({ forceFallback: false });

function makeFile(t: Test, name: string, content: Uint8Array, size = content.length): { path: string; fd: number } {
  const path = join(t.testdir(), name);
  writeFileSync(path, content);
  if (size !== content.length) {
    const fd = openSync(path, 'r+');
    ftruncateSync(fd, size);
    closeSync(fd);
  }
  const fd = openSync(path, 'r+');
  t.teardown(() => closeSync(fd));
  return { path, fd };
}

function readAt(fd: number, offset: number, bytes: number): Buffer {
  const buf = Buffer.alloc(bytes);
  let done = 0;
  while (done < bytes) {
    const n = readSync(fd, buf, done, bytes - done, offset + done);
    if (n === 0) break;
    done += n;
  }
  return buf;
}

const isZero = (b: Uint8Array) => b.every((x) => x === 0);

async function expectShearError(t: Test, fn: () => unknown, code: string, errno?: string): Promise<void> {
  try {
    await fn();
    t.fail(`expected ${code}`);
  } catch (err) {
    t.ok(isShearError(err), 'a ShearError');
    if (!isShearError(err)) return;
    t.equal(err.code, code, err.message);
    if (errno !== undefined) t.equal(err.context.errno, errno, 'errno name in context');
  }
}

t.test('the addon loads and its constants agree with the ABI values in types.ts', async (t) => {
  if (!requireNativeAddon(t, addon)) return;
  t.equal(addon.loadError, undefined);
  t.equal(addon.fallbackReason, undefined);
  t.same(addon.supports, { seek: true, fallocate: true, syncFileRange: true, fadvise: true, copyFileRange: true, alignedAlloc: true });
  const c = loadBinding(ADDON_PATH).constants;
  t.equal(c.SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE.WAIT_BEFORE);
  t.equal(c.SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE.WRITE);
  t.equal(c.SYNC_FILE_RANGE_WAIT_AFTER, SYNC_FILE_RANGE.WAIT_AFTER);
});

t.test('seekData and seekHole walk data and holes of a sparse file', async (t) => {
  if (!requireNativeAddon(t, addon)) return;
  const { fd } = makeFile(t, 'sparse', Buffer.alloc(0), 0);
  writeSync(fd, randomBytes(64 * KiB), 0, 64 * KiB, 0);
  writeSync(fd, randomBytes(64 * KiB), 0, 64 * KiB, MiB);
  ftruncateSync(fd, 2 * MiB);
  t.equal(addon.seekData(fd, 0), 0);
  t.equal(addon.seekHole(fd, 0), 64 * KiB);
  t.equal(addon.seekData(fd, 64 * KiB), MiB);
  t.equal(addon.seekHole(fd, MiB), MiB + 64 * KiB);
  t.equal(addon.seekHole(fd, MiB + 64 * KiB), MiB + 64 * KiB, 'an offset inside a hole is its own answer');
  t.equal(addon.seekData(fd, MiB + 64 * KiB), -1, 'no data after the last extent');
  t.equal(addon.seekHole(fd, 2 * MiB), -1, 'offset at EOF');
  t.equal(addon.seekData(fd, 5 * MiB), -1, 'offset past EOF');
});

t.test('fallocate punch-hole deallocates, reads zero, keeps the size, and seekHole finds it', async (t) => {
  if (!requireNativeAddon(t, addon)) return;
  const content = randomBytes(MiB);
  const { fd } = makeFile(t, 'punch', content);
  const before = fstatSync(fd);
  addon.fallocate(fd, 'punch-hole', 256 * KiB, 128 * KiB);
  const after = fstatSync(fd);
  t.equal(after.size, MiB, 'size kept');
  t.ok(after.blocks < before.blocks, `blocks ${before.blocks} -> ${after.blocks}`);
  t.equal(addon.seekHole(fd, 0), 256 * KiB);
  t.equal(addon.seekData(fd, 256 * KiB), 384 * KiB);
  t.ok(isZero(readAt(fd, 256 * KiB, 128 * KiB)), 'hole reads zero');
  t.same(readAt(fd, 0, 256 * KiB), content.subarray(0, 256 * KiB), 'data before intact');
  t.same(readAt(fd, 384 * KiB, 640 * KiB), content.subarray(384 * KiB), 'data after intact');

  // an unaligned punch zeroes the partial blocks at its edges too
  addon.fallocate(fd, 'punch-hole', 1000, 10_000);
  t.ok(isZero(readAt(fd, 1000, 10_000)));
  t.same(readAt(fd, 0, 1000), content.subarray(0, 1000));
  t.same(readAt(fd, 11_000, 1000), content.subarray(11_000, 12_000));
});

t.test('fallocate zero-range and allocate', async (t) => {
  if (!requireNativeAddon(t, addon)) return;
  const content = randomBytes(MiB);
  const { fd } = makeFile(t, 'zero', content);
  addon.fallocate(fd, 'zero-range', 4096 + 17, 100_000);
  t.ok(isZero(readAt(fd, 4096 + 17, 100_000)));
  t.same(readAt(fd, 0, 4096 + 17), content.subarray(0, 4096 + 17));
  t.equal(fstatSync(fd).size, MiB);

  const before = fstatSync(fd).blocks;
  addon.fallocate(fd, 'allocate', MiB, MiB, { keepSize: true });
  t.equal(fstatSync(fd).size, MiB, 'keepSize keeps the size');
  t.ok(fstatSync(fd).blocks > before, 'blocks reserved past EOF');
  addon.fallocate(fd, 'allocate', MiB, 3 * MiB);
  t.equal(fstatSync(fd).size, 4 * MiB, 'plain allocate grows the file');
  t.ok(isZero(readAt(fd, MiB, 3 * MiB)));
});

t.test('async variants run on the threadpool and give the same results', async (t) => {
  if (!requireNativeAddon(t, addon)) return;
  const content = randomBytes(MiB);
  const { fd } = makeFile(t, 'async', content);
  await addon.fallocateAsync(fd, 'punch-hole', 0, 64 * KiB);
  t.equal(addon.seekData(fd, 0), 64 * KiB);
  await addon.fallocateAsync(fd, 'zero-range', 100 * KiB, 5);
  t.ok(isZero(readAt(fd, 100 * KiB, 5)));
  await addon.syncFileRangeAsync(fd, 0, 0, SYNC_FILE_RANGE.WAIT_BEFORE | SYNC_FILE_RANGE.WRITE | SYNC_FILE_RANGE.WAIT_AFTER);
  addon.syncFileRange(fd, 0, MiB, SYNC_FILE_RANGE.WRITE);
  await addon.fadviseAsync(fd, 0, 0, 'dontneed');
  addon.fadvise(fd, 0, MiB, 'sequential');
  t.same(readAt(fd, 200 * KiB, 100), content.subarray(200 * KiB, 200 * KiB + 100), 'content unchanged by sync and advice');
  await expectShearError(t, () => addon.fallocateAsync(BAD_FD, 'allocate', 0, 1), 'ERR_IO', 'EBADF');
  await expectShearError(t, () => addon.syncFileRangeAsync(BAD_FD, 0, 1, SYNC_FILE_RANGE.WRITE), 'ERR_IO', 'EBADF');
  await expectShearError(t, () => addon.copyFileRangeAsync(BAD_FD, 0, fd, 0, 1), 'ERR_IO', 'EBADF');
});

/** copyFileRange tests shared by the addon and the fallback. */
async function copyChecks(t: Test, native: NativeIO): Promise<void> {
  const content = randomBytes(3 * MiB + 123);
  const src = makeFile(t, 'src', content);
  const dst = makeFile(t, 'dst', Buffer.alloc(0));
  t.equal(native.copyFileRange(src.fd, 1000, dst.fd, 5000, 2 * MiB), 2 * MiB);
  t.same(readAt(dst.fd, 5000, 2 * MiB), content.subarray(1000, 1000 + 2 * MiB), 'bytes copied to the offset');
  t.ok(isZero(readAt(dst.fd, 0, 5000)), 'nothing before the offset');
  t.equal(await native.copyFileRangeAsync(src.fd, 0, dst.fd, 0, 5000), 5000);
  t.same(readAt(dst.fd, 0, 5000), content.subarray(0, 5000));
  t.equal(native.copyFileRange(src.fd, content.length - 10, dst.fd, 0, 100), 10, 'short at the source EOF');
  t.equal(await native.copyFileRangeAsync(src.fd, content.length + 10, dst.fd, 0, 100), 0, 'nothing past EOF');
  t.equal(native.copyFileRange(src.fd, 0, dst.fd, 0, 0), 0, 'zero bytes');
  await expectShearError(t, () => native.copyFileRange(BAD_FD, 0, dst.fd, 0, 10), 'ERR_IO', 'EBADF');
  await expectShearError(t, () => native.copyFileRange(src.fd, -1, dst.fd, 0, 10), 'ERR_INVALID_ARGUMENT');
}

t.test('copyFileRange copies bytes between offsets (addon)', async (t) => {
  if (!requireNativeAddon(t, addon)) return;
  await copyChecks(t, addon);
});

t.test('errors are ShearErrors with the errno name; EOPNOTSUPP means unsupported', async (t) => {
  if (!requireNativeAddon(t, addon)) return;
  await expectShearError(t, () => addon.seekData(BAD_FD, 0), 'ERR_IO', 'EBADF');
  await expectShearError(t, () => addon.fallocate(BAD_FD, 'punch-hole', 0, 4096), 'ERR_IO', 'EBADF');
  await expectShearError(t, () => addon.fadvise(BAD_FD, 0, 0, 'dontneed'), 'ERR_IO', 'EBADF');
  await expectShearError(t, () => addon.dioAlignment(BAD_FD), 'ERR_IO', 'EBADF');
  try {
    addon.seekHole(BAD_FD, 0);
  } catch (err) {
    t.match(String((err as Error).message), /^Cannot seek hole from 0 in fd \d+: EBADF \(Bad file descriptor\)$/, 'message style');
    t.match((err as Error & { cause: unknown }).cause, { errno: 9, syscall: 'lseek' }, 'the system error is the cause');
  }
  // argument checks happen before any system call
  const { fd } = makeFile(t, 'args', Buffer.alloc(4096));
  await expectShearError(t, () => addon.fallocate(fd, 'punch-hole', 0, 0), 'ERR_INVALID_ARGUMENT');
  await expectShearError(t, () => addon.fallocate(fd, 'shred' as never, 0, 1), 'ERR_INVALID_ARGUMENT');
  await expectShearError(t, () => addon.fallocate(fd, 'allocate', 1.5, 1), 'ERR_INVALID_ARGUMENT');
  await expectShearError(t, () => addon.syncFileRange(fd, 0, 0, 8), 'ERR_INVALID_ARGUMENT');
  await expectShearError(t, () => addon.fadvise(fd, 0, 0, 'forget' as never), 'ERR_INVALID_ARGUMENT');
  await expectShearError(t, () => addon.seekData(-1, 0), 'ERR_INVALID_ARGUMENT');

  // tmpfs has punch-hole but not zero-range. Node names errno 95 ENOTSUP (= EOPNOTSUPP on Linux).
  const shm = '/dev/shm';
  let isTmpfs = false;
  try {
    isTmpfs = statfsSync(shm).type === TMPFS_MAGIC;
  } catch {
    isTmpfs = false;
  }
  if (!isTmpfs) {
    skipLoudly(t, `${shm} is not tmpfs here: cannot provoke EOPNOTSUPP`);
    return;
  }
  const path = join(shm, `shear-native-test-${process.pid}`);
  writeFileSync(path, Buffer.alloc(64 * KiB, 1));
  const shmFd = openSync(path, 'r+');
  t.teardown(() => {
    closeSync(shmFd);
    unlinkSync(path);
  });
  await expectShearError(t, () => addon.fallocate(shmFd, 'zero-range', 0, 4096), 'ERR_IO_UNSUPPORTED', 'ENOTSUP');
  await expectShearError(t, () => addon.fallocateAsync(shmFd, 'zero-range', 0, 4096), 'ERR_IO_UNSUPPORTED', 'ENOTSUP');
  addon.fallocate(shmFd, 'punch-hole', 0, 4096);
  t.ok(isZero(readFileSync(path).subarray(0, 4096)), 'punch-hole works on tmpfs');
});

t.test('allocAligned returns zeroed buffers at aligned addresses', async (t) => {
  if (!requireNativeAddon(t, addon)) return;
  for (const alignment of [512, 4096, 64 * KiB, 2 * MiB]) {
    for (const bytes of [0, 1, 4095, MiB + 7]) {
      const { buffer, aligned } = addon.allocAligned(bytes, alignment);
      t.equal(aligned, true);
      t.equal(buffer.length, bytes);
      t.equal(addon.addressModulo(buffer, alignment), 0, `${bytes} bytes at ${alignment}`);
      t.ok(isZero(buffer));
    }
  }
  const { buffer } = addon.allocAligned(8192, 4096);
  t.equal(addon.addressModulo(buffer.subarray(1), 4096), 1, 'a view one byte in is one byte off');
  t.equal(addon.isAligned(buffer.subarray(512), 512), true);
  t.equal(addon.isAligned(buffer.subarray(512), 4096), false);
  const shared = addon.allocAligned(4096, 4096, { shared: true });
  t.ok(shared.buffer.buffer instanceof SharedArrayBuffer, 'shared memory for workers');
  t.equal(addon.addressModulo(shared.buffer, 4096), 0);
  await expectShearError(t, () => addon.allocAligned(10, 1000), 'ERR_INVALID_ARGUMENT');
  await expectShearError(t, () => addon.allocAligned(-1, 4096), 'ERR_INVALID_ARGUMENT');
});

t.test('aligned buffers work for O_DIRECT where a misaligned view fails', async (t) => {
  if (!requireNativeAddon(t, addon)) return;
  const content = randomBytes(64 * KiB);
  const { path } = makeFile(t, 'direct', content);
  let fd: number;
  try {
    fd = openSync(path, fsc.O_RDONLY | fsc.O_DIRECT);
  } catch (err) {
    skipLoudly(t, `O_DIRECT refused here: ${(err as Error).message}`);
    return;
  }
  t.teardown(() => closeSync(fd));
  const align = addon.dioAlignment(fd);
  t.ok(align === null || (align.memoryAlignment > 0 && align.offsetAlignment > 0), 'statx alignment');
  const { buffer } = addon.allocAligned(16 * KiB + 4096, 4096);
  t.equal(readSync(fd, buffer, 0, 16 * KiB, 0), 16 * KiB);
  t.same(buffer.subarray(0, 16 * KiB), content.subarray(0, 16 * KiB));
  // 4096-aligned memory works whatever the device; one byte off fails on every Linux device
  t.throws(() => readSync(fd, buffer.subarray(1), 0, 4096, 0), { code: 'EINVAL' }, 'misaligned memory is refused');
});

t.test('aligned buffers are freed with their last reference', async (t) => {
  if (!requireNativeAddon(t, addon)) return;
  const chunk = 64 * MiB;
  const start = process.memoryUsage().rss;
  let peak = start;
  for (let i = 0; i < 16; i++) {
    const { buffer } = addon.allocAligned(chunk, 4096);
    buffer.fill(1); // make every page resident
    peak = Math.max(peak, process.memoryUsage().rss);
    await new Promise((resolve) => setImmediate(resolve));
  }
  t.ok(peak - start < 512 * MiB, `1 GiB allocated in turn, peak growth ${Math.round((peak - start) / MiB)} MiB`);
});

t.test('the addon loads in a worker thread', async (t) => {
  if (!requireNativeAddon(t, addon)) return;
  const code = `
    const { parentPort } = require('node:worker_threads');
    const b = require(${JSON.stringify(ADDON_PATH)});
    parentPort.postMessage(b.addressModulo(new Uint8Array(new ArrayBuffer(64), 3, 1), 1) === 0 && typeof b.seekData === 'function');`;
  const worker = new Worker(code, { eval: true });
  const answer = await new Promise((resolve, reject) => {
    worker.once('message', resolve);
    worker.once('error', reject);
  });
  await worker.terminate();
  t.equal(answer, true);
});

t.test('fallback: same API, unsupported where JS cannot, no-ops for hints', async (t) => {
  const fb = loadNative({ forceFallback: true });
  t.equal(fb.available, false);
  t.equal(fb.loadError, undefined, 'forced is not a load failure');
  t.match(fb.fallbackReason, /forceFallback/);
  t.same(Object.values(fb.supports), [false, false, false, false, false, false]);
  const content = randomBytes(64 * KiB);
  const { fd } = makeFile(t, 'fb', content);
  await expectShearError(t, () => fb.seekData(fd, 0), 'ERR_IO_UNSUPPORTED');
  await expectShearError(t, () => fb.seekHole(fd, 0), 'ERR_IO_UNSUPPORTED');
  for (const mode of ['allocate', 'punch-hole', 'zero-range'] as const) {
    await expectShearError(t, () => fb.fallocate(fd, mode, 0, 4096), 'ERR_IO_UNSUPPORTED');
    await expectShearError(t, () => fb.fallocateAsync(fd, mode, 0, 4096), 'ERR_IO_UNSUPPORTED');
  }
  fb.syncFileRange(fd, 0, 0, SYNC_FILE_RANGE.WRITE);
  await fb.syncFileRangeAsync(fd, 0, 0, SYNC_FILE_RANGE.WRITE);
  fb.fadvise(fd, 0, 0, 'dontneed');
  await fb.fadviseAsync(fd, 0, 0, 'dontneed');
  await expectShearError(t, () => fb.syncFileRange(fd, 0, 0, 99), 'ERR_INVALID_ARGUMENT');
  await expectShearError(t, () => fb.fadvise(fd, -1, 0, 'dontneed'), 'ERR_INVALID_ARGUMENT');
  t.same(readAt(fd, 0, 64 * KiB), content, 'hints change nothing');
  const { buffer, aligned } = fb.allocAligned(10_000, 4096);
  t.equal(aligned, false);
  t.equal(buffer.length, 10_000);
  t.ok(isZero(buffer));
  t.ok(fb.allocAligned(16, 4096, { shared: true }).buffer.buffer instanceof SharedArrayBuffer);
  t.equal(fb.isAligned(buffer, 4096), false);
  await expectShearError(t, () => fb.addressModulo(buffer, 4096), 'ERR_IO_UNSUPPORTED');
  t.equal(fb.dioAlignment(fd), null);
});

t.test('copyFileRange copies bytes between offsets (fallback read+write loop)', async (t) => {
  await copyChecks(t, loadNative({ forceFallback: true }));
});

t.test('a missing or stale addon falls back with the load error', async (t) => {
  const missing = loadNative({ forceFallback: false, addonPath: join(t.testdir(), 'nope.node') });
  t.equal(missing.available, false);
  t.ok(missing.loadError instanceof Error);
  t.match(missing.fallbackReason, /^the addon did not load: Cannot find module/);
  const dir = t.testdir({ 'stale.cjs': 'module.exports = { seekData() {} };' });
  const stale = loadNative({ forceFallback: false, addonPath: join(dir, 'stale.cjs') });
  t.equal(stale.available, false);
  t.match(stale.loadError?.message, /out of date \(missing seekHole, /);
});

t.test('SHEAR_NATIVE=0 forces the fallback: option, env argument and a real process', async (t) => {
  t.equal(loadNative({ env: { SHEAR_NATIVE: '0' } }).available, false);
  t.match(loadNative({ env: { SHEAR_NATIVE: '0' } }).fallbackReason, /SHEAR_NATIVE=0/);
  t.equal(loadNative({ env: { SHEAR_NATIVE: '0' }, forceFallback: false }).available, addon.available, 'an explicit option wins');
  const { spawnSync } = await import('node:child_process');
  const script = "import('@shear/native').then((m) => { const n = m.getNative(); console.log(JSON.stringify([n.available, n.fallbackReason ?? null])); })";
  const run = (env: NodeJS.ProcessEnv) => {
    const r = spawnSync(process.execPath, [...process.execArgv, '-e', script], { env, encoding: 'utf8', cwd: join(ADDON_PATH, '../../../../..') });
    t.equal(r.status, 0, r.stderr);
    return JSON.parse(r.stdout.trim().split('\n').pop() ?? 'null') as [boolean, string | null];
  };
  t.same(run({ ...process.env, SHEAR_NATIVE: '0' }), [false, 'forced by SHEAR_NATIVE=0']);
  const { SHEAR_NATIVE: _, ...without } = process.env;
  t.same(run(without)[0], addon.available, 'without the variable the addon is used when built');
});
