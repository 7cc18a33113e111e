import t from 'tap';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { requireTools } from '@shear/testkit';
import { nbdUri } from './address.js';
import { KiB, MiB, makeDisk, serve, shortDir } from './setup.fixture.js';
import { run, runOk } from './tools.fixture.js';

/**
 * QEMU's own NBD client (qemu-img, qemu-io 7.2) against our server: info, map (base:allocation
 * and a dirty bitmap), convert both ways, compare, and qemu-io's writes (FUA on every write,
 * WRITE_ZEROES with and without NO_HOLE, TRIM, FLUSH, tiny unaligned writes). Every byte is
 * checked against what the node holds.
 */

const SIZE = 8 * MiB;
const DATA = [0, 1, 5, 64, 65, 127];

interface MapEntry {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
  present?: boolean;
}

/** Merges neighbouring map entries with equal data/zero flags. */
function mergeMap(entries: MapEntry[]): [number, number, boolean][] {
  const out: [number, number, boolean][] = [];
  for (const e of entries) {
    const last = out[out.length - 1];
    if (last && last[2] === e.data && last[0] + last[1] === e.start) last[1] += e.length;
    else out.push([e.start, e.length, e.data]);
  }
  return out;
}

/** Expected data runs of a disk made with dataChunks (64 KiB each). */
function expectedRuns(chunks: number[], size: number): [number, number, boolean][] {
  const runs: [number, number, boolean][] = [];
  for (let c = 0; c < size / (64 * KiB); c++) {
    const data = chunks.includes(c);
    const last = runs[runs.length - 1];
    if (last && last[2] === data) last[1] += 64 * KiB;
    else runs.push([c * 64 * KiB, 64 * KiB, data]);
  }
  return runs;
}

for (const transport of ['unix', 'tcp'] as const) {
  t.test(`qemu-img info, map, convert, compare over ${transport}`, async (t) => {
    if (!requireTools(t, 'qemu-img')) return;
    const disk = await makeDisk(SIZE, { dataChunks: DATA });
    const s = await serve(t, disk, { tcp: transport === 'tcp', writable: false });
    const uri = nbdUri(s.address, 'disk');
    t.match(uri, transport === 'tcp' ? /^nbd:\/\/127\.0\.0\.1:\d+\/disk$/ : /^nbd\+unix:\/\/\/disk\?socket=/);
    const info = await runOk(t, 'qemu-img', ['info', '--output=json', uri]);
    if (info) t.equal(JSON.parse(info)['virtual-size'], SIZE);
    const map = await runOk(t, 'qemu-img', ['map', '--output=json', uri]);
    if (map) {
      const entries = JSON.parse(map) as MapEntry[];
      t.same(mergeMap(entries), expectedRuns(DATA, SIZE), 'map matches the node layout');
      t.ok(entries.filter((e) => !e.data).every((e) => e.zero), 'holes read as zero');
    }
    const dir = shortDir(t);
    const out = join(dir, 'copy.raw');
    await runOk(t, 'qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, out]);
    t.ok(readFileSync(out).equals(disk.content), 'convert copied every byte');
    const qcow = join(dir, 'copy.qcow2');
    await runOk(t, 'qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', uri, qcow]);
    await runOk(t, 'qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', qcow, uri]);
    const qmap = await runOk(t, 'qemu-img', ['map', '--output=json', '-f', 'qcow2', qcow]);
    if (qmap) t.same(mergeMap(JSON.parse(qmap) as MapEntry[]), expectedRuns(DATA, SIZE), 'holes stayed holes in the qcow2 copy');
    // A differing byte must make compare fail (exit 1), so the check above can fail.
    disk.content[5 * 64 * KiB + 7] = disk.content[5 * 64 * KiB + 7]! ^ 0xff;
    writeFileSync(out, disk.content);
    const diff = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', out, uri]);
    t.equal(diff.code, 1, 'compare sees one changed byte');
  });
}

t.test('qemu-img convert -n into a writable export, then read back', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const disk = await makeDisk(SIZE, { dataChunks: [2, 3] });
  const s = await serve(t, disk, { writable: true });
  const dir = shortDir(t);
  const src = join(dir, 'src.raw');
  const content = Buffer.alloc(SIZE);
  randomBytes(3 * MiB).copy(content, 1 * MiB + 123);
  writeFileSync(src, content);
  await runOk(t, 'qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, nbdUri(s.address, 'disk')]);
  const back = Buffer.alloc(SIZE);
  await disk.memory.read(0, back);
  t.ok(back.equals(content), 'the node holds exactly the source (old data zeroed)');
});

t.test('qemu-io: FUA writes, WRITE_ZEROES with and without NO_HOLE, TRIM, FLUSH, tiny unaligned I/O', async (t) => {
  if (!requireTools(t, 'qemu-io')) return;
  const disk = await makeDisk(1 * MiB, { dataChunks: [0, 1, 2, 3] });
  const s = await serve(t, disk, { writable: true });
  const uri = nbdUri(s.address, 'disk');
  const out = await runOk(t, 'qemu-io', [
    '-f', 'raw', uri,
    '-c', 'write -P 0x55 0 4k',
    '-c', 'write -z 8k 4k',
    '-c', 'write -z -u 12k 4k',
    '-c', 'discard 64k 64k',
    '-c', 'flush',
    '-c', 'read -P 0x55 0 4k',
    '-c', 'write -P 0x57 100 7',
    '-c', 'read -P 0x57 100 7',
    '-c', 'aio_write -P 0x61 200k 8k',
    '-c', 'aio_write -P 0x62 300k 8k',
    '-c', 'aio_flush',
    '-c', 'read -P 0 8k 8k',
  ]);
  if (out === undefined) return;
  t.notMatch(out, /Pattern verification failed|error/i, 'qemu-io verified its reads');
  const expect = Buffer.from(disk.content);
  expect.fill(0x55, 0, 4096);
  expect.fill(0, 8192, 16384);
  expect.fill(0, 64 * KiB, 128 * KiB);
  expect.fill(0x57, 100, 107);
  expect.fill(0x61, 200 * KiB, 208 * KiB);
  expect.fill(0x62, 300 * KiB, 308 * KiB);
  const back = Buffer.alloc(1 * MiB);
  await disk.memory.read(0, back);
  t.ok(back.equals(expect), 'the node holds exactly what qemu-io wrote');
  const map = await runOk(t, 'qemu-img', ['map', '--output=json', '-f', 'raw', uri]);
  if (map) {
    const entries = JSON.parse(map) as MapEntry[];
    const hole = entries.find((e) => e.start === 64 * KiB);
    t.same(hole && { length: hole.length, data: hole.data, zero: hole.zero }, { length: 64 * KiB, data: false, zero: true }, 'the trimmed chunk is a hole');
  }
});

t.test('qemu-img map through x-dirty-bitmap sees the bitmap', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const disk = await makeDisk(SIZE, { dataChunks: DATA });
  const bm = disk.node.bitmaps.add({ name: 'backup-vda', disabled: true, granularity: 64 * KiB });
  bm.bits.set(64 * KiB, 64 * KiB);
  bm.bits.set(3 * MiB + 1, 10);
  const s = await serve(t, disk, { writable: false, bitmaps: [bm] });
  if (s.address.type !== 'unix') return;
  const out = await runOk(t, 'qemu-img', [
    'map', '--output=json', '--image-opts',
    `driver=nbd,server.type=unix,server.path=${s.address.path},export=disk,x-dirty-bitmap=qemu:dirty-bitmap:backup-vda`,
  ]);
  if (!out) return;
  // qemu-img shows dirty as "data": false (present false) and clean as data.
  const dirty = (JSON.parse(out) as MapEntry[]).filter((e) => !e.data).map((e) => [e.start, e.length]);
  t.same(dirty, [[64 * KiB, 64 * KiB], [3 * MiB, 64 * KiB]]);
  const missing = await run('qemu-img', ['map', '--output=json', '--image-opts', `driver=nbd,server.type=unix,server.path=${s.address.path},export=disk,x-dirty-bitmap=qemu:dirty-bitmap:nosuch`]);
  t.not(missing.code, 0, 'an unknown bitmap fails the open, as with qemu-nbd');
});

t.test('qemu-io refuses to write a read-only export; qemu-img reports an unknown export', async (t) => {
  if (!requireTools(t, 'qemu-io', 'qemu-img')) return;
  const disk = await makeDisk(1 * MiB);
  const s = await serve(t, disk, { writable: false });
  const w = await run('qemu-io', ['-f', 'raw', nbdUri(s.address, 'disk'), '-c', 'write 0 4k']);
  t.equal(w.code, 1, 'qemu-io fails');
  t.match(w.stderr, /Permission denied/, 'at open, as against a read-only qemu-nbd');
  const u = await run('qemu-img', ['info', nbdUri(s.address, 'nosuch')]);
  t.not(u.code, 0);
  t.match(u.stderr, /export 'nosuch' not present/);
});
