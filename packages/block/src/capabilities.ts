import type { DirtyBitmap } from '@shear/dirty-bitmap';
import type { HostMappable } from './host-mapping.js';
import type { BlockStatusExtent } from './io.js';
import type { BlockNode, ChildEdge } from './node.js';

/*
 * What a driver can do beyond BlockIO, found by what it offers rather than by its class (as
 * isHostMappable does), so the graph, the daemon and the jobs work with any driver that offers
 * it, and a new driver plugs in by implementing the members. Each guard checks the members a
 * caller uses; drivers that do not offer a capability simply lack them.
 */

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null;
const hasMethods = (v: unknown, ...names: string[]): boolean => isObject(v) && names.every((n) => typeof v[n] === 'function');

/** The node's bytes are a file on the host (query output names it; backing and sidecar paths are relative to it). */
export interface HostFile {
  readonly path: string;
  /** Opened with O_DIRECT (query-named-block-nodes' cache.direct). */
  readonly direct: boolean;
}

export function hasHostFile(io: unknown): io is HostFile {
  return isObject(io) && typeof io['path'] === 'string' && typeof io['direct'] === 'boolean';
}

/** The driver can change its length (a file under a growing image format). */
export interface Resizable {
  truncate(length: number): Promise<void>;
}

export function isResizable(io: unknown): io is Resizable {
  return hasMethods(io, 'truncate');
}

/**
 * The driver can say where its data is on the host, computed when asked (it may depend on the
 * driver's options or children: an O_DIRECT file offers none). Drivers whose mapping is fixed
 * implement HostMappable themselves instead.
 */
export interface HostMappingSource {
  hostMapping(): HostMappable | undefined;
}

export function hasHostMappingSource(io: unknown): io is HostMappingSource {
  return hasMethods(io, 'hostMapping');
}

type Bits = DirtyBitmap['bits'];

/** A bitmap as a driver stores it. `bits` null: stored while in use, so not trusted (inconsistent). */
export interface StoredBitmapRecord {
  readonly name: string;
  readonly granularity: number;
  readonly enabled: boolean;
  readonly bits: Bits | null;
}

export interface BitmapRecordToStore {
  readonly name: string;
  readonly granularity: number;
  readonly enabled: boolean;
  readonly bits: Bits;
}

/**
 * The driver keeps persistent dirty bitmaps inside its own data (qcow2's bitmaps extension).
 * Drivers without it but with a HostFile keep them in a sidecar file (blockdev decides).
 */
export interface PersistentBitmapStore {
  /**
   * The stored bitmaps: read from disk for a read-only node; for a writable one, those taken
   * when it opened (marked in use on disk from then on).
   */
  storedBitmaps(readOnly: boolean): Promise<readonly StoredBitmapRecord[]>;
  /** Adds or replaces the named bitmaps; `inUse` false stores them consistent. */
  storeBitmaps(bitmaps: readonly BitmapRecordToStore[], opts: { inUse: boolean }): Promise<void>;
  /** Names the store does not hold are ignored. */
  removeBitmaps(names: readonly string[]): Promise<void>;
}

export function hasPersistentBitmapStore(io: unknown): io is PersistentBitmapStore {
  return hasMethods(io, 'storedBitmaps', 'storeBitmaps', 'removeBitmaps');
}

/**
 * A filter that keeps a point in time of its file child by copying old data to a target child
 * before it is overwritten (copy-before-write): a point-in-time view reads through it.
 */
export interface SnapshotSource {
  readonly length: number;
  snapshotRead(offset: number, buf: Uint8Array): Promise<void>;
  /** The reader is done with the range: its preserved data may go. @returns bytes dropped from the view */
  snapshotDiscard(offset: number, bytes: number): Promise<number>;
  snapshotBlockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]>;
  /** Where preserved data goes. */
  readonly targetEdge: ChildEdge;
}

export function isSnapshotSource(io: unknown): io is SnapshotSource {
  return hasMethods(io, 'snapshotRead', 'snapshotDiscard', 'snapshotBlockStatus') && isObject((io as { targetEdge?: unknown }).targetEdge);
}

/**
 * A read-only point-in-time view of a disk (snapshot-access): exported for fleecing (readers
 * discard what they have read), and backed up first from the data it preserved.
 */
export interface PointInTimeView {
  /** The node holding the data preserved for the view (the copy-before-write target). */
  preservedDataNode(): BlockNode;
}

export function isPointInTimeView(io: unknown): io is PointInTimeView {
  return hasMethods(io, 'preservedDataNode');
}

/**
 * A target that holds preserved data in bounded space (the fleecing cache): writers wait up to
 * `spaceWaitMs` for space; readers that drain it free space; its state shows in query output.
 */
export interface BoundedCache {
  spaceWaitMs: number;
  /** The ranges it holds now, so a backup can copy them first and let it drain. */
  heldRanges(): Iterable<{ offset: number; bytes: number }>;
  /** Occupancy, spills and drains, for query-named-block-nodes and query-jobs (`x-shear-cache`). */
  info(): Record<string, unknown>;
}

export function isBoundedCache(io: unknown): io is BoundedCache {
  return hasMethods(io, 'heldRanges', 'info') && typeof (io as { spaceWaitMs?: unknown }).spaceWaitMs === 'number';
}
