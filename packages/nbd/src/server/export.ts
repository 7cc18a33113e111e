import { ShearError } from '@shear/base';
import { PERM_WRITE, type ChildEdge } from '@shear/block';
import type { DirtyBitmap } from '@shear/dirty-bitmap';
import {
  MAX_STRING_BYTES,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_ENOTSUP,
  NBD_EPERM,
} from '../protocol/constants.js';
import { exportContexts, type MetaContext } from './metadata.js';
import { OverlapOrder } from '../overlap-order.js';

export interface NbdExportOptions {
  /** The name clients ask for (NBD_OPT_GO / EXPORT_NAME); unique per server. */
  name: string;
  /** QMP's block-export `id`; defaults to the name. Shown by listExports. */
  id?: string;
  description?: string;
  /**
   * The edge the export does all I/O through. The caller attaches it (graph.attachUser) with
   * the permissions the export needs (write for writable and fleecing exports) and detaches it
   * once the export is gone (onDeleted). A filter inserted above the node moves the edge with it.
   */
  edge: ChildEdge;
  writable: boolean;
  /** Served as qemu:dirty-bitmap:NAME. Marked busy while exported. */
  bitmaps?: readonly DirtyBitmap[];
  /** Offer qemu:allocation-depth. */
  allocationDepth?: boolean;
  /**
   * A point-in-time (snapshot-access) view: advertised without READ_ONLY and with TRIM, so
   * backup clients can say which clusters they have. WRITE and WRITE_ZEROES are refused: EPERM,
   * or ENOTSUP when also `writable` (how QEMU 7.2's writable snapshot-access export answers).
   */
  fleecing?: boolean;
  /** Called once the export is gone: removed, every connection closed, every request finished. */
  onDeleted?: (info: NbdExportInfo) => void;
}

/** What query-block-exports needs. */
export interface NbdExportInfo {
  id: string;
  name: string;
  description?: string;
  nodeName: string;
  writable: boolean;
  fleecing: boolean;
  bitmaps: string[];
  allocationDepth: boolean;
  /** Connections in the transmission phase on this export. */
  connections: number;
  /** Removal was requested; the export waits for its connections to finish. */
  shuttingDown: boolean;
}

/** A connection as the export sees it: something it can ask to stop. */
export interface ExportClient {
  /** Stops reading requests and drops the connection; in-flight requests still finish. */
  abort(): void;
}

/**
 * One export of the server. Owns: the busy mark of its bitmaps (set on creation, cleared when
 * the export is gone) and the arrival-order table shared by its connections. Does not own the
 * edge (the caller's) nor the connections (the server's).
 */
export class NbdExport {
  readonly name: string;
  readonly id: string;
  readonly description: string | undefined;
  readonly edge: ChildEdge;
  readonly writable: boolean;
  readonly fleecing: boolean;
  readonly bitmaps: readonly DirtyBitmap[];
  readonly allocationDepth: boolean;
  readonly contexts: readonly MetaContext[];
  /** Why WRITE and WRITE_ZEROES are refused whatever their range (a fleecing view), or null. */
  readonly dataWriteRefusal: { error: number; message: string } | null;
  readonly order = new OverlapOrder();
  readonly #clients = new Set<ExportClient>();
  readonly #onDeleted: ((info: NbdExportInfo) => void)[] = [];
  #state: 'active' | 'removing' | 'gone' = 'active';
  #goneWaiters: (() => void)[] = [];

  /**
   * Checks everything before marking any bitmap busy, so a refused export changes nothing.
   * @throws ERR_INVALID_ARGUMENT, ERR_BITMAP_BUSY, ERR_BITMAP_INCONSISTENT
   */
  constructor(opts: NbdExportOptions) {
    const name = opts.name;
    if (typeof name !== 'string' || Buffer.byteLength(name) > MAX_STRING_BYTES || name.includes('\0')) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot add NBD export "${String(name)}": a name is at most ${MAX_STRING_BYTES} bytes of UTF-8 without NUL`);
    }
    if (opts.description !== undefined && Buffer.byteLength(opts.description) > MAX_STRING_BYTES) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot add NBD export "${name}": the description is over ${MAX_STRING_BYTES} bytes`);
    }
    if ((opts.writable || opts.fleecing) && (opts.edge.perm & PERM_WRITE) === 0) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot add NBD export "${name}": a ${opts.fleecing ? 'fleecing' : 'writable'} export needs an edge with the write permission (for ${opts.fleecing ? 'TRIM' : 'writes'})`);
    }
    const length = opts.edge.length;
    const bitmaps = opts.bitmaps ?? [];
    const seen = new Set<string>();
    for (const bm of bitmaps) {
      const label = bm.name ?? '(anonymous)';
      if (bm.name === null || bm.released) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot export bitmap ${label} on "${name}": only named, live bitmaps can be exported`);
      if (seen.has(bm.name)) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot export bitmap "${bm.name}" twice on "${name}"`);
      seen.add(bm.name);
      bm.check({ busy: true, inconsistent: true });
      if (bm.size < length) {
        throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot export bitmap "${bm.name}" on "${name}": it covers ${bm.size} bytes, the export has ${length}`, { bitmap: bm.name });
      }
      // QEMU refuses a still-recording bitmap on a read-only export: its bits would not match what is served.
      if (!opts.writable && !opts.fleecing && bm.recording) {
        throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot export bitmap "${bm.name}" on read-only export "${name}": it is still recording (disable it first)`, { bitmap: bm.name });
      }
    }
    this.name = name;
    this.id = opts.id ?? name;
    this.description = opts.description;
    this.edge = opts.edge;
    this.writable = opts.writable;
    this.fleecing = opts.fleecing ?? false;
    // Scripts written for QEMU add the view writable so that TRIM is allowed; QEMU's node then
    // answers writes ENOTSUP, and a read-only export answers them EPERM. The view holds no data
    // of its own either way: nothing reaches the node.
    this.dataWriteRefusal = !this.fleecing
      ? null
      : this.writable
        ? { error: NBD_ENOTSUP, message: 'Operation not supported: a snapshot-access view cannot be written (only TRIM)' }
        : { error: NBD_EPERM, message: 'export is read-only: a snapshot-access view accepts only TRIM' };
    this.bitmaps = [...bitmaps];
    this.allocationDepth = opts.allocationDepth ?? false;
    this.contexts = exportContexts({ allocationDepth: this.allocationDepth, bitmaps: this.bitmaps });
    if (opts.onDeleted) this.#onDeleted.push(opts.onDeleted);
    for (const bm of this.bitmaps) bm.setBusy(true);
  }

  get active(): boolean {
    return this.#state === 'active';
  }

  get gone(): boolean {
    return this.#state === 'gone';
  }

  get clientCount(): number {
    return this.#clients.size;
  }

  /** Bytes served: the node's length now (a new connection sees a resized node). */
  get size(): number {
    return this.edge.length;
  }

  /** Transmission flags for a connection (DF only with structured replies, as QEMU does). */
  transmissionFlags(structured: boolean): number {
    let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_CAN_MULTI_CONN | NBD_FLAG_SEND_CACHE;
    if (structured) flags |= NBD_FLAG_SEND_DF;
    if (this.writable) flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
    else if (this.fleecing) flags |= NBD_FLAG_SEND_TRIM;
    else flags |= NBD_FLAG_READ_ONLY;
    return flags;
  }

  info(): NbdExportInfo {
    const info: NbdExportInfo = {
      id: this.id,
      name: this.name,
      nodeName: this.edge.child.name,
      writable: this.writable,
      fleecing: this.fleecing,
      bitmaps: this.bitmaps.map((b) => b.name ?? ''),
      allocationDepth: this.allocationDepth,
      connections: this.#clients.size,
      shuttingDown: this.#state !== 'active',
    };
    if (this.description !== undefined) info.description = this.description;
    return info;
  }

  /** @internal A connection entered transmission on this export. */
  attach(client: ExportClient): void {
    this.#clients.add(client);
  }

  /** @internal A connection is finished: its client left (DISC, EOF, error) and its requests are done. */
  detach(client: ExportClient): void {
    this.#clients.delete(client);
    this.#maybeGone();
  }

  /**
   * @internal Starts removal: no new connections; `hard` also drops the current ones.
   * Resolves when the export is gone.
   */
  remove(hard: boolean): Promise<void> {
    if (this.#state === 'gone') return Promise.resolve();
    this.#state = this.#state === 'active' ? 'removing' : this.#state;
    const gone = new Promise<void>((resolve) => this.#goneWaiters.push(resolve));
    if (hard) for (const c of [...this.#clients]) c.abort();
    this.#maybeGone();
    return gone;
  }

  #maybeGone(): void {
    if (this.#state !== 'removing' || this.#clients.size > 0) return;
    this.#state = 'gone';
    for (const bm of this.bitmaps) bm.setBusy(false);
    const info = this.info();
    for (const w of this.#goneWaiters.splice(0)) w();
    for (const cb of this.#onDeleted.splice(0)) {
      try {
        cb(info);
      } catch {
        // A listener's failure must not keep the export alive or break the server.
      }
    }
  }

  /** @internal Server-wide listeners (BLOCK_EXPORT_DELETED). */
  onDeleted(cb: (info: NbdExportInfo) => void): void {
    this.#onDeleted.push(cb);
  }
}
