import t from 'tap';
import { statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { FileDriver } from '@shear/block';
import { requireTools } from '@shear/testkit';
import { Qcow2Image, type GrowableIO } from './index.js';
import { patternBytes, qemuCheck, qemuCompare, qemuImg, qemuIo, qemuMap } from './test-qemu.fixture.js';

const C = 65536;

// The block package's file driver is a GrowableIO as it is.
const asGrowable = (f: FileDriver): GrowableIO => f;

t.test('qcow2 over the real file driver (writes never grow the file by themselves)', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = t.testdir();
  const made = join(dir, 'made.qcow2');
  const img = await Qcow2Image.create(asGrowable(await FileDriver.open(made, { create: { size: 0 } })), { size: 32 * C + 512 });
  const model = new Uint8Array(img.length);
  for (const [off, len, seed] of [[100, 3 * C, 1], [10 * C, C, 2], [img.length - 1000, 1000, 3]] as const) {
    const d = patternBytes(len, seed);
    await img.write(off, d);
    model.set(d, off);
  }
  await img.writeZeroes(C, C, { mayUnmap: true });
  model.fill(0, C, 2 * C);
  await img.discard(10 * C, C);
  model.fill(0, 10 * C, 11 * C);
  await img.writeCompressed(20 * C, new Uint8Array(C).fill(5));
  model.fill(5, 20 * C, 21 * C);
  await img.close();
  const c = qemuCheck(made);
  t.equal(c['check-errors'], 0);
  t.notOk(c.leaks);
  writeFileSync(`${made}.raw`, model);
  t.ok(qemuCompare(made, 'qcow2', `${made}.raw`, 'raw').same, 'equal to the model');

  // qemu leaves the file ending inside its last cluster; writing there must grow it first.
  const q = join(dir, 'q.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', q, '4M');
  qemuIo(q, ['write -P 7 0 512']);
  const [first] = qemuMap(q);
  truncateSync(q, first!.offset! + 4096);
  const qi = await Qcow2Image.open(await FileDriver.open(q));
  const d = patternBytes(1000, 4);
  await qi.write(1000, d);
  await qi.close();
  t.equal(statSync(q).size % C, 0, 'the file was grown to whole clusters');
  const qm = new Uint8Array(4 * 1024 * 1024);
  qm.fill(7, 0, 512);
  qm.set(d, 1000);
  writeFileSync(`${q}.raw`, qm);
  t.equal(qemuCheck(q)['check-errors'], 0);
  t.ok(qemuCompare(q, 'qcow2', `${q}.raw`, 'raw').same, 'equal after writing into qemu data');
});
