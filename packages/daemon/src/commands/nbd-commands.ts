import { ArgReader, ShearError } from '@shear/base';
import { PERM_ALL, PERM_CONSISTENT_READ, PERM_WRITE, isPointInTimeView, type BlockNode, type ChildEdge } from '@shear/block';
import type { DirtyBitmap } from '@shear/dirty-bitmap';
import { NbdServer, type NbdAddress } from '@shear/nbd';
import type { CommandRegistry } from '@shear/qmp';
import type { DaemonContext } from '../context.js';
import { lookupNode } from './bitmap-actions.js';

/** The daemon's NBD server (at most one, as in QEMU) and what its exports hold. */
export class NbdService {
  #server: NbdServer | undefined;
  readonly #edges = new Map<string, ChildEdge>();
  readonly #ctx: DaemonContext;
  readonly #allowRemote: boolean;

  constructor(ctx: DaemonContext, opts: { allowRemote?: boolean } = {}) {
    this.#ctx = ctx;
    this.#allowRemote = opts.allowRemote ?? false;
  }

  get running(): boolean {
    return this.#server !== undefined;
  }

  /** QEMU's nbd-server-start: `addr` flat ({type, path} / {type, host, port}) or legacy wrapped ({type, data}). */
  async start(args: Record<string, unknown>): Promise<void> {
    const a = new ArgReader(args);
    const addr = parseAddress(a.object('addr')!);
    const maxConnections = a.int('max-connections', { min: 0, fallback: 0 })!;
    const tls = a.string('tls-creds', undefined);
    a.ignore('tls-authz', 'handshake-max-seconds');
    a.done();
    if (tls !== undefined) throw new ShearError('ERR_NOT_IMPLEMENTED', 'Cannot start NBD server: TLS is not implemented');
    if (this.#server) throw new ShearError('ERR_INVALID_ARGUMENT', 'NBD server already running');
    const server = new NbdServer({
      maxConnections,
      allowRemote: this.#allowRemote,
      onExportDeleted: (info) => {
        const edge = this.#edges.get(info.name);
        this.#edges.delete(info.name);
        if (edge) this.#ctx.graph.detachUser(edge);
        this.#ctx.emit('BLOCK_EXPORT_DELETED', { id: info.id });
      },
    });
    await server.listen(addr);
    this.#server = server;
    this.#ctx.log.info({ evt: 'nbd.started', addr }, 'NBD server started');
  }

  async stop(): Promise<void> {
    const server = this.#requireServer();
    this.#server = undefined;
    await server.close();
  }

  /**
   * block-export-add (type nbd) and the older nbd-server-add. The export is a user of its node:
   * it follows the node under a filter a backup job inserts. Exports are read-only unless
   * `writable`; a point-in-time view (snapshot-access) is exported as a fleecing export (TRIM accepted).
   */
  add(opts: { id: string; nodeName: string; name: string; description?: string | undefined; writable: boolean; bitmaps: DirtyBitmap[]; allocationDepth: boolean }): void {
    const server = this.#requireServer();
    const node = lookupNode(this.#ctx, opts.nodeName);
    const fleecing = isPointInTimeView(node.driver);
    const perm = opts.writable || fleecing ? PERM_WRITE | PERM_CONSISTENT_READ : PERM_CONSISTENT_READ;
    const edge = this.#ctx.graph.attachUser({ kind: 'user', name: `export:${opts.id}` }, node, perm, PERM_ALL);
    try {
      server.addExport({
        id: opts.id,
        name: opts.name,
        ...(opts.description !== undefined ? { description: opts.description } : {}),
        edge,
        writable: opts.writable,
        bitmaps: opts.bitmaps,
        allocationDepth: opts.allocationDepth,
        fleecing,
      });
    } catch (err) {
      this.#ctx.graph.detachUser(edge);
      throw err;
    }
    this.#edges.set(opts.name, edge);
  }

  /** Refusals (unknown export, clients still connected in safe mode) throw at once; the promise resolves when the export is gone. */
  remove(name: string, mode: 'safe' | 'hard'): Promise<void> {
    return this.#requireServer().removeExport(name, mode);
  }

  /** QEMU's BlockExportInfo: which node each export sits on now (the filter, during a backup). */
  query(): Record<string, unknown>[] {
    if (!this.#server) return [];
    return this.#server.listExports().map((e) => ({
      id: e.id,
      type: 'nbd',
      'node-name': this.#edges.get(e.name)?.child.name ?? e.nodeName,
      'shutting-down': e.shuttingDown,
    }));
  }

  idOf(id: string): string {
    const e = this.#server?.listExports().find((x) => x.id === id);
    if (!e) throw new ShearError('ERR_NBD_EXPORT_NOT_FOUND', `Export '${id}' is not found`);
    return e.name;
  }

  async close(): Promise<void> {
    if (this.#server) await this.stop();
  }

  #requireServer(): NbdServer {
    if (!this.#server) throw new ShearError('ERR_INVALID_ARGUMENT', 'NBD server not running');
    return this.#server;
  }
}

function parseAddress(r: ArgReader): NbdAddress {
  const type = r.enumOf('type', ['unix', 'inet'] as const)!;
  // QEMU's older SocketAddressLegacy wraps the members in `data`.
  const data = r.has('data') ? r.object('data')! : r;
  let addr: NbdAddress;
  if (type === 'unix') {
    addr = { type: 'unix', path: data.string('path') };
    data.ignore('abstract', 'tight');
  } else {
    addr = { type: 'inet', host: data.string('host'), port: data.string('port') };
    data.ignore('numeric', 'to', 'ipv4', 'ipv6', 'keep-alive');
  }
  if (data !== r) data.done();
  r.done();
  return addr;
}

function exportBitmaps(ctx: DaemonContext, node: string, list: unknown[] | undefined): DirtyBitmap[] {
  return (list ?? []).map((item, i) => {
    let nodeName = node;
    let name: string;
    if (typeof item === 'string') name = item;
    else {
      const r = new ArgReader(item, `bitmaps[${i}]`);
      nodeName = r.string('node');
      name = r.string('name');
      r.done();
    }
    // A bare name is looked up on the exported node and down its chain of filters and backing
    // files, as QEMU does: a fleecing export (snapshot-access -> copy-before-write -> disk)
    // finds the disk's bitmaps.
    let at: BlockNode | undefined = lookupNode(ctx, nodeName);
    while (at) {
      const bm = at.bitmaps.find(name);
      if (bm) return bm;
      if (typeof item !== 'string') break;
      at = (at.child('file') ?? at.child('backing') ?? at.child('image'))?.child;
    }
    throw new ShearError('ERR_BITMAP_NOT_FOUND', `Bitmap '${name}' is not found`, { bitmap: name });
  });
}

export function registerNbdCommands(reg: CommandRegistry, ctx: DaemonContext, nbd: NbdService): void {
  reg.register('nbd-server-start', async (args) => {
    await nbd.start(args);
    return {};
  });
  reg.register('nbd-server-stop', async (args) => {
    new ArgReader(args).done();
    await nbd.stop();
    return {};
  });
  reg.register('block-export-add', (args) => {
    const a = new ArgReader(args);
    a.enumOf('type', ['nbd'] as const);
    const id = a.string('id');
    const nodeName = a.string('node-name');
    const name = a.string('name', nodeName);
    const description = a.string('description', undefined);
    const writable = a.bool('writable', false)!;
    const bitmaps = a.array('bitmaps', true);
    const allocationDepth = a.bool('allocation-depth', false)!;
    a.ignore('writethrough', 'iothread', 'fixed-iothread');
    a.done();
    nbd.add({ id, nodeName, name, description, writable, bitmaps: exportBitmaps(ctx, nodeName, bitmaps), allocationDepth });
    return {};
  });
  reg.register('block-export-del', async (args) => {
    const a = new ArgReader(args);
    const id = a.string('id');
    const mode = a.enumOf('mode', ['safe', 'hard'] as const, 'safe')!;
    a.done();
    // The reply comes now; BLOCK_EXPORT_DELETED follows once the export is gone.
    const done = nbd.remove(nbd.idOf(id), mode);
    done.catch((err: unknown) => ctx.log.warn({ evt: 'nbd.export_del_failed', err }, 'export removal failed'));
    return {};
  });
  reg.register('query-block-exports', (args) => {
    new ArgReader(args).done();
    return nbd.query();
  });
  // The older pair, kept for scripts written against them.
  reg.register('nbd-server-add', (args) => {
    const a = new ArgReader(args);
    const device = a.string('device');
    const name = a.string('name', device);
    const description = a.string('description', undefined);
    const writable = a.bool('writable', false)!;
    const bitmap = a.string('bitmap', undefined);
    a.done();
    nbd.add({ id: name, nodeName: device, name, description, writable, bitmaps: exportBitmaps(ctx, device, bitmap ? [bitmap] : undefined), allocationDepth: false });
    return {};
  });
  reg.register('nbd-server-remove', async (args) => {
    const a = new ArgReader(args);
    const name = a.string('name');
    const mode = a.enumOf('mode', ['safe', 'hard'] as const, 'safe')!;
    a.done();
    await nbd.remove(name, mode);
    return {};
  });
}
