/**
 * Micro-benchmark of the request table's hot paths at realistic in-flight counts.
 * Prints ns/op (median of RUNS runs) for RequestTable and, for comparison, for the
 * alternative it was measured against (entries sorted by offset, binary search with a
 * max-length bound). Run from the repo root:
 *   npm run bench -- reqlist
 */
import { RequestTable, type RequestKind } from '@shear/reqlist';

const CLUSTER_BYTES = 64 * 1024;
const DISK_BYTES = 100 * 1024 ** 3;
const KINDS: readonly RequestKind[] = ['snapshot-read', 'cbw-copy', 'guest-write', 'copy-task'];
const RUNS = 7;
const OPS = 200_000;
const SIZES = [16, 64, 128, 256, 1024];

interface Range {
  offset: number;
  bytes: number;
  kind: RequestKind;
}

/** Deterministic LCG so every run measures the same workload. */
function random(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

/** 1-16 clusters at a cluster-aligned offset: the shape of copy tasks and NBD reads. */
function randomRange(rnd: () => number): Range {
  const clusters = 1 + Math.floor(rnd() * 16);
  const offset = Math.floor(rnd() * (DISK_BYTES / CLUSTER_BYTES - 16)) * CLUSTER_BYTES;
  return { offset, bytes: clusters * CLUSTER_BYTES, kind: KINDS[Math.floor(rnd() * KINDS.length)]! };
}

interface Candidate {
  add(r: Range): unknown;
  remove(handle: unknown): void;
  find(offset: number, bytes: number, kind: RequestKind): unknown;
}

function tableCandidate(): Candidate {
  const table = new RequestTable();
  return {
    add: (r) => table.add(r.offset, r.bytes, r.kind),
    remove: (h) => (h as ReturnType<RequestTable['add']>).remove(),
    find: (o, b, k) => table.findConflict(o, b, k),
  };
}

/** The alternative: sorted by offset; a request overlapping [o, e) starts in (o - maxBytes, e). */
function sortedCandidate(): Candidate {
  const entries: Range[] = [];
  let maxBytes = 0;
  const lowerBound = (x: number): number => {
    let lo = 0;
    let hi = entries.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (entries[mid]!.offset < x) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  };
  return {
    add(r) {
      const e = { ...r };
      entries.splice(lowerBound(e.offset + 1), 0, e);
      if (e.bytes > maxBytes) maxBytes = e.bytes;
      return e;
    },
    remove(h) {
      let i = lowerBound((h as Range).offset);
      while (entries[i] !== h) i++;
      entries.splice(i, 1);
      if (entries.length === 0) maxBytes = 0;
    },
    find(o, b, k) {
      const end = o + b;
      for (let i = lowerBound(o - maxBytes + 1); i < entries.length; i++) {
        const r = entries[i]!;
        if (r.offset >= end) return undefined;
        if (o < r.offset + r.bytes && (k !== 'snapshot-read' || r.kind !== 'snapshot-read')) return r;
      }
      return undefined;
    },
  };
}

type Mode = 'find-miss' | 'find-hit' | 'add+remove';

function measure(make: () => Candidate, n: number, mode: Mode): number {
  const rnd = random(1000 + n);
  const c = make();
  const live: { range: Range; handle: unknown }[] = [];
  for (let i = 0; i < n; i++) {
    const range = randomRange(rnd);
    live.push({ range, handle: c.add(range) });
  }
  const queries: Range[] = [];
  for (let i = 0; i < 4096; i++) {
    if (mode === 'find-hit') {
      const target = live[i % n]!.range;
      queries.push({ offset: target.offset + target.bytes - CLUSTER_BYTES, bytes: CLUSTER_BYTES, kind: 'guest-write' });
    } else {
      queries.push(randomRange(rnd));
    }
  }
  let sink = 0;
  const samples: number[] = [];
  for (let run = 0; run < RUNS; run++) {
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < OPS; i++) {
      const q = queries[i & 4095]!;
      if (mode === 'add+remove') {
        const slot = live[i % n]!;
        c.remove(slot.handle);
        slot.range = q;
        slot.handle = c.add(q);
      } else if (c.find(q.offset, q.bytes, 'guest-write') !== undefined) {
        sink++;
      }
    }
    samples.push(Number(process.hrtime.bigint() - t0) / OPS);
  }
  if (sink < 0) console.log(sink);
  samples.sort((a, b) => a - b);
  return samples[RUNS >> 1]!;
}

const modes: Mode[] = ['find-miss', 'find-hit', 'add+remove'];
console.log(`reqlist micro-benchmark: ns/op, median of ${RUNS} runs of ${OPS} ops (node ${process.version})`);
console.log(['in-flight', ...modes.map((m) => `table ${m}`), ...modes.map((m) => `sorted ${m}`)].join('\t'));
for (const n of SIZES) {
  const row = [String(n)];
  for (const make of [tableCandidate, sortedCandidate]) {
    for (const mode of modes) row.push(measure(make, n, mode).toFixed(1));
  }
  console.log(row.join('\t'));
}
