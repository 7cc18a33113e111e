import type { Socket } from 'node:net';
import { isShearError } from '@shear/base';
import {
  MAX_BLOCK_STATUS_EXTENTS,
  MAX_ERROR_MESSAGE_BYTES,
  MAX_OPTION_BYTES,
  MAX_PAYLOAD_BYTES,
  MIN_BLOCK_BYTES,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_NAME,
  NBD_KNOWN_CLIENT_FLAGS,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  NBD_REPLY_FLAG_DONE,
  PREFERRED_BLOCK_BYTES,
  REQUEST_HEADER_BYTES,
  CLIENT_FLAGS_BYTES,
  OPTION_HEADER_BYTES,
} from '../protocol/constants.js';
import {
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoText,
  encodeMetaContextReply,
  encodeOptionReply,
  encodeServerReply,
  parseClientFlags,
  parseExportRequest,
  parseMetaContextRequest,
  parseOptionHeader,
  type ExportRequest,
} from '../protocol/handshake.js';
import { decodeString, encodeTruncated } from '../protocol/strings.js';
import {
  encodeBlockStatusChunk,
  encodeErrorChunk,
  encodeHoleChunk,
  encodeNoneChunk,
  encodeOffsetDataHeader,
  encodeSimpleReply,
  parseRequestHeader,
  type RequestHeader,
} from '../protocol/transmission.js';
import { nbdErrorFor } from '../errors.js';
import type { ExportClient, NbdExport } from './export.js';
import { allocationExtents, bitmapExtents, depthExtents, listContexts, selectContexts, type MetaContext } from './metadata.js';
import { checkRequest, isOrderedCommand, isWriteCommand } from './request-check.js';
import { SocketReader } from '../socket-reader.js';
import type { BufferPool } from './buffer-pool.js';

/** Requests of one connection served at once; beyond this we stop reading (TCP slows the client). */
export const MAX_INFLIGHT_REQUESTS = 32;
/**
 * Payload bytes (READ and WRITE lengths) of one connection's requests in flight, beyond which
 * no new request is read: 32 pipelined 32 MiB READs would otherwise hold 1 GiB per connection.
 */
export const MAX_INFLIGHT_PAYLOAD_BYTES = 64 * 1024 * 1024;
/** How long a half-closed connection may take to say goodbye before it is destroyed. */
const CLOSE_LINGER_MS = 5000;

/** What a connection needs from its server. */
export interface ConnectionHost {
  /** An export that accepts new connections, by name. */
  findExport(name: string): NbdExport | undefined;
  /** Exports that accept new connections, for NBD_OPT_LIST. */
  listExports(): NbdExport[];
  readonly handshakeTimeoutMs: number;
  /** READ reply buffers, shared by the server's connections. */
  readonly buffers: BufferPool;
  /** The connection no longer counts (client gone, requests finished); its socket may still be closing. */
  released(conn: ServerConnection): void;
}

/** What the client chose: the export, reply style and metadata contexts. */
interface Binding {
  exp: NbdExport;
  structured: boolean;
  contexts: MetaContext[];
  size: number;
  flags: number;
}

type Ending = 'eof' | 'disc' | 'drop';

/**
 * One client connection, from greeting to close. Owns the socket (and every listener and timer
 * it puts on it): every path ends in the socket being closed, and `closed` resolves once it is
 * and every request has finished. A malformed message or a disconnect affects this connection
 * only; nothing here throws out of run().
 */
export class ServerConnection implements ExportClient {
  readonly socket: Socket;
  readonly #host: ConnectionHost;
  readonly #reader: SocketReader;
  #binding: Binding | null = null;
  #structured = false;
  #meta: { exp: NbdExport; contexts: MetaContext[] } | null = null;
  #inflight = 0;
  #inflightBytes = 0;
  #stopping = false;
  #waiters: (() => void)[] = [];
  #handshakeTimer: NodeJS.Timeout | null = null;
  #lingerTimer: NodeJS.Timeout | null = null;
  readonly #notify = () => {
    for (const w of this.#waiters.splice(0)) w();
  };
  readonly #ignoreError = () => {};
  readonly closed: Promise<void>;
  #resolveClosed!: () => void;

  constructor(host: ConnectionHost, socket: Socket) {
    this.#host = host;
    this.socket = socket;
    this.closed = new Promise<void>((resolve) => (this.#resolveClosed = resolve));
    socket.setNoDelay(true);
    // Errors (ECONNRESET, EPIPE) end the connection through 'close'; they are not ours to throw.
    socket.on('error', this.#ignoreError);
    socket.on('drain', this.#notify);
    socket.on('close', this.#notify);
    this.#reader = new SocketReader(socket);
  }

  /** The export this connection is bound to, once in transmission. */
  get exportName(): string | undefined {
    return this.#binding?.exp.name;
  }

  /** Serves the connection until it closes. Never rejects. */
  async run(): Promise<void> {
    let ending: Ending = 'drop';
    try {
      this.#handshakeTimer = setTimeout(() => this.abort(), this.#host.handshakeTimeoutMs);
      const binding = await this.#negotiate();
      this.#clearHandshakeTimer();
      if (binding) ending = await this.#transmit(binding);
      else ending = this.socket.destroyed ? 'drop' : 'disc';
    } catch {
      ending = 'drop';
    } finally {
      this.#clearHandshakeTimer();
      this.#stopping = true;
      if (ending === 'drop') this.socket.destroy();
      await this.#idle();
      // The client is gone (DISC, EOF, error) and no request uses the node any more: it stops
      // counting now, as in QEMU, so a safe block-export-del right after a DISC succeeds. Only
      // the socket's goodbye is left, and that needs neither the export nor its node.
      this.#binding?.exp.detach(this);
      this.#host.released(this);
      await this.#close(ending);
      this.#reader.dispose();
      this.socket.off('drain', this.#notify);
      this.socket.off('close', this.#notify);
      this.#resolveClosed();
    }
  }

  /** Drops the connection now (hard export removal, server close); running requests finish unanswered. */
  abort(): void {
    this.#stopping = true;
    this.socket.destroy();
    this.#notify();
  }

  // ---------------------------------------------------------------- handshake

  /** Option haggling. Returns the binding on GO/EXPORT_NAME, null after ABORT. Throws to drop. */
  async #negotiate(): Promise<Binding | null> {
    this.#send(encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
    const clientFlags = parseClientFlags(await this.#reader.read(CLIENT_FLAGS_BYTES));
    // The spec: unknown client flags mean drop the connection.
    if ((clientFlags & ~NBD_KNOWN_CLIENT_FLAGS) !== 0) throw new Error('unknown client flags');
    const fixed = (clientFlags & NBD_FLAG_C_FIXED_NEWSTYLE) !== 0;
    const noZeroes = (clientFlags & NBD_FLAG_C_NO_ZEROES) !== 0;
    for (;;) {
      const { option, length } = parseOptionHeader(await this.#reader.read(OPTION_HEADER_BYTES));
      if (length > MAX_OPTION_BYTES) throw new Error('option too long');
      const data = await this.#reader.read(length);
      // Without fixed newstyle only EXPORT_NAME exists, and errors cannot be told: hang up (as QEMU).
      if (!fixed && option !== NBD_OPT_EXPORT_NAME) throw new Error('option without fixed newstyle');
      switch (option) {
        case NBD_OPT_EXPORT_NAME: {
          const exp = this.#host.findExport(decodeString(data, 'the export name'));
          if (!exp) throw new Error('unknown export');
          const binding = this.#bind(exp);
          this.#send(encodeExportNameReply(binding.size, binding.flags, noZeroes));
          return binding;
        }
        case NBD_OPT_ABORT:
          this.#optReply(option, NBD_REP_ACK);
          return null;
        case NBD_OPT_LIST:
          if (length !== 0) {
            this.#optError(option, NBD_REP_ERR_INVALID, "option 'list' has unexpected length");
          } else {
            for (const exp of this.#host.listExports()) this.#optReply(option, NBD_REP_SERVER, encodeServerReply(exp.name, exp.description));
            this.#optReply(option, NBD_REP_ACK);
          }
          break;
        case NBD_OPT_STARTTLS:
          if (length !== 0) this.#optError(option, NBD_REP_ERR_INVALID, "option 'starttls' has unexpected length");
          else this.#optError(option, NBD_REP_ERR_POLICY, 'TLS not configured');
          break;
        case NBD_OPT_STRUCTURED_REPLY:
          if (length !== 0) this.#optError(option, NBD_REP_ERR_INVALID, "option 'structured reply' has unexpected length");
          else if (this.#structured) this.#optError(option, NBD_REP_ERR_INVALID, 'structured reply already negotiated');
          else {
            this.#structured = true;
            this.#optReply(option, NBD_REP_ACK);
          }
          break;
        case NBD_OPT_INFO:
        case NBD_OPT_GO: {
          let req: ExportRequest;
          try {
            req = parseExportRequest(data);
          } catch (err) {
            this.#optError(option, NBD_REP_ERR_INVALID, messageOf(err));
            break;
          }
          const exp = this.#host.findExport(req.name);
          if (!exp) {
            this.#optError(option, NBD_REP_ERR_UNKNOWN, this.#unknownExport(req.name));
            break;
          }
          if (option === NBD_OPT_GO) {
            const binding = this.#bind(exp);
            this.#sendInfo(option, exp, req.infos, binding);
            return binding;
          }
          this.#sendInfo(option, exp, req.infos, { size: exp.size, flags: exp.transmissionFlags(this.#structured) });
          break;
        }
        case NBD_OPT_LIST_META_CONTEXT:
        case NBD_OPT_SET_META_CONTEXT:
          this.#metaContext(option, data);
          break;
        default:
          this.#optError(option, NBD_REP_ERR_UNSUP, `unsupported option ${option}`);
      }
    }
  }

  #bind(exp: NbdExport): Binding {
    const contexts = this.#meta && this.#meta.exp === exp ? this.#meta.contexts : [];
    const binding: Binding = { exp, structured: this.#structured, contexts, size: exp.size, flags: exp.transmissionFlags(this.#structured) };
    this.#binding = binding;
    exp.attach(this);
    return binding;
  }

  /** INFO/GO replies in QEMU's order: NAME if asked, DESCRIPTION if set, BLOCK_SIZE, EXPORT, ACK. */
  #sendInfo(option: number, exp: NbdExport, infos: readonly number[], shown: { size: number; flags: number }): void {
    if (infos.includes(NBD_INFO_NAME)) this.#optReply(option, NBD_REP_INFO, encodeInfoText(NBD_INFO_NAME, exp.name));
    if (exp.description !== undefined) this.#optReply(option, NBD_REP_INFO, encodeInfoText(NBD_INFO_DESCRIPTION, exp.description));
    // Block sizes go out whether asked or not (minimum 1: any alignment is served).
    this.#optReply(option, NBD_REP_INFO, encodeInfoBlockSize(MIN_BLOCK_BYTES, PREFERRED_BLOCK_BYTES, MAX_PAYLOAD_BYTES));
    this.#optReply(option, NBD_REP_INFO, encodeInfoExport(shown.size, shown.flags));
    this.#optReply(option, NBD_REP_ACK);
  }

  #metaContext(option: number, data: Buffer): void {
    const set = option === NBD_OPT_SET_META_CONTEXT;
    // A SET replaces the selection even when it fails.
    if (set) this.#meta = null;
    if (!this.#structured) {
      this.#optError(option, NBD_REP_ERR_INVALID, `request option '${set ? 'set' : 'list'} meta context' when structured reply is not negotiated`);
      return;
    }
    let req;
    try {
      req = parseMetaContextRequest(data);
    } catch (err) {
      this.#optError(option, NBD_REP_ERR_INVALID, messageOf(err));
      return;
    }
    const exp = this.#host.findExport(req.name);
    if (!exp) {
      this.#optError(option, NBD_REP_ERR_UNKNOWN, this.#unknownExport(req.name));
      return;
    }
    const picked = set ? selectContexts(exp.contexts, req.queries) : listContexts(exp.contexts, req.queries);
    for (const c of picked) this.#optReply(option, NBD_REP_META_CONTEXT, encodeMetaContextReply(set ? c.id : 0, c.name));
    this.#optReply(option, NBD_REP_ACK);
    if (set) this.#meta = { exp, contexts: picked };
  }

  #unknownExport(name: string): string {
    if (name !== '') return `export '${name}' not present`;
    const names = this.#host.listExports().map((e) => `'${e.name}'`);
    return `export '' not present: there is no default export; ask for one of ${names.join(', ') || '(none)'}`;
  }

  #optReply(option: number, type: number, data?: Uint8Array): void {
    this.#send(encodeOptionReply(option, type, data));
  }

  #optError(option: number, type: number, message: string): void {
    this.#send(encodeOptionReply(option, type, encodeTruncated(message, MAX_ERROR_MESSAGE_BYTES)));
  }

  #clearHandshakeTimer(): void {
    if (this.#handshakeTimer) clearTimeout(this.#handshakeTimer);
    this.#handshakeTimer = null;
  }

  // ---------------------------------------------------------------- transmission

  /** Reads and dispatches requests until the client leaves or breaks the protocol. */
  async #transmit(b: Binding): Promise<Ending> {
    for (;;) {
      while (!this.#stopping && (this.#inflight >= MAX_INFLIGHT_REQUESTS || this.#inflightBytes >= MAX_INFLIGHT_PAYLOAD_BYTES || this.socket.writableNeedDrain)) await this.#wait();
      if (this.#stopping) return 'drop';
      let req: RequestHeader;
      let payload: Buffer | undefined;
      try {
        const header = await this.#reader.read(REQUEST_HEADER_BYTES);
        req = parseRequestHeader(header);
      } catch (err) {
        // EOF at a request boundary is a normal close (libnbd closes without DISC).
        return isShearError(err, 'ERR_NBD_DISCONNECTED') && this.#reader.buffered === 0 ? 'eof' : 'drop';
      }
      if (req.type === NBD_CMD_WRITE) {
        if (req.length > MAX_PAYLOAD_BYTES) {
          // The payload cannot be skipped safely: refuse, then close once the others are answered.
          this.#stopping = true;
          await this.#idle();
          this.#replyError(b, req, NBD_EINVAL, `length ${req.length} is larger than the maximum payload ${MAX_PAYLOAD_BYTES}`);
          return 'disc';
        }
        try {
          payload = await this.#reader.read(req.length);
        } catch {
          return 'drop';
        }
      }
      if (req.type === NBD_CMD_DISC) return 'disc';
      const bytes = req.type === NBD_CMD_READ || req.type === NBD_CMD_WRITE ? Math.min(req.length, MAX_PAYLOAD_BYTES) : 0;
      this.#inflight++;
      this.#inflightBytes += bytes;
      void this.#handle(b, req, payload).finally(() => {
        this.#inflight--;
        this.#inflightBytes -= bytes;
        this.#notify();
      });
    }
  }

  /** Runs one request and sends its reply. Never rejects. */
  async #handle(b: Binding, req: RequestHeader, payload: Buffer | undefined): Promise<void> {
    const fastZero = (req.flags & NBD_CMD_FLAG_FAST_ZERO) !== 0;
    const refusal =
      checkRequest(req, { size: b.size, transmissionFlags: b.flags, structured: b.structured, contextCount: b.contexts.length }) ??
      (req.type === NBD_CMD_WRITE || req.type === NBD_CMD_WRITE_ZEROES ? b.exp.dataWriteRefusal : null);
    if (refusal) {
      this.#replyError(b, req, refusal.error, refusal.message);
      return;
    }
    // Bounds are checked: offset + length <= size <= 2^53.
    const offset = Number(req.offset);
    const length = req.length;
    // Registered before the first await, so the order is the arrival order.
    const ticket = isOrderedCommand(req.type) ? b.exp.order.enter(offset, length, isWriteCommand(req.type)) : null;
    try {
      await ticket?.ready;
      const edge = b.exp.edge;
      const fua = (req.flags & NBD_CMD_FLAG_FUA) !== 0;
      switch (req.type) {
        case NBD_CMD_READ:
          await this.#read(b, req, offset, length);
          return;
        case NBD_CMD_BLOCK_STATUS:
          await this.#blockStatus(b, req, offset, length);
          return;
        case NBD_CMD_WRITE:
          if (length > 0) await edge.write(offset, payload!, { fua });
          break;
        case NBD_CMD_WRITE_ZEROES:
          if (length > 0) await edge.writeZeroes(offset, length, { fua, mayUnmap: (req.flags & NBD_CMD_FLAG_NO_HOLE) === 0, fastOnly: fastZero });
          break;
        case NBD_CMD_TRIM:
          if (length > 0) await edge.discard(offset, length);
          if (fua) await edge.flush();
          break;
        case NBD_CMD_FLUSH:
          await edge.flush();
          break;
        case NBD_CMD_CACHE:
          // A prefetch hint: nothing here caches, so there is nothing to warm.
          break;
        case NBD_CMD_DISC:
          return;
      }
      this.#send(encodeSimpleReply(req.cookie, 0));
    } catch (err) {
      this.#replyError(b, req, nbdErrorFor(err, { fastZero }), messageOf(err));
    } finally {
      ticket?.release();
    }
  }

  /**
   * READ. With structured replies the data goes out as OFFSET_DATA and OFFSET_HOLE chunks from
   * block status, and holes are not read. A fleecing export reads every byte (a discarded
   * cluster must fail even where status says zero). DF, or status failing, gives one data chunk.
   */
  async #read(b: Binding, req: RequestHeader, offset: number, length: number): Promise<void> {
    const edge = b.exp.edge;
    if (length === 0) {
      this.#send(b.structured ? encodeNoneChunk(req.cookie) : encodeSimpleReply(req.cookie, 0));
      return;
    }
    const buf = this.#host.buffers.acquire(length);
    // Back to the pool once the socket wrote it out; on a failed read at once.
    const done = () => this.#host.buffers.release(buf);
    // A read that fails may still be filling the buffer (a sibling piece): it is left to the
    // collector rather than handed out again, as is one whose socket is gone.
    if (!b.structured) {
      await edge.read(offset, buf);
      this.#send(done, encodeSimpleReply(req.cookie, 0), buf);
      return;
    }
    let runs: { offset: number; bytes: number; hole: boolean }[] | null = null;
    if ((req.flags & NBD_CMD_FLAG_DF) === 0) runs = await this.#readRuns(b, offset, length).catch(() => null);
    if (!runs || runs.every((r) => !r.hole)) {
      await edge.read(offset, buf);
      this.#send(done, encodeOffsetDataHeader(NBD_REPLY_FLAG_DONE, req.cookie, offset, length), buf);
      return;
    }
    if (b.exp.fleecing) await edge.read(offset, buf);
    else await Promise.all(runs.filter((r) => !r.hole).map((r) => edge.read(r.offset, buf.subarray(r.offset - offset, r.offset - offset + r.bytes))));
    const out: Buffer[] = [];
    runs.forEach((r, i) => {
      const flags = i === runs!.length - 1 ? NBD_REPLY_FLAG_DONE : 0;
      if (r.hole) out.push(encodeHoleChunk(flags, req.cookie, r.offset, r.bytes));
      else out.push(encodeOffsetDataHeader(flags, req.cookie, r.offset, r.bytes), buf.subarray(r.offset - offset, r.offset - offset + r.bytes));
    });
    this.#send(done, ...out);
  }

  /** Data and hole runs tiling (offset, length) exactly, neighbours of one kind merged. */
  async #readRuns(b: Binding, offset: number, length: number): Promise<{ offset: number; bytes: number; hole: boolean }[]> {
    const runs: { offset: number; bytes: number; hole: boolean }[] = [];
    const end = offset + length;
    let at = offset;
    while (at < end) {
      const extents = await b.exp.edge.blockStatus(at, end - at);
      const before = at;
      for (const e of extents) {
        const to = Math.min(e.offset + e.bytes, end);
        if (e.offset !== at || to <= at) break;
        const hole = e.zero;
        const last = runs[runs.length - 1];
        if (last && last.hole === hole) last.bytes += to - at;
        else runs.push({ offset: at, bytes: to - at, hole });
        at = to;
      }
      if (at === before) throw new Error('block status made no progress');
    }
    return runs;
  }

  async #blockStatus(b: Binding, req: RequestHeader, offset: number, length: number): Promise<void> {
    const max = (req.flags & NBD_CMD_FLAG_REQ_ONE) !== 0 ? 1 : MAX_BLOCK_STATUS_EXTENTS;
    const out: Buffer[] = [];
    for (const [i, c] of b.contexts.entries()) {
      const extents =
        c.kind === 'allocation'
          ? await allocationExtents(b.exp.edge, offset, length, max)
          : c.kind === 'depth'
            ? await depthExtents(b.exp.edge, offset, length, max)
            : bitmapExtents(c.bitmap, offset, length, max);
      out.push(encodeBlockStatusChunk(i === b.contexts.length - 1 ? NBD_REPLY_FLAG_DONE : 0, req.cookie, c.id, extents));
    }
    this.#send(...out);
  }

  #replyError(b: Binding, req: RequestHeader, error: number, message: string): void {
    this.#send(b.structured ? encodeErrorChunk(req.cookie, error, message) : encodeSimpleReply(req.cookie, error));
  }

  // ---------------------------------------------------------------- plumbing

  /** Writes one whole message: its pieces go out back to back, never interleaved with another. */
  #send(...pieces: Uint8Array[]): boolean;
  #send(flushed: () => void, ...pieces: Uint8Array[]): boolean;
  /**
   * Writes one whole message; `flushed` runs once the socket no longer needs its pieces.
   * Returns false when the socket is gone (nothing written, `flushed` never runs).
   */
  #send(...args: (Uint8Array | (() => void))[]): boolean {
    const flushed = typeof args[0] === 'function' ? (args.shift() as () => void) : undefined;
    const pieces = args as Uint8Array[];
    const s = this.socket;
    if (s.destroyed || s.writableEnded) return false;
    const last = pieces.length - 1;
    // The callback of the last write: pieces leave in order, so all of them are out by then.
    // On an error it is called too, and the data is no longer needed either way.
    const cb = flushed ? () => flushed() : undefined;
    if (last === 0) {
      s.write(pieces[0]!, cb);
      return true;
    }
    s.cork();
    pieces.forEach((p, i) => s.write(p, i === last ? cb : undefined));
    s.uncork();
    return true;
  }

  #wait(): Promise<void> {
    return new Promise<void>((resolve) => this.#waiters.push(resolve));
  }

  async #idle(): Promise<void> {
    while (this.#inflight > 0) await this.#wait();
  }

  /** Ends the socket: gracefully (flush, FIN, wait for the peer) or at once. Resolves on 'close'. */
  async #close(ending: Ending): Promise<void> {
    const s = this.socket;
    if (s.closed) return;
    const closed = new Promise<void>((resolve) => s.once('close', () => resolve()));
    if (ending === 'disc' && !s.destroyed) {
      s.end();
      this.#lingerTimer = setTimeout(() => s.destroy(), CLOSE_LINGER_MS);
    } else {
      s.destroy();
    }
    await closed;
    if (this.#lingerTimer) clearTimeout(this.#lingerTimer);
    this.#lingerTimer = null;
  }
}

function messageOf(err: unknown): string {
  if (err instanceof Error) return err.message;
  return String(err);
}
