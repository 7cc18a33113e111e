// The checks the VM tests rely on must catch what they claim to: a torn block, a block written at
// the wrong place, and a block from another point in time.
import t from 'tap';
import { BLOCK, LINE_BYTES, blockGeneration, checkPointInTime, scanPattern } from '../lib/vm-pattern.js';

function block(index: number, gen: number): Buffer {
  const line = Buffer.from(`SHEARVM b=${String(index).padStart(10, '0')} g=${String(gen).padStart(8, '0')}\n`, 'latin1');
  if (line.length !== LINE_BYTES) throw new Error(`a pattern line is ${line.length} bytes, not ${LINE_BYTES}`);
  return Buffer.concat(Array.from({ length: BLOCK / LINE_BYTES }, () => line));
}

function image(gens: number[]): Buffer {
  return Buffer.concat(gens.map((g, i) => (g ? block(i, g) : Buffer.alloc(BLOCK))));
}

t.test('a whole pattern block reads as its generation, a zero block as 0', async (t) => {
  t.equal(blockGeneration(block(7, 42), 7), 42);
  t.equal(blockGeneration(Buffer.alloc(BLOCK), 3), 0);
  t.equal(blockGeneration(block(7, 42), 8), null, 'a block at the wrong place is not its own');
});

t.test('a block whose second half is from another generation is torn', async (t) => {
  const img = image([1, 2, 3, 4]);
  block(2, 9).copy(img, 2 * BLOCK + BLOCK / 2, BLOCK / 2);
  t.same(scanPattern(img).torn, [2]);
  const half = image([1, 2, 3, 4]);
  half.fill(0, BLOCK, BLOCK + 512);
  t.same(scanPattern(half).torn, [1], 'a block partly zero is torn too');
});

t.test('a backup compared with the paused copy names blocks from another point in time', async (t) => {
  const copy = image([3, 0, 5, 5]);
  t.same(checkPointInTime(image([3, 0, 5, 5]), copy), { torn: [], mixed: [], written: 3, newest: 5 });
  const mixed = checkPointInTime(image([3, 6, 5, 4]), copy);
  t.same(mixed.mixed, ['1:6/0', '3:4/5'], 'a newer write and an older block are both named');
  t.throws(() => checkPointInTime(copy, Buffer.concat([copy, Buffer.alloc(BLOCK)])), /bytes/);
});
