import { ShearError } from '@shear/base';
import type { BlockNode, BlockStatusExtent, ChildEdge } from '@shear/block';
import type { DirtyBitmap } from '@shear/dirty-bitmap';
import {
  BASE_ALLOCATION,
  NBD_STATE_DIRTY,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  QEMU_ALLOCATION_DEPTH,
  QEMU_DIRTY_BITMAP_PREFIX,
} from '../protocol/constants.js';
import type { WireExtent } from '../protocol/transmission.js';

/**
 * Metadata contexts of an export. IDs follow QEMU's scheme (0 base:allocation, 1
 * qemu:allocation-depth, 2 + i for bitmap i), so they are stable per export; clients treat them
 * as opaque.
 */
export type MetaContext =
  | { id: number; name: string; kind: 'allocation' }
  | { id: number; name: string; kind: 'depth' }
  | { id: number; name: string; kind: 'bitmap'; bitmap: DirtyBitmap };

export const ALLOCATION_CONTEXT_ID = 0;
export const DEPTH_CONTEXT_ID = 1;
export const FIRST_BITMAP_CONTEXT_ID = 2;
/** Backing layers followed for qemu:allocation-depth before we stop and call the rest "absent". */
const MAX_DEPTH_LAYERS = 64;

export function exportContexts(opts: { allocationDepth: boolean; bitmaps: readonly DirtyBitmap[] }): MetaContext[] {
  const out: MetaContext[] = [{ id: ALLOCATION_CONTEXT_ID, name: BASE_ALLOCATION, kind: 'allocation' }];
  if (opts.allocationDepth) out.push({ id: DEPTH_CONTEXT_ID, name: QEMU_ALLOCATION_DEPTH, kind: 'depth' });
  opts.bitmaps.forEach((bitmap, i) => out.push({ id: FIRST_BITMAP_CONTEXT_ID + i, name: QEMU_DIRTY_BITMAP_PREFIX + bitmap.name!, kind: 'bitmap', bitmap }));
  return out;
}

/**
 * NBD_OPT_LIST_META_CONTEXT: no query lists everything; `base:`, `qemu:` and
 * `qemu:dirty-bitmap:` list their namespace; other queries match one name exactly; unknown
 * namespaces and names match nothing (not an error), as QEMU does.
 */
export function listContexts(all: readonly MetaContext[], queries: readonly string[]): MetaContext[] {
  if (queries.length === 0) return [...all];
  const picked = new Set<MetaContext>();
  for (const q of queries) {
    for (const c of all) {
      if (c.name === q) picked.add(c);
      else if (q === 'base:' && c.kind === 'allocation') picked.add(c);
      else if (q === 'qemu:' && c.kind !== 'allocation') picked.add(c);
      else if (q === QEMU_DIRTY_BITMAP_PREFIX && c.kind === 'bitmap') picked.add(c);
    }
  }
  return all.filter((c) => picked.has(c));
}

/** NBD_OPT_SET_META_CONTEXT: exact names only (wildcards select nothing), in ID order. */
export function selectContexts(all: readonly MetaContext[], queries: readonly string[]): MetaContext[] {
  const names = new Set(queries);
  return all.filter((c) => names.has(c.name));
}

/** Appends (length, flags), merging with the previous extent when the flags are equal. */
function pushExtent(out: WireExtent[], length: number, flags: number): void {
  const last = out[out.length - 1];
  if (last && last.flags === flags) last.length += length;
  else out.push({ length, flags });
}

/** Loops a block status call over [offset, offset + bytes), stopping at maxExtents (after merging). */
async function walkStatus(
  status: (offset: number, bytes: number) => Promise<BlockStatusExtent[]>,
  offset: number,
  bytes: number,
  maxExtents: number,
  flagsOf: (e: BlockStatusExtent) => number,
): Promise<WireExtent[]> {
  const out: WireExtent[] = [];
  const end = offset + bytes;
  let at = offset;
  while (at < end) {
    const extents = await status(at, end - at);
    let progressed = false;
    for (const e of extents) {
      // Clip to what is still wanted; a driver answering outside the range is ignored there.
      const from = Math.max(e.offset, at);
      const to = Math.min(e.offset + e.bytes, end);
      if (from !== at || to <= from) break;
      const before = out.length;
      pushExtent(out, to - from, flagsOf(e));
      if (out.length > maxExtents) {
        // The extent that did not fit is dropped; what came before covers a prefix, which is allowed.
        out.length = before;
        return out;
      }
      at = to;
      progressed = true;
    }
    if (!progressed) break;
  }
  if (out.length === 0) throw new ShearError('ERR_IO', `Cannot report block status at ${offset}: the node returned no extents`, { offset, bytes });
  return out;
}

/** base:allocation: HOLE when no data is stored, ZERO when the range reads as zeroes. */
export function allocationFlags(e: BlockStatusExtent): number {
  return (e.data ? 0 : NBD_STATE_HOLE) | (e.zero ? NBD_STATE_ZERO : 0);
}

export function allocationExtents(edge: ChildEdge, offset: number, bytes: number, maxExtents: number): Promise<WireExtent[]> {
  return walkStatus((o, b) => edge.blockStatus(o, b), offset, bytes, maxExtents, allocationFlags);
}

/** qemu:dirty-bitmap:NAME: DIRTY for runs whose granules are set, clipped to the request. */
export function bitmapExtents(bitmap: DirtyBitmap, offset: number, bytes: number, maxExtents: number): WireExtent[] {
  const bits = bitmap.bits;
  const out: WireExtent[] = [];
  const end = offset + bytes;
  let at = offset;
  while (at < end && out.length < maxExtents) {
    const dirty = bits.get(at);
    const next = dirty ? bits.nextClear(at, end - at) : bits.nextDirty(at, end - at);
    const stop = next < 0 ? end : next;
    pushExtent(out, stop - at, dirty ? NBD_STATE_DIRTY : 0);
    at = stop;
  }
  return out;
}

/** The layer below `node` in its backing chain, looking through filters; undefined at the bottom. */
function backingOf(node: BlockNode): BlockNode | undefined {
  let n: BlockNode | undefined = node;
  for (let hops = 0; n && n.info.isFilter && hops < MAX_DEPTH_LAYERS; hops++) n = (n.child('file') ?? n.childEdges[0])?.child;
  return n?.child('backing')?.child;
}

/**
 * Runs of (bytes, depth) covering a non-empty prefix of (offset, bytes): depth 1 where `node`
 * decides the content, 2 where its backing file does, and so on; 0 where no layer does.
 */
async function depthRuns(node: BlockNode, status: (o: number, b: number) => Promise<BlockStatusExtent[]>, offset: number, bytes: number, depth: number): Promise<{ bytes: number; depth: number }[]> {
  const runs: { bytes: number; depth: number }[] = [];
  const extents = await status(offset, bytes);
  let at = offset;
  for (const e of extents) {
    const to = Math.min(e.offset + e.bytes, offset + bytes);
    if (e.offset !== at || to <= at) break;
    if (e.allocated) {
      runs.push({ bytes: to - at, depth });
    } else {
      const below = depth < MAX_DEPTH_LAYERS ? backingOf(node) : undefined;
      if (!below || below.length < to) {
        runs.push({ bytes: to - at, depth: 0 });
      } else {
        const lower = await depthRuns(below, (o, b) => below.blockStatus(o, b), at, to - at, depth + 1);
        runs.push(...lower);
        const covered = lower.reduce((s, r) => s + r.bytes, 0);
        if (covered < to - at) return runs;
      }
    }
    at = to;
  }
  return runs;
}

/** qemu:allocation-depth through the export's edge (see depthRuns). */
export async function depthExtents(edge: ChildEdge, offset: number, bytes: number, maxExtents: number): Promise<WireExtent[]> {
  const out: WireExtent[] = [];
  const end = offset + bytes;
  let at = offset;
  while (at < end) {
    const runs = await depthRuns(edge.child, (o, b) => edge.blockStatus(o, b), at, end - at, 1);
    if (runs.length === 0) break;
    for (const r of runs) {
      const before = out.length;
      pushExtent(out, r.bytes, r.depth);
      if (out.length > maxExtents) {
        out.length = before;
        return out;
      }
      at += r.bytes;
    }
  }
  if (out.length === 0) throw new ShearError('ERR_IO', `Cannot report allocation depth at ${offset}: the node returned no extents`, { offset, bytes });
  return out;
}
