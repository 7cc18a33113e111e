import { ShearError, inTransaction, type Transaction } from '@shear/base';
import type { BlockIO } from './io.js';
import { BlockNode, ChildEdge, parentName, type BlockUser, type DriverInfo } from './node.js';
import { checkNodeName } from './node-name.js';
import { PERM_RESIZE, PERM_WRITE, permNames, type PermPair } from './permissions.js';

export interface ChildSpec {
  role: string;
  node: BlockNode | string;
}

export interface AddNodeSpec {
  /** User-chosen node-name; when absent the graph generates one that no user name can match. */
  name?: string;
  info: DriverInfo;
  readOnly?: boolean;
  children?: ChildSpec[];
  /** Opens the driver on the node's child edges (by role), after permissions were checked. */
  open(children: Map<string, ChildEdge>): Promise<BlockIO>;
}

/**
 * The block graph, owned by the coordinator: nodes by name, edges with permissions, and the
 * edits QMP and jobs make. Every edit either completes with consistent permissions or leaves
 * the graph exactly as it was (checked in one place, refreshPermissions, which computes all
 * derived permissions first and applies them only when no parent conflicts with another).
 */
export class BlockGraph {
  readonly #nodes = new Map<string, BlockNode>();
  #generated = 0;

  /** Nodes in creation order. */
  nodes(): BlockNode[] {
    return [...this.#nodes.values()].filter((n) => n.isOpen);
  }

  find(name: string): BlockNode | undefined {
    const n = this.#nodes.get(name);
    return n?.isOpen ? n : undefined;
  }

  /** @throws ERR_BLOCK_NODE_NOT_FOUND */
  get(name: string): BlockNode {
    const n = this.find(name);
    if (!n) throw new ShearError('ERR_BLOCK_NODE_NOT_FOUND', `Cannot find node "${name}"`, { node: name });
    return n;
  }

  /**
   * Creates a node: checks its name, attaches edges to its children, checks permissions, then
   * opens the driver. Any failure leaves the graph as it was.
   * @throws ERR_BLOCK_NODE_NAME, ERR_BLOCK_NODE_EXISTS, ERR_BLOCK_NODE_NOT_FOUND, ERR_BLOCK_PERMISSION_CONFLICT, or the driver's error
   */
  async addNode(spec: AddNodeSpec): Promise<BlockNode> {
    let name: string;
    if (spec.name === undefined) {
      name = `#block${++this.#generated}`;
    } else {
      checkNodeName(spec.name);
      name = spec.name;
    }
    if (this.#nodes.has(name)) {
      throw new ShearError('ERR_BLOCK_NODE_EXISTS', `Cannot add node "${name}": a node with this name already exists`, { node: name });
    }
    const children = (spec.children ?? []).map((c) => ({ role: c.role, node: typeof c.node === 'string' ? this.get(c.node) : c.node }));
    const roles = new Set<string>();
    for (const c of children) {
      if (roles.has(c.role)) throw new ShearError('ERR_BLOCK_GRAPH', `Cannot add node "${name}": two children have the role "${c.role}"`, { node: name });
      roles.add(c.role);
    }
    const node = new BlockNode(name, spec.info, spec.readOnly ?? false);
    const edges = new Map<string, ChildEdge>();
    // The name is reserved while the driver opens, so a concurrent add cannot take it.
    this.#nodes.set(name, node);
    try {
      for (const c of children) {
        const edge = new ChildEdge(node, c.role, c.node, 0, -1, true);
        node.childEdges.push(edge);
        c.node.parentEdges.add(edge);
        edges.set(c.role, edge);
      }
      this.refreshPermissions();
      node.attachDriver(await spec.open(edges));
    } catch (err) {
      for (const e of node.childEdges) e.child.parentEdges.delete(e);
      node.childEdges.length = 0;
      this.#nodes.delete(name);
      this.refreshPermissions();
      throw err;
    }
    return node;
  }

  /**
   * Removes a node that nothing uses and closes its driver; its children stay.
   * @throws ERR_BLOCK_NODE_NOT_FOUND, ERR_BLOCK_NODE_IN_USE
   */
  async removeNode(name: string): Promise<void> {
    const node = this.get(name);
    const user = [...node.parentEdges][0];
    if (user) {
      throw new ShearError('ERR_BLOCK_NODE_IN_USE', `Cannot remove node "${name}": it is in use by ${parentName(user.parent)} as "${user.role}"`, { node: name });
    }
    // Closed while its edges still hold their permissions: a format node writes on close
    // (refcounts, bitmaps, header) through every node below it, and a filter in between
    // (blkdebug, raw) would otherwise already have lost write on its own child.
    this.#nodes.delete(name);
    try {
      await node.close();
    } finally {
      for (const e of node.childEdges) e.child.parentEdges.delete(e);
      node.childEdges.length = 0;
      this.refreshPermissions();
    }
  }

  /**
   * Attaches a non-node parent (an export, a job) that needs `perm` and shares `shared`.
   * @throws ERR_BLOCK_PERMISSION_CONFLICT (and attaches nothing)
   */
  attachUser(user: BlockUser, node: BlockNode | string, perm: number, shared: number, role = 'root'): ChildEdge {
    const child = typeof node === 'string' ? this.get(node) : node;
    const edge = new ChildEdge(user, role, child, perm, shared, false);
    return inTransaction((tx) => {
      child.parentEdges.add(edge);
      tx.add({ abort: () => child.parentEdges.delete(edge) });
      this.refreshPermissions();
      return edge;
    });
  }

  detachUser(edge: ChildEdge): void {
    edge.child.parentEdges.delete(edge);
    this.refreshPermissions();
  }

  /**
   * Changes what a user edge needs and shares (QEMU's blk_set_perm).
   * @throws ERR_BLOCK_PERMISSION_CONFLICT (and changes nothing)
   */
  setUserPerms(edge: ChildEdge, perm: number, shared: number): void {
    if (edge.derived) throw new ShearError('ERR_BLOCK_GRAPH', 'Cannot set permissions of a node edge: they are derived from its parent');
    const old = { perm: edge.perm, shared: edge.shared };
    inTransaction((tx) => {
      edge.perm = perm;
      edge.shared = shared;
      tx.add({ abort: () => Object.assign(edge, old) });
      this.refreshPermissions();
    });
  }

  /**
   * Moves every parent of `from` (except those in `keep`) onto `to`, as QEMU's
   * bdrv_replace_node does. Registers undo steps in `tx`; permissions are checked by the
   * caller's refresh (see insertFilter) or by this call when no transaction is given.
   */
  replaceNode(from: BlockNode, to: BlockNode, keep: (e: ChildEdge) => boolean = () => false, tx?: Transaction): void {
    const run = (t: Transaction) => {
      for (const e of [...from.parentEdges]) {
        if (keep(e)) continue;
        e.setChild(to);
        t.add({ abort: () => e.setChild(from) });
      }
      this.refreshPermissions();
    };
    if (tx) run(tx);
    else inTransaction(run);
  }

  /**
   * Puts `filter`, whose primary child edge already points at `below`, above `below`: every
   * other parent of `below` (nodes, exports, jobs) now reaches it through the filter. Callers
   * hold a drain of `below` (BlockNode.drain) so that no request is in flight across the change.
   * @throws ERR_BLOCK_GRAPH, ERR_BLOCK_PERMISSION_CONFLICT (and changes nothing)
   */
  insertFilter(filter: BlockNode, below: BlockNode, role = 'file'): void {
    const own = filter.child(role);
    if (!own || own.child !== below) {
      throw new ShearError('ERR_BLOCK_GRAPH', `Cannot insert filter "${filter.name}" above "${below.name}": its "${role}" child is not that node`, { node: filter.name });
    }
    if (filter.parentEdges.size > 0) {
      throw new ShearError('ERR_BLOCK_GRAPH', `Cannot insert filter "${filter.name}": it already has parents`, { node: filter.name });
    }
    this.replaceNode(below, filter, (e) => e === own || e.parent === filter);
  }

  /**
   * Takes `filter` out: its parents move back to its `role` child, then the filter node is
   * removed and closed.
   * @throws ERR_BLOCK_GRAPH, ERR_BLOCK_PERMISSION_CONFLICT (and changes nothing)
   */
  async removeFilter(filter: BlockNode, role = 'file'): Promise<void> {
    const own = filter.child(role);
    if (!own) throw new ShearError('ERR_BLOCK_GRAPH', `Cannot remove filter "${filter.name}": it has no "${role}" child`, { node: filter.name });
    // Drained: no request is left inside the filter when its parents move away (it would find
    // the filter's own edges without permissions), and new ones go straight to the child.
    const release = await filter.drain();
    try {
      this.replaceNode(filter, own.child);
    } finally {
      release();
    }
    await this.removeNode(filter.name);
  }

  /**
   * Recomputes every derived edge permission top-down and checks that no node's parents
   * conflict and no read-only node is written. Applies the new values only if all is well.
   * @throws ERR_BLOCK_PERMISSION_CONFLICT, ERR_BLOCK_GRAPH (cycle)
   */
  refreshPermissions(): void {
    const order = this.#topologicalOrder();
    const next = new Map<ChildEdge, PermPair>();
    const permsOf = (e: ChildEdge): PermPair => next.get(e) ?? { perm: e.perm, shared: e.shared };
    for (const node of order) {
      let perm = 0;
      let shared = 0xf;
      const parents = [...node.parentEdges];
      for (const e of parents) {
        const p = permsOf(e);
        perm |= p.perm;
        shared &= p.shared;
      }
      if (node.readOnly && (perm & (PERM_WRITE | PERM_RESIZE)) !== 0) {
        const writer = parents.find((e) => (permsOf(e).perm & (PERM_WRITE | PERM_RESIZE)) !== 0)!;
        throw new ShearError('ERR_BLOCK_PERMISSION_CONFLICT', `Cannot give ${parentName(writer.parent)} write access to node "${node.name}": the node is read-only`, { node: node.name });
      }
      for (const a of parents) {
        for (const b of parents) {
          if (a === b) continue;
          const missing = permsOf(a).perm & ~permsOf(b).shared;
          if (missing !== 0) {
            throw new ShearError(
              'ERR_BLOCK_PERMISSION_CONFLICT',
              `Conflicts with use by ${parentName(b.parent)} as "${b.role}", which does not allow [${permNames(missing).join(', ')}] on node "${node.name}" (wanted by ${parentName(a.parent)} as "${a.role}")`,
              { node: node.name },
            );
          }
        }
      }
      for (const e of node.childEdges) {
        if (e.derived) next.set(e, node.info.childPerms(e.role, { perm, shared }, node.readOnly, parents.length));
      }
    }
    for (const [e, p] of next) {
      e.perm = p.perm;
      e.shared = p.shared;
    }
  }

  /** Parents before children; a cycle is an error. */
  #topologicalOrder(): BlockNode[] {
    const nodes = [...this.#nodes.values()];
    const pending = new Map<BlockNode, number>();
    for (const n of nodes) pending.set(n, [...n.parentEdges].filter((e) => e.parent instanceof BlockNode).length);
    const ready = nodes.filter((n) => pending.get(n) === 0);
    const order: BlockNode[] = [];
    while (ready.length > 0) {
      const n = ready.shift()!;
      order.push(n);
      for (const e of n.childEdges) {
        const left = pending.get(e.child)! - 1;
        pending.set(e.child, left);
        if (left === 0) ready.push(e.child);
      }
    }
    if (order.length !== nodes.length) {
      throw new ShearError('ERR_BLOCK_GRAPH', 'Cannot change the block graph: the change would create a cycle');
    }
    return order;
  }
}
