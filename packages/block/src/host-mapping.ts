import type { WireError } from '@shear/base';

/**
 * Where a range of a node lives on the host, so that worker threads can move its bytes with
 * plain pread/pwrite on file descriptors, never touching graph objects. Extents cover the
 * requested range exactly, in order.
 *
 * - `fd`: the bytes are at `hostOffset` in the open file `fd` (shared by every thread of the
 *   process; the node that owns the fd keeps it open while any mapping is in use).
 * - `zero`: the range reads as zeroes (a hole, a zero cluster, beyond a backing file's end).
 * - `error`: reading or writing the range fails with this error (error injection resolves its
 *   rules when the mapping is made, so the worker reports the failure as a real I/O error).
 */
export type HostExtent =
  | { kind: 'fd'; fd: number; hostOffset: number; bytes: number }
  | { kind: 'zero'; bytes: number }
  | { kind: 'error'; bytes: number; error: WireError };

/**
 * A place to write a range, prepared by the coordinator. The worker writes the data into the
 * `fd` extents; then the coordinator calls `commit` (a format links the new clusters into its
 * metadata only now, so a crash can leak clusters but never expose unwritten ones) or `abort`.
 */
export interface WriteMapping {
  extents: HostExtent[];
  commit(): Promise<void>;
  abort(): Promise<void>;
}

/**
 * Implemented by drivers whose data worker threads can reach directly; a driver may offer one
 * direction only (a format that maps writes but not reads). Coordinator-only calls.
 */
export interface HostMappable {
  mapRead?(offset: number, bytes: number): Promise<HostExtent[]>;
  mapWrite?(offset: number, bytes: number): Promise<WriteMapping>;
}

export function isHostMappable(io: unknown): io is HostMappable {
  return typeof (io as HostMappable)?.mapRead === 'function' || typeof (io as HostMappable)?.mapWrite === 'function';
}
