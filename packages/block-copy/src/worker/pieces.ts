import type { HostExtent } from '@shear/block';

/** Calls `fn` for each part of `extents` inside [at, at + bytes), with the position in that window. */
export function forEachPiece(extents: HostExtent[], at: number, bytes: number, fn: (e: HostExtent, within: number, pos: number, n: number) => void): void {
  let base = 0;
  for (const e of extents) {
    const end = base + e.bytes;
    if (end > at && base < at + bytes) {
      const from = Math.max(at, base);
      const to = Math.min(at + bytes, end);
      fn(e, from - base, from - at, to - from);
    }
    base = end;
    if (base >= at + bytes) break;
  }
}

/** Whether every extent touching [at, at + bytes) is a file extent. */
export function allFileExtents(extents: HostExtent[], at: number, bytes: number): boolean {
  let all = true;
  forEachPiece(extents, at, bytes, (e) => {
    if (e.kind !== 'fd') all = false;
  });
  return all;
}
