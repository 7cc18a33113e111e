import { BufferPool } from './buffer-pool.js';
import { lstat, unlink } from 'node:fs/promises';
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { ShearError } from '@shear/base';
import { isLoopbackHost, parsePort, type NbdAddress, type NbdBoundAddress } from '../address.js';
import { ServerConnection } from './connection.js';
import { NbdExport, type NbdExportInfo, type NbdExportOptions } from './export.js';

/** QEMU's default for handshake-max-seconds. */
export const DEFAULT_HANDSHAKE_TIMEOUT_MS = 10_000;

export interface NbdServerOptions {
  /** Connections at once (handshake or transmission); more are closed at once. 0 = no limit (QEMU's default). */
  maxConnections?: number;
  /** Allow TCP addresses other than loopback. There is no TLS and no authentication: anyone who can connect can read (and write). */
  allowRemote?: boolean;
  /** A client that has not chosen an export after this long is dropped. */
  handshakeTimeoutMs?: number;
  /** Called when an export is gone (QEMU's BLOCK_EXPORT_DELETED). */
  onExportDeleted?: (info: NbdExportInfo) => void;
}

export type RemoveMode = 'safe' | 'hard';

/**
 * An NBD server (fixed newstyle, structured replies, metadata contexts) serving exports of
 * block nodes. It listens on one UNIX or TCP address; exports are added and removed while it
 * runs.
 *
 * Owns its listening socket and every connection (see ServerConnection): close() ends them all
 * and resolves once each socket is closed and each request finished. It owns its exports'
 * lifetime but not their edges: the caller attaches an edge before addExport and detaches it
 * when the export is gone (onDeleted, or the promise of removeExport).
 */
export class NbdServer {
  readonly maxConnections: number;
  readonly allowRemote: boolean;
  readonly handshakeTimeoutMs: number;
  readonly #buffers = new BufferPool();
  readonly #onExportDeleted: ((info: NbdExportInfo) => void) | undefined;
  readonly #exports = new Map<string, NbdExport>();
  /** Exports removed from the table but not gone yet. */
  readonly #leaving = new Set<NbdExport>();
  readonly #connections = new Set<ServerConnection>();
  /** Connections that count against maxConnections: open, client not gone yet (QEMU's count). */
  readonly #counted = new Set<ServerConnection>();
  #listener: Server | null = null;
  #address: NbdBoundAddress | null = null;
  #closing: Promise<void> | null = null;

  constructor(opts: NbdServerOptions = {}) {
    const max = opts.maxConnections ?? 0;
    if (!Number.isInteger(max) || max < 0) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot create NBD server: max-connections ${max} must be a non-negative integer`);
    this.maxConnections = max;
    this.allowRemote = opts.allowRemote ?? false;
    this.handshakeTimeoutMs = opts.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS;
    this.#onExportDeleted = opts.onExportDeleted;
  }

  /** The bound address once listening. */
  get address(): NbdBoundAddress | null {
    return this.#address;
  }

  /** Open connections (handshake and transmission). */
  get connectionCount(): number {
    return this.#connections.size;
  }

  get closed(): boolean {
    return this.#closing !== null;
  }

  /**
   * Starts listening. A stale UNIX socket file at the path is replaced (as QEMU does); any other
   * file there is an error. TCP addresses must be loopback unless allowRemote.
   * @throws ERR_NBD_ADDRESS (remote address refused), ERR_INVALID_ARGUMENT, ERR_CLOSED, ERR_IO (bind failed)
   */
  async listen(address: NbdAddress): Promise<NbdBoundAddress> {
    if (this.#closing) throw new ShearError('ERR_CLOSED', 'Cannot start the NBD server: it is closed');
    if (this.#listener) throw new ShearError('ERR_INVALID_ARGUMENT', 'Cannot start the NBD server: it is already running');
    let port = 0;
    if (address.type === 'inet') {
      port = parsePort(address.port);
      if (!this.allowRemote && !isLoopbackHost(address.host)) {
        throw new ShearError('ERR_NBD_ADDRESS', `Cannot listen on "${address.host}": not a loopback address; NBD has no authentication here, pass allowRemote to serve other hosts`);
      }
    } else if (address.type === 'unix') {
      await removeStaleSocket(address.path);
    } else {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot listen on address type "${String((address as { type: unknown }).type)}": expected "unix" or "inet"`);
    }
    const listener = createServer({ noDelay: true }, (socket) => this.#accept(socket));
    this.#listener = listener;
    try {
      await new Promise<void>((resolve, reject) => {
        listener.once('error', reject);
        if (address.type === 'unix') listener.listen(address.path, () => resolve());
        else listener.listen({ host: address.host, port, exclusive: true }, () => resolve());
      }).finally(() => listener.removeAllListeners('error'));
    } catch (err) {
      this.#listener = null;
      listener.close();
      const where = address.type === 'unix' ? address.path : `${address.host}:${port}`;
      throw new ShearError('ERR_IO', `Cannot listen on "${where}": ${(err as Error).message}`, { errno: (err as { code?: string }).code ?? 'EIO' }, { cause: err });
    }
    // Errors after listening (EMFILE on accept) do not stop the server.
    listener.on('error', () => {});
    if (address.type === 'unix') {
      this.#address = { type: 'unix', path: address.path };
    } else {
      const bound = listener.address() as AddressInfo;
      if (!this.allowRemote && !isLoopbackHost(bound.address)) {
        // `localhost` resolved to something else: refuse rather than serve the network.
        await new Promise<void>((resolve) => listener.close(() => resolve()));
        this.#listener = null;
        throw new ShearError('ERR_NBD_ADDRESS', `Cannot listen on "${address.host}": it resolved to the non-loopback address "${bound.address}"`);
      }
      this.#address = { type: 'inet', host: bound.address, port: bound.port };
    }
    return this.#address;
  }

  /**
   * Adds an export (QEMU's block-export-add type=nbd / nbd-server-add).
   * @throws ERR_INVALID_ARGUMENT for an id that is not well formed (a letter first, then letters,
   *   digits, '-', '.', '_'), ERR_NBD_EXPORT_EXISTS, ERR_CLOSED, and NbdExport's checks (ERR_INVALID_ARGUMENT, ERR_BITMAP_BUSY, ...)
   */
  addExport(opts: NbdExportOptions): NbdExportInfo {
    // QEMU's id_wellformed, with QEMU's words: scripts match on them.
    if (opts.id !== undefined && !/^[A-Za-z][A-Za-z0-9._-]*$/.test(opts.id)) throw new ShearError('ERR_INVALID_ARGUMENT', 'Invalid block export id');
    if (this.#closing) throw new ShearError('ERR_CLOSED', `Cannot add NBD export "${opts.name}": the server is closed`);
    if (this.#exports.has(opts.name)) throw new ShearError('ERR_NBD_EXPORT_EXISTS', `Cannot add NBD export "${opts.name}": an export with this name already exists`);
    for (const e of [...this.#exports.values(), ...this.#leaving]) {
      if (opts.id !== undefined && e.id === opts.id) throw new ShearError('ERR_NBD_EXPORT_EXISTS', `Cannot add NBD export "${opts.name}": an export with id "${opts.id}" already exists`);
    }
    const exp = new NbdExport(opts);
    const onDeleted = this.#onExportDeleted;
    exp.onDeleted((info) => {
      this.#leaving.delete(exp);
      onDeleted?.(info);
    });
    this.#exports.set(exp.name, exp);
    return exp.info();
  }

  /**
   * Removes an export (QEMU's block-export-del / nbd-server-remove). `safe` refuses while
   * clients are connected; `hard` drops them. Either way no new client can reach the export
   * from now on. The checks throw synchronously; the promise resolves when the export is gone
   * (every connection closed, every request finished), which is also when onDeleted fires.
   * @throws ERR_NBD_EXPORT_NOT_FOUND, ERR_NBD_EXPORT_IN_USE
   */
  removeExport(name: string, mode: RemoveMode = 'safe'): Promise<void> {
    const exp = this.#exports.get(name);
    if (!exp) {
      const leaving = [...this.#leaving].find((e) => e.name === name);
      if (leaving) {
        if (mode === 'hard') return leaving.remove(true);
        throw new ShearError('ERR_NBD_EXPORT_NOT_FOUND', `Cannot remove NBD export "${name}": it is already being removed`);
      }
      throw new ShearError('ERR_NBD_EXPORT_NOT_FOUND', `Cannot remove NBD export "${name}": no such export`);
    }
    if (mode === 'safe' && exp.clientCount > 0) {
      throw new ShearError('ERR_NBD_EXPORT_IN_USE', `Cannot remove NBD export "${name}": it still has ${exp.clientCount} connection(s); use mode "hard" to drop them`);
    }
    this.#exports.delete(name);
    this.#leaving.add(exp);
    return exp.remove(mode === 'hard');
  }

  /** Exports in the table, then those being removed (query-block-exports). */
  listExports(): NbdExportInfo[] {
    return [...this.#exports.values(), ...this.#leaving].map((e) => e.info());
  }

  getExport(name: string): NbdExportInfo | undefined {
    return this.#exports.get(name)?.info();
  }

  /**
   * Stops listening, drops every connection and removes every export (QEMU's nbd-server-stop).
   * Resolves when all sockets are closed and every export is gone. Idempotent.
   */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    const listener = this.#listener;
    this.#listener = null;
    const stopped = listener ? new Promise<void>((resolve) => listener.close(() => resolve())) : Promise.resolve();
    const gone: Promise<void>[] = [];
    for (const name of [...this.#exports.keys()]) gone.push(this.removeExport(name, 'hard'));
    for (const e of [...this.#leaving]) gone.push(e.remove(true));
    for (const c of this.#connections) c.abort();
    await Promise.all([stopped, ...gone, ...[...this.#connections].map((c) => c.closed)]);
    this.#address = null;
  }

  #accept(socket: Socket): void {
    if (this.#closing || (this.maxConnections > 0 && this.#counted.size >= this.maxConnections)) {
      socket.on('error', () => {});
      socket.destroy();
      return;
    }
    const conn = new ServerConnection(
      {
        findExport: (name) => this.#exports.get(name),
        listExports: () => [...this.#exports.values()],
        handshakeTimeoutMs: this.handshakeTimeoutMs,
        buffers: this.#buffers,
        released: (c) => this.#counted.delete(c),
      },
      socket,
    );
    this.#connections.add(conn);
    this.#counted.add(conn);
    void conn.run().finally(() => {
      this.#connections.delete(conn);
      this.#counted.delete(conn);
    });
  }
}

/** Unlinks a UNIX socket left behind by a previous server; refuses to touch anything else. */
async function removeStaleSocket(path: string): Promise<void> {
  let st;
  try {
    st = await lstat(path);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot listen on "${path}": a file that is not a socket is in the way`, { path });
  await unlink(path).catch(() => {});
}
