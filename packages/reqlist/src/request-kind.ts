/**
 * What an in-flight range is doing. The kind decides which overlaps must be serialised:
 * - `snapshot-read`: a read of the point-in-time view that falls through to the live source
 *   (it must not see a write land under it).
 * - `cbw-copy`: copy-before-write moving old data of a range to the target / fleecing cache.
 * - `guest-write`: a write to the live source (after its CBW copy, or covering it).
 * - `copy-task`: a background block-copy task of a backup job.
 */
export type RequestKind = 'snapshot-read' | 'cbw-copy' | 'guest-write' | 'copy-task';

export const REQUEST_KINDS: readonly RequestKind[] = ['snapshot-read', 'cbw-copy', 'guest-write', 'copy-task'];

export function isRequestKind(value: unknown): value is RequestKind {
  return value === 'snapshot-read' || value === 'cbw-copy' || value === 'guest-write' || value === 'copy-task';
}

/**
 * Whether two overlapping requests of these kinds must not run at once. Readers of the
 * point-in-time view never exclude each other (QEMU once asserted on overlapping fleecing
 * reads: upstream 6475155d); every other overlapping pair is serialised.
 */
export function kindsConflict(a: RequestKind, b: RequestKind): boolean {
  return a !== 'snapshot-read' || b !== 'snapshot-read';
}
