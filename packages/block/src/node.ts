import { ShearError } from '@shear/base';
import { NodeBitmaps } from '@shear/dirty-bitmap';
import type { BlockIO, BlockStatusExtent, WriteOptions, WriteZeroesOptions } from './io.js';
import { isHostMappable, type HostMappable, type WriteMapping } from './host-mapping.js';
import { hasHostMappingSource, isResizable } from './capabilities.js';
import { PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED, permNames, type ChildPermsFn } from './permissions.js';

/** A parent that is not a node: an export, a job, the CLI. */
export interface BlockUser {
  readonly kind: 'user';
  readonly name: string;
}

export type Parent = BlockNode | BlockUser;

export function parentName(p: Parent): string {
  return p instanceof BlockNode ? `node "${p.name}"` : `user "${p.name}"`;
}

/**
 * An edge from a parent to a child node, with a role (`file`, `backing`, `target`, ...) and the
 * permissions the parent holds. Parents do all I/O on a child through its edge, so an edge that
 * lacks a permission cannot be used for that kind of I/O. Graph edits move edges from one child
 * to another (filter insertion); the edge object stays, so a driver holding it follows along.
 */
export class ChildEdge implements BlockIO {
  readonly parent: Parent;
  readonly role: string;
  #child: BlockNode;
  perm: number;
  shared: number;
  /** Whether perm/shared are derived from the parent node's driver (false: set by a user). */
  readonly derived: boolean;

  /** @internal Created by BlockGraph. */
  constructor(parent: Parent, role: string, child: BlockNode, perm: number, shared: number, derived: boolean) {
    this.parent = parent;
    this.role = role;
    this.#child = child;
    this.perm = perm;
    this.shared = shared;
    this.derived = derived;
  }

  get child(): BlockNode {
    return this.#child;
  }

  /** @internal Moves the edge to another child; only BlockGraph does this, inside a transaction. */
  setChild(child: BlockNode): void {
    this.#child.parentEdges.delete(this);
    this.#child = child;
    child.parentEdges.add(this);
  }

  get length(): number {
    return this.#child.length;
  }

  #need(perm: number, op: string): void {
    if ((this.perm & perm) === 0) {
      throw new ShearError('ERR_BLOCK_PERMISSION_MISSING', `Cannot ${op} node "${this.#child.name}" from ${parentName(this.parent)}: the edge holds only [${permNames(this.perm).join(', ')}]`, { node: this.#child.name, op });
    }
  }

  /**
   * Runs `fn` on the child the edge points to once that child is not drained. A drain holds
   * new requests back while the graph changes; a request held back this way goes to whatever
   * child the edge points to afterwards (the source again, once a filter is gone).
   */
  async #route<T>(fn: (child: BlockNode) => Promise<T>): Promise<T> {
    let child = this.#child;
    for (let gate = child.drainGate; gate; gate = child.drainGate) {
      await gate;
      child = this.#child;
    }
    return fn(child);
  }

  read(offset: number, buf: Uint8Array): Promise<void> {
    return this.#route((c) => c.read(offset, buf));
  }
  write(offset: number, buf: Uint8Array, opts?: WriteOptions): Promise<void> {
    this.#need(PERM_WRITE | PERM_WRITE_UNCHANGED, 'write to');
    return this.#route((c) => c.write(offset, buf, opts));
  }
  writeZeroes(offset: number, bytes: number, opts?: WriteZeroesOptions): Promise<void> {
    this.#need(PERM_WRITE | PERM_WRITE_UNCHANGED, 'write zeroes to');
    return this.#route((c) => c.writeZeroes(offset, bytes, opts));
  }
  discard(offset: number, bytes: number): Promise<void> {
    this.#need(PERM_WRITE, 'discard on');
    return this.#route((c) => c.discard(offset, bytes));
  }
  flush(): Promise<void> {
    return this.#route((c) => c.flush());
  }
  blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    return this.#route((c) => c.blockStatus(offset, bytes));
  }
  /** Resizes the child (a format growing its image file); needs the resize permission. */
  truncate(length: number): Promise<void> {
    this.#need(PERM_RESIZE, 'resize');
    return this.#route((c) => c.truncate(length));
  }
  /** Direct host access for worker threads, with this edge's permissions; undefined if the child cannot be mapped. */
  hostMapping(): HostMappable | undefined {
    const m = this.#child.hostMapping();
    if (!m) return undefined;
    const mapped: HostMappable = {};
    if (m.mapRead) mapped.mapRead = m.mapRead.bind(m);
    if (m.mapWrite) {
      const mapWrite = m.mapWrite.bind(m);
      mapped.mapWrite = (offset, bytes) => {
        this.#need(PERM_WRITE | PERM_WRITE_UNCHANGED, 'write to');
        return mapWrite(offset, bytes);
      };
    }
    return mapped;
  }

  /** Closing an edge never closes the child: the graph owns nodes. */
  async close(): Promise<void> {}
}

/** What a driver declares about itself to the graph. */
export interface DriverInfo {
  /** QEMU's driver name (`file`, `qcow2`, `copy-before-write`, ...). */
  name: string;
  childPerms: ChildPermsFn;
  /** A filter is transparent: it has one primary child and the same content (QEMU's is_filter). */
  isFilter?: boolean;
  /** Bytes per cluster of the format, if it has clusters; used for default bitmap granularity. */
  clusterBytes?: number;
}

/**
 * A node of the block graph: a driver instance plus its name, edges and dirty bitmaps.
 *
 * Every write through the node (write, write zeroes, discard) sets the node's recording dirty
 * bitmaps for the range after the driver is done with it and before the caller is answered,
 * also when the driver fails (a failed write may have changed part of the range). So no write
 * can complete without being tracked.
 */
export class BlockNode implements BlockIO {
  readonly name: string;
  readonly info: DriverInfo;
  readonly readOnly: boolean;
  /** Edges to this node's children, in the order the driver declared them. */
  readonly childEdges: ChildEdge[] = [];
  /** Edges from this node's parents; maintained by ChildEdge and BlockGraph. */
  readonly parentEdges = new Set<ChildEdge>();
  #driver: BlockIO | null = null;
  #bitmaps: NodeBitmaps | null = null;
  #inflight = 0;
  #drainWaiters: (() => void)[] = [];
  #closeHooks: (() => Promise<void>)[] = [];
  #drainGate: Promise<void> | undefined;
  #writeGate: (() => Promise<void> | undefined) | undefined;

  /** @internal Created by BlockGraph.addNode. */
  constructor(name: string, info: DriverInfo, readOnly: boolean) {
    this.name = name;
    this.info = info;
    this.readOnly = readOnly;
  }

  /** @internal Installs the opened driver. */
  attachDriver(driver: BlockIO): void {
    this.#driver = driver;
    this.#bitmaps = new NodeBitmaps(this.name, driver.length, this.info.clusterBytes !== undefined ? { clusterBytes: this.info.clusterBytes } : {});
  }

  get driver(): BlockIO {
    if (!this.#driver) throw new ShearError('ERR_CLOSED', `Cannot use node "${this.name}": it is not open`, { node: this.name });
    return this.#driver;
  }

  get isOpen(): boolean {
    return this.#driver !== null;
  }

  get bitmaps(): NodeBitmaps {
    if (!this.#bitmaps) throw new ShearError('ERR_CLOSED', `Cannot use node "${this.name}": it is not open`, { node: this.name });
    return this.#bitmaps;
  }

  get length(): number {
    return this.driver.length;
  }

  child(role: string): ChildEdge | undefined {
    return this.childEdges.find((e) => e.role === role);
  }

  /** The cumulative needs of the parents: OR of perms, AND of shared. */
  parentPerms(): { perm: number; shared: number } {
    let perm = 0;
    let shared = -1;
    for (const e of this.parentEdges) {
      perm |= e.perm;
      shared &= e.shared;
    }
    return { perm, shared: shared & 0xf };
  }

  read(offset: number, buf: Uint8Array): Promise<void> {
    return this.#track(() => this.driver.read(offset, buf));
  }

  write(offset: number, buf: Uint8Array, opts?: WriteOptions): Promise<void> {
    return this.#trackWrite(offset, buf.length, () => this.driver.write(offset, buf, opts));
  }

  writeZeroes(offset: number, bytes: number, opts?: WriteZeroesOptions): Promise<void> {
    return this.#trackWrite(offset, bytes, () => this.driver.writeZeroes(offset, bytes, opts));
  }

  discard(offset: number, bytes: number): Promise<void> {
    return this.#trackWrite(offset, bytes, () => this.driver.discard(offset, bytes));
  }

  flush(): Promise<void> {
    return this.#track(() => this.driver.flush());
  }

  blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    return this.#track(() => this.driver.blockStatus(offset, bytes));
  }

  /** Requests in flight through this node; close waits for them (QEMU's drain). */
  get inFlight(): number {
    return this.#inflight;
  }

  /** While a drain is held: the promise new requests wait on. */
  get drainGate(): Promise<void> | undefined {
    return this.#drainGate;
  }

  /**
   * QEMU's drained section: holds new requests back (at the edges that lead here, and at the
   * node itself) and waits until none is in flight. The caller changes the graph in the same
   * synchronous step as it gets the release function, then releases; held requests then go
   * wherever their edges point. Drains of one node nest in order.
   */
  async drain(): Promise<() => void> {
    while (this.#drainGate) await this.#drainGate;
    let release!: () => void;
    this.#drainGate = new Promise<void>((resolve) => (release = resolve));
    while (this.#inflight > 0) await new Promise<void>((resolve) => this.#drainWaiters.push(resolve));
    return () => {
      this.#drainGate = undefined;
      release();
    };
  }

  async #track<T>(fn: () => Promise<T>): Promise<T> {
    while (this.#drainGate) await this.#drainGate;
    this.#inflight++;
    try {
      return await fn();
    } finally {
      if (--this.#inflight === 0) for (const w of this.#drainWaiters.splice(0)) w();
    }
  }

  /**
   * Runs `fn` before the node's driver closes (clean shutdown of persistent state such as
   * dirty bitmaps), after the requests in flight have drained.
   */
  addCloseHook(fn: () => Promise<void>): void {
    this.#closeHooks.push(fn);
  }

  /**
   * `gate` runs before every write; when it returns a promise, the write waits for it (a
   * persistent bitmap store must be marked in use on disk again before data changes).
   */
  setWriteGate(gate: (() => Promise<void> | undefined) | undefined): void {
    this.#writeGate = gate;
  }

  /** A write is tracked in the dirty bitmaps after the driver is done, whatever the outcome. */
  #trackWrite(offset: number, bytes: number, fn: () => Promise<void>): Promise<void> {
    return this.#track(async () => {
      const gate = this.#writeGate?.();
      if (gate) await gate;
      try {
        await fn();
      } finally {
        this.#markDirty(offset, bytes);
      }
    });
  }

  /**
   * Direct host access to the node's data for worker threads, or undefined when the driver
   * cannot offer it (memory, O_DIRECT files, remote nodes): then I/O goes through the node.
   * Writes made through a mapping mark the node's dirty bitmaps when they are committed or
   * aborted, so they are tracked like every other write.
   */
  hostMapping(): HostMappable | undefined {
    const d = this.driver;
    const m = hasHostMappingSource(d) ? d.hostMapping() : isHostMappable(d) ? d : undefined;
    if (!m) return undefined;
    const mapped: HostMappable = {};
    if (m.mapRead) mapped.mapRead = m.mapRead.bind(m);
    if (m.mapWrite) {
      const mapWrite = m.mapWrite.bind(m);
      mapped.mapWrite = async (offset, bytes): Promise<WriteMapping> => {
        const w = await mapWrite(offset, bytes);
        const settle = (fn: () => Promise<void>) => async () => {
          try {
            await fn();
          } finally {
            this.#markDirty(offset, bytes);
          }
        };
        return { extents: w.extents, commit: settle(() => w.commit()), abort: settle(() => w.abort()) };
      };
    }
    return mapped;
  }

  /**
   * Changes the node's length, for drivers that can (files under a growing image format).
   * @throws ERR_NOT_IMPLEMENTED when the driver cannot resize or the node has dirty bitmaps
   */
  async truncate(length: number): Promise<void> {
    const d = this.driver;
    if (!isResizable(d)) {
      throw new ShearError('ERR_NOT_IMPLEMENTED', `Cannot resize node "${this.name}": driver "${this.info.name}" cannot resize`, { node: this.name });
    }
    if (this.bitmaps.list().length > 0) {
      throw new ShearError('ERR_NOT_IMPLEMENTED', `Cannot resize node "${this.name}": resizing nodes with dirty bitmaps is not implemented`, { node: this.name });
    }
    await d.truncate(length);
    this.#bitmaps = new NodeBitmaps(this.name, d.length, this.info.clusterBytes !== undefined ? { clusterBytes: this.info.clusterBytes } : {});
  }

  /** @internal Closes the driver; BlockGraph.removeNode is the public way. */
  async close(): Promise<void> {
    while (this.#inflight > 0) await new Promise<void>((resolve) => this.#drainWaiters.push(resolve));
    const errors: unknown[] = [];
    for (const hook of this.#closeHooks.splice(0)) await hook().catch((err: unknown) => errors.push(err));
    const d = this.#driver;
    this.#driver = null;
    await d?.close();
    if (errors.length > 0) throw errors[0];
  }

  #markDirty(offset: number, bytes: number): void {
    const bitmaps = this.#bitmaps;
    // Out-of-range requests were refused by the driver and changed nothing.
    if (bitmaps && bytes > 0 && offset >= 0 && offset + bytes <= bitmaps.size) bitmaps.markDirty(offset, bytes);
  }

}

