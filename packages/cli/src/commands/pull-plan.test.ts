import t from 'tap';
import fc from 'fast-check';
import { CHUNK_BYTES } from '../backup-manifest.js';
import { parseNbdUri } from '@shear/nbd';
import { piecesByChunk, type PlannedExtent } from './pull-source.js';
import { chunksOf, runsOf } from './pull-state.js';

/** Sorted, disjoint planned extents over a disk of up to 8 chunks. */
const plans = fc
  .array(fc.tuple(fc.integer({ min: 0, max: 8 * CHUNK_BYTES - 1 }), fc.integer({ min: 1, max: 3 * CHUNK_BYTES }), fc.constantFrom<'copy' | 'zero'>('copy', 'zero')), { maxLength: 12 })
  .map((xs) => {
    const out: PlannedExtent[] = [];
    let at = 0;
    for (const [gap, bytes, action] of xs.sort((a, b) => a[0] - b[0])) {
      const offset = Math.max(at, gap);
      out.push({ offset, bytes, action });
      at = offset + bytes;
    }
    return out;
  });

t.test('piecesByChunk: every byte of the plan in exactly one piece, each piece inside its chunk', async (t) => {
  fc.assert(
    fc.property(plans, (plan) => {
      const m = piecesByChunk(plan);
      const pieces = [...m.entries()].flatMap(([i, ps]) => ps.map((p) => ({ i, ...p })));
      for (const p of pieces) {
        if (Math.floor(p.offset / CHUNK_BYTES) !== p.i || p.offset + p.bytes > (p.i + 1) * CHUNK_BYTES || p.bytes <= 0) return false;
      }
      // Same bytes with the same actions, in order.
      const flat = (xs: PlannedExtent[]): string => xs.flatMap((e) => [`${e.offset}:${e.action}`, `${e.offset + e.bytes}`]).join(',');
      const merge = (xs: PlannedExtent[]): PlannedExtent[] => {
        const o: PlannedExtent[] = [];
        for (const e of xs) {
          const l = o[o.length - 1];
          if (l && l.action === e.action && l.offset + l.bytes === e.offset) l.bytes += e.bytes;
          else o.push({ ...e });
        }
        return o;
      };
      const sorted = pieces.sort((a, b) => a.offset - b.offset);
      return flat(merge(sorted)) === flat(merge(plan));
    }),
  );
});

t.test('runsOf and chunksOf are inverse; runs are sorted, disjoint and not adjacent', async (t) => {
  fc.assert(
    fc.property(fc.uniqueArray(fc.integer({ min: 0, max: 200 }), { maxLength: 60 }), (xs) => {
      const runs = runsOf(xs);
      for (let k = 1; k < runs.length; k++) if (runs[k]![0] <= runs[k - 1]![1]) return false;
      return [...chunksOf(runs)].sort((a, b) => a - b).join() === [...xs].sort((a, b) => a - b).join();
    }),
  );
});

t.test('source URLs', async (t) => {
  t.same(parseNbdUri('nbd+unix:///vda?socket=/run/x/vm1.sock', '--source'), { address: { type: 'unix', path: '/run/x/vm1.sock' }, exportName: 'vda' });
  t.same(parseNbdUri('nbd://127.0.0.1:10810/sda', '--source'), { address: { type: 'inet', host: '127.0.0.1', port: 10810 }, exportName: 'sda' });
  t.same(parseNbdUri('nbd://[::1]/', '--source'), { address: { type: 'inet', host: '::1', port: 10809 }, exportName: '' });
  t.same(parseNbdUri('nbd+unix:///a%20b?socket=s', '--source'), { address: { type: 'unix', path: 's' }, exportName: 'a b' });
  for (const bad of ['nbd+unix:///vda', 'nbds://h/x', 'nbd:///x', 'not a url', 'nbd://h:99999/x']) {
    t.throws(() => parseNbdUri(bad, '--source'), { code: 'ERR_INVALID_ARGUMENT' }, bad);
  }
});
