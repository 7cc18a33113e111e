import t from 'tap';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import path from 'node:path';
import { FileDriver } from '@shear/block';
import { fileMapping } from '../../block/src/drivers/file-mapping.js';
import { executeParts, type ExecuteContext } from './execute-range.js';

const KiB = 1024;

t.test('a batch of parts without a pool (a small batch promoted to copy-before-write runs inline) is copied part by part', async (t) => {
  const dir = t.testdir();
  const content = randomBytes(1024 * KiB);
  fs.writeFileSync(path.join(dir, 'src'), content);
  const src = await FileDriver.open(path.join(dir, 'src'), { readOnly: true });
  const dst = await FileDriver.open(path.join(dir, 'dst'), { create: { size: content.length } });
  t.teardown(async () => {
    await src.close();
    await dst.close();
  });
  const ctx: ExecuteContext = {
    source: { io: src, mapping: fileMapping(src) },
    target: { io: dst, mapping: fileMapping(dst) },
    pool: undefined,
    chunkBytes: 64 * KiB,
    dropCache: false,
    inKernelCopy: true,
    skipUnallocated: false,
    targetIsZero: true,
    cancel: new Int32Array(new SharedArrayBuffer(4)),
    cancelIndex: 0,
  };
  const parts: [number, number][] = [[64 * KiB, 64 * KiB], [256 * KiB, 128 * KiB], [960 * KiB, 64 * KiB]];
  const r = await executeParts(ctx, parts);
  t.same(r, { ok: true, copiedBytes: 256 * KiB, skippedBytes: 0 });
  const out = fs.readFileSync(path.join(dir, 'dst'));
  for (const [o, b] of parts) t.ok(out.subarray(o, o + b).equals(content.subarray(o, o + b)), `part (${o}, ${b})`);
  t.ok(out.subarray(0, 64 * KiB).equals(Buffer.alloc(64 * KiB)), 'nothing outside the parts');
});
