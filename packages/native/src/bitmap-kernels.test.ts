import t from 'tap';
import fc from 'fast-check';
import { JS_BITMAP_KERNELS, loadAddonBitmapKernels, type BitmapKernels } from './bitmap-kernels.js';

/** The meaning of orWords, one bit at a time. */
function reference(dst: Int32Array, src: Int32Array, summary: Int32Array): number {
  let added = 0;
  for (let i = 0; i < src.length; i++) {
    for (let b = 0; b < 32; b++) {
      if (((src[i]! >>> b) & 1) === 1 && ((dst[i]! >>> b) & 1) === 0) added++;
    }
    if (dst[i] === 0 && src[i] !== 0) summary[i >>> 5]! |= 1 << (i & 31);
    dst[i]! |= src[i]!;
  }
  return added;
}

const words = fc.array(fc.oneof(fc.constant(0), fc.constant(-1), fc.integer({ min: -(2 ** 31), max: 2 ** 31 - 1 })), { maxLength: 200 });

function checkKernel(t: Tap.Test, kernels: BitmapKernels): void {
  fc.assert(
    fc.property(words, words, fc.nat(3), (d, s, pad) => {
      const n = Math.min(d.length, s.length);
      // Offsets inside larger arrays, as the bitmap's levels sit inside one buffer.
      const dst = new Int32Array(new SharedArrayBuffer((n + pad) * 4 + 4 * 40));
      dst.set(d.slice(0, n), pad);
      const src = new Int32Array(n + 1);
      src.set(s.slice(0, n), 1);
      const summaryAt = n + pad + 2;
      const expectDst = Int32Array.from(dst.subarray(pad, pad + n));
      // The summary starts true of the target, as in a bitmap: a bit for every non-zero word.
      const expectSummary = new Int32Array(Math.ceil(n / 32));
      for (let i = 0; i < n; i++) if (expectDst[i] !== 0) expectSummary[i >>> 5]! |= 1 << (i & 31);
      dst.set(expectSummary, summaryAt);
      const expected = reference(expectDst, src.subarray(1), expectSummary);
      const added = kernels.orWords(dst, pad, src, 1, n, dst, summaryAt);
      return added === expected && expectDst.every((v, i) => dst[pad + i] === v) && expectSummary.every((v, i) => dst[summaryAt + i] === v);
    }),
    { numRuns: 300 },
  );
  t.throws(() => kernels.orWords(new Int32Array(4), 2, new Int32Array(4), 0, 3, new Int32Array(1), 0), kernels.kind === 'addon' ? { code: 'ERR_INVALID_ARGUMENT' } : undefined, 'a range past the end is refused, not written');
}

declare namespace Tap {
  type Test = { throws(fn: () => unknown, wanted?: object, msg?: string): void };
}

t.test('the JS kernel ORs, counts the new bits and marks words that turned non-zero', async (t) => {
  checkKernel(t, {
    kind: 'js',
    // The JS kernel has no bounds check of its own (typed arrays ignore stores past the end):
    // check what the bitmap relies on, that in-range calls are exact, and add the guard here.
    orWords: (dst, di, src, si, n, sum, sumI) => {
      if (di + n > dst.length || si + n > src.length) throw new RangeError('past the end');
      return JS_BITMAP_KERNELS.orWords(dst, di, src, si, n, sum, sumI);
    },
  });
});

t.test('the addon kernel does the same and refuses ranges past the end', async (t) => {
  const addon = loadAddonBitmapKernels();
  if (!addon) {
    if (process.env['CI']) t.fail('the native addon did not build, so its bitmap kernel is untested');
    else t.comment('SKIP LOUDLY: the native addon is not built; its bitmap kernel is untested here');
    return;
  }
  checkKernel(t, addon);
  t.throws(() => addon.orWords(new Int32Array(4), 0, new Float64Array(4) as unknown as Int32Array, 0, 1, new Int32Array(1), 0), { code: 'ERR_INVALID_ARGUMENT' }, 'only Int32Arrays');
  t.throws(() => addon.orWords(new Int32Array(4), 0, new Int32Array(4), 0, 4, new Int32Array(0), 0), { code: 'ERR_INVALID_ARGUMENT' }, 'a summary too short is refused');
});
