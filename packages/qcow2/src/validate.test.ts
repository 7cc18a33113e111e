import t from 'tap';
import { copyFileSync, openSync, readSync, truncateSync, writeSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import { requireTools } from '@shear/testkit';
import { openTestImage } from './test-file-io.fixture.js';
import { qemuCheck, qemuImg, qemuIo } from './test-qemu.fixture.js';

// Issue 14 item 6: a truncated or damaged image must be refused as corrupt (as qemu-img check
// does), never read as zeroes. QEMU is the oracle: every image here is corrupt to both.

const MiB = 2 ** 20;
const L1_OFFSET = 0x30000;
const L2_OFFSET = 0x40000;

/** Sets `bits` in the 64-bit big-endian entry at `offset`. */
function orEntry(path: string, offset: number, bits: bigint): void {
  const fd = openSync(path, 'r+');
  try {
    const b = Buffer.alloc(8);
    readSync(fd, b, 0, 8, offset);
    b.writeBigUInt64BE(b.readBigUInt64BE(0) | bits);
    writeSync(fd, b, 0, 8, offset);
  } finally {
    closeSync(fd);
  }
}

t.test('damaged qcow2 images are corrupt to Shear and to qemu-img check alike', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = t.testdir();
  const full = join(dir, 'full.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', full, '16M');
  qemuIo(full, ['write -P 0x5a 0 16M']);
  // The layout the offsets below rely on: header, refcount table and block, L1, L2, data.
  t.equal(qemuCheck(full)['check-errors'], 0);

  const cases: { name: string; damage: (p: string) => void; open?: RegExp; read?: RegExp; offset: number }[] = [
    { name: 'truncated to 200 KB (the L2 table is gone)', damage: (p) => truncateSync(p, 200_000), open: /an L2 table \(L1 entry 0\) at offset 262144 .* past the end of the file \(200000 bytes\)/, offset: L2_OFFSET },
    { name: 'truncated to 1 MiB (data clusters are gone)', damage: (p) => truncateSync(p, MiB), read: /the data of guest cluster 11 .* at offset 1048576 .* past the end of the file/, offset: MiB },
    { name: 'an L1 entry with a reserved bit', damage: (p) => orEntry(p, L1_OFFSET, 1n << 3n), open: /L1 entry 0 .* reserved bits set/, offset: L1_OFFSET },
    { name: 'an L2 entry with a reserved bit', damage: (p) => orEntry(p, L2_OFFSET + 3 * 8, 1n << 4n), read: /L2 entry of guest cluster 3 .* reserved bits set/, offset: 3 * 65536 },
    { name: 'a misaligned L2 entry', damage: (p) => orEntry(p, L2_OFFSET + 5 * 8, 1n << 12n), read: /guest cluster 5 .* not cluster aligned/, offset: 0xa1000 },
    { name: 'a refcount table entry past the end', damage: (p) => orEntry(p, 0x10000, 1n << 40n), open: /refcount block .* past the end of the file/, offset: 2 ** 40 + 0x20000 },
  ];
  for (const c of cases) {
    const p = join(dir, `${c.name.replace(/\W+/g, '-')}.qcow2`);
    copyFileSync(full, p);
    c.damage(p);
    t.ok((qemuCheck(p).corruptions ?? 0) > 0, `${c.name}: qemu-img check reports corruption`);
    for (const readOnly of [true, false]) {
      if (c.open) {
        await t.rejects(openTestImage(p, { readOnly }), { code: 'ERR_QCOW2_CORRUPT', message: c.open, context: { offset: c.offset } }, `${c.name}: open refuses it (read-only: ${readOnly})`);
        continue;
      }
      const img = await openTestImage(p, { readOnly });
      try {
        await t.rejects(img.read(0, new Uint8Array(16 * MiB)), { code: 'ERR_QCOW2_CORRUPT', message: c.read, context: { offset: c.offset } }, `${c.name}: a read fails (read-only: ${readOnly})`);
      } finally {
        await img.close();
      }
    }
  }
});

t.test('an image whose file ends inside its last cluster is not corrupt', async (t) => {
  if (!requireTools(t, 'qemu-img')) return;
  const dir = t.testdir();
  const p = join(dir, 'empty.qcow2');
  // qemu-img ends a fresh image right after its 8-byte L1 table.
  qemuImg('create', '-q', '-f', 'qcow2', p, '1M');
  t.equal(qemuCheck(p)['check-errors'], 0);
  const img = await openTestImage(p, { readOnly: true });
  const buf = new Uint8Array(MiB).fill(1);
  await img.read(0, buf);
  await img.close();
  t.ok(buf.every((b) => b === 0), 'reads as zeroes');
});
