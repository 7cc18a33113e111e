/**
 * QEMU's permission model. Every edge from a parent (a node or a user such as an export or a
 * job) to a child node states what the parent needs (`perm`) and what it lets the other parents
 * of that child do (`shared`). Two parents of one node conflict when one needs what the other
 * does not share. A point-in-time reader takes CONSISTENT_READ and does not share WRITE, so
 * no writer can be attached beside it, and it cannot be attached beside a writer.
 */
export const PERM_CONSISTENT_READ = 1;
export const PERM_WRITE = 2;
/** Writes that do not change what a reader sees (copy-on-read, a CBW target filling holes). */
export const PERM_WRITE_UNCHANGED = 4;
export const PERM_RESIZE = 8;
export const PERM_ALL = PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE;

const NAMES: [number, string][] = [
  [PERM_CONSISTENT_READ, 'consistent-read'],
  [PERM_WRITE, 'write'],
  [PERM_WRITE_UNCHANGED, 'write-unchanged'],
  [PERM_RESIZE, 'resize'],
];

export function permNames(mask: number): string[] {
  return NAMES.filter(([bit]) => (mask & bit) !== 0).map(([, name]) => name);
}

export interface PermPair {
  perm: number;
  shared: number;
}

/**
 * How a driver derives what it needs from a child, given what its own parents need of it
 * (`parent`: OR of their perms, AND of their shared), whether the node is read-only, and how
 * many parents it has (a filter not yet inserted may behave differently from one in use).
 */
export type ChildPermsFn = (role: string, parent: PermPair, readOnly: boolean, parentCount: number) => PermPair;

/** Filters pass their parents' needs through unchanged (QEMU's bdrv_filter_default_perms). */
export const filterChildPerms: ChildPermsFn = (_role, parent) => ({ perm: parent.perm, shared: parent.shared });

/**
 * A format driver's storage child (qcow2's `file`): metadata needs consistent reads always and
 * writes whenever the node is writable, even with no parent; no one else may write to or resize
 * the file under the format (QEMU's bdrv_default_perms_for_storage).
 */
export const storageChildPerms: ChildPermsFn = (_role, parent, readOnly) => {
  let perm = parent.perm | PERM_CONSISTENT_READ;
  if (!readOnly) perm |= PERM_WRITE | PERM_RESIZE;
  if (perm & PERM_WRITE_UNCHANGED) perm |= PERM_WRITE;
  return { perm, shared: parent.shared & ~(PERM_WRITE | PERM_RESIZE) };
};

/**
 * A backing file: only consistent reads pass down; others may write it only if every parent
 * of the overlay shares writes (QEMU's bdrv_default_perms_for_cow).
 */
export const backingChildPerms: ChildPermsFn = (_role, parent) => ({
  perm: parent.perm & PERM_CONSISTENT_READ,
  shared: ((parent.shared & PERM_WRITE) !== 0 ? PERM_WRITE | PERM_RESIZE : 0) | PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
});

/** The rule most formats use: storage for `file`, COW for `backing`, pass-through otherwise. */
export const formatChildPerms: ChildPermsFn = (role, parent, readOnly, parentCount) => {
  if (role === 'backing') return backingChildPerms(role, parent, readOnly, parentCount);
  if (role === 'file') return storageChildPerms(role, parent, readOnly, parentCount);
  return filterChildPerms(role, parent, readOnly, parentCount);
};
