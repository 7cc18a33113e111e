import { connect as netConnect, type Socket } from 'node:net';
import { ShearError, alignDown, alignUp, assertRange, isShearError } from '@shear/base';
import type { BlockIO, BlockStatusExtent, WriteOptions, WriteZeroesOptions } from '@shear/block';
import { parsePort, type NbdAddress } from '../address.js';
import { errorFromNbd } from '../errors.js';
import {
  MAX_PAYLOAD_BYTES,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_ESHUTDOWN,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_FLAG_ERROR,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
} from '../protocol/constants.js';
import {
  ERROR_CHUNK_TYPES,
  ReplyDecoder,
  encodeRequest,
  parseBlockStatus,
  parseErrorChunk,
  parseOffsetData,
  parseOffsetHole,
  type Reply,
} from '../protocol/transmission.js';
import { protocolError } from '../protocol/wire-error.js';
import { OverlapOrder } from '../overlap-order.js';
import { SocketReader } from '../socket-reader.js';
import { negotiate, type BlockSizes } from './handshake.js';

export const DEFAULT_CLIENT_MAX_INFLIGHT = 64;
export const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
/** Effect length of one TRIM or WRITE_ZEROES request (no payload, so only the server's work). */
const MAX_EFFECT_BYTES = 1024 * 1024 * 1024;
/** Largest BLOCK_STATUS query (u32, as nbdinfo asks). */
const MAX_STATUS_BYTES = 0xffffffff;
/** How long close() waits for the server to hang up after DISC. */
const CLOSE_TIMEOUT_MS = 5000;

export interface NbdClientOptions {
  address: NbdAddress;
  exportName: string;
  /** Requests in flight at once; more wait their turn. */
  maxInflight?: number;
  /** Time for connecting and the handshake together. */
  connectTimeoutMs?: number;
  /** Meta contexts to negotiate besides base:allocation (e.g. `qemu:dirty-bitmap:NAME`). */
  metaContexts?: readonly string[];
}

/** One extent of a meta context as the server reported it (flags are the context's own). */
export interface NbdContextExtent {
  offset: number;
  bytes: number;
  flags: number;
}

interface Pending {
  cookie: bigint;
  type: number;
  op: string;
  offset: number;
  length: number;
  target?: Uint8Array;
  coverage?: Coverage;
  extents?: BlockStatusExtent[];
  /** Raw extents per context ID of a BLOCK_STATUS request. */
  byContext?: Map<number, NbdContextExtent[]>;
  error?: ShearError;
  resolve(): void;
  reject(err: Error): void;
}

/** Byte ranges a READ's chunks have filled, to check they tile the request exactly once. */
class Coverage {
  #ranges: [number, number][] = [];
  bytes = 0;

  /** False when (start, end) overlaps a range already added. */
  add(start: number, end: number): boolean {
    const r = this.#ranges;
    let lo = 0;
    let hi = r.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (r[mid]![0] < start) lo = mid + 1;
      else hi = mid;
    }
    if (lo > 0 && r[lo - 1]![1] > start) return false;
    if (lo < r.length && r[lo]![0] < end) return false;
    r.splice(lo, 0, [start, end]);
    this.bytes += end - start;
    return true;
  }
}

/**
 * A block node backed by an export of a remote NBD server (QEMU's `nbd` driver): fixed
 * newstyle, NBD_OPT_GO, structured replies, base:allocation for block status, many requests in
 * flight on one connection matched by cookie. Requests are split to the server's maximum
 * payload, aligned to its minimum block size (read-modify-write at unaligned edges), and use
 * FUA, FLUSH, TRIM, WRITE_ZEROES and FAST_ZERO when the server offers them. No reconnect: a
 * lost connection fails every request with ERR_NBD_DISCONNECTED.
 *
 * Owns the socket; close() sends DISC after the last request and waits for the hang-up.
 */
export class NbdClientDriver implements BlockIO {
  readonly length: number;
  readonly exportName: string;
  readonly transmissionFlags: number;
  readonly structured: boolean;
  readonly blockSizes: BlockSizes;
  readonly #allocationContextId: number | undefined;
  readonly #contexts: Map<string, number>;
  readonly #socket: Socket;
  readonly #decoder: ReplyDecoder;
  readonly #maxInflight: number;
  readonly #maxPayload: number;
  readonly #inflight = new Map<bigint, Pending>();
  /** Orders writes by whole blocks when the server has a minimum block (see #write). */
  readonly #order = new OverlapOrder();
  #slotWaiters: (() => void)[] = [];
  #idleWaiters: (() => void)[] = [];
  /** BlockIO operations started and not finished. */
  #active = 0;
  #nextCookie = 1n;
  #dead: ShearError | null = null;
  #closing: Promise<void> | null = null;
  #shutdownAsked = false;

  private constructor(socket: Socket, opts: NbdClientOptions, n: Awaited<ReturnType<typeof negotiate>>, leftover: Buffer) {
    this.#socket = socket;
    this.exportName = opts.exportName;
    this.length = n.size;
    this.transmissionFlags = n.transmissionFlags;
    this.structured = n.structured;
    this.blockSizes = n.blockSizes;
    this.#allocationContextId = n.allocationContextId;
    this.#contexts = n.contexts;
    this.#maxInflight = opts.maxInflight ?? DEFAULT_CLIENT_MAX_INFLIGHT;
    this.#maxPayload = Math.max(n.blockSizes.minimum, alignDown(Math.min(n.blockSizes.maximum, MAX_PAYLOAD_BYTES), n.blockSizes.minimum));
    this.#decoder = new ReplyDecoder({
      simpleDataBytes: (cookie) => {
        const p = this.#inflight.get(cookie);
        if (!p) return undefined;
        return p.type === NBD_CMD_READ && !this.structured ? p.length : 0;
      },
    });
    socket.on('data', (chunk: Buffer) => this.#receive(chunk));
    socket.on('drain', () => this.#wakeSlots());
    socket.on('close', () => this.#fail(new ShearError('ERR_NBD_DISCONNECTED', `Cannot use NBD export "${this.exportName}": the connection was closed`)));
    if (leftover.length > 0) this.#receive(leftover);
    socket.resume();
  }

  /**
   * Connects and negotiates.
   * @throws ERR_NBD_EXPORT_NOT_FOUND, ERR_NBD_PROTOCOL, ERR_NBD_DISCONNECTED, ERR_PERMISSION_DENIED, ERR_IO (connect failed), ERR_TIMEOUT
   */
  static async connect(opts: NbdClientOptions): Promise<NbdClientDriver> {
    const max = opts.maxInflight ?? DEFAULT_CLIENT_MAX_INFLIGHT;
    if (!Number.isInteger(max) || max < 1) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot connect to NBD: maxInflight ${max} must be a positive integer`);
    const a = opts.address;
    const where = a.type === 'unix' ? a.path : `${a.host}:${String(a.port)}`;
    const socket = a.type === 'unix' ? netConnect({ path: a.path }) : netConnect({ host: a.host, port: parsePort(a.port) });
    socket.setNoDelay(true);
    // Errors end in 'close', which fails whatever is waiting.
    socket.on('error', () => {});
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      socket.destroy();
    }, opts.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS);
    const reader = new SocketReader(socket);
    try {
      await new Promise<void>((resolve, reject) => {
        socket.once('connect', resolve);
        socket.once('error', reject);
        socket.once('close', () => reject(new Error('closed before connecting')));
      }).finally(() => socket.removeAllListeners('connect'));
      const n = await negotiate(reader, (b) => socket.write(b), opts.exportName, opts.metaContexts ?? []);
      const leftover = reader.release();
      return new NbdClientDriver(socket, opts, n, leftover);
    } catch (err) {
      reader.dispose();
      socket.destroy();
      if (timedOut) throw new ShearError('ERR_TIMEOUT', `Cannot connect to NBD server "${where}": no answer in ${opts.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS} ms`);
      if (isShearError(err)) throw err;
      throw new ShearError('ERR_IO', `Cannot connect to NBD server "${where}": ${(err as Error).message}`, { errno: (err as { code?: string }).code ?? 'EIO' }, { cause: err });
    } finally {
      clearTimeout(timer);
    }
  }

  get readOnly(): boolean {
    return (this.transmissionFlags & NBD_FLAG_READ_ONLY) !== 0;
  }

  /** Whether the server allows several connections to one export (NBD_FLAG_CAN_MULTI_CONN). */
  get canMultiConn(): boolean {
    return (this.transmissionFlags & NBD_FLAG_CAN_MULTI_CONN) !== 0;
  }

  /** Whether the server selected the meta context `name` during the handshake. */
  hasContext(name: string): boolean {
    return this.#contexts.has(name);
  }

  /**
   * The extents of meta context `name` over (offset, bytes), as the server reports them, clipped
   * to the range; they may stop short of its end (ask again from there).
   * @throws ERR_INVALID_ARGUMENT when the context was not negotiated
   */
  contextStatus(name: string, offset: number, bytes: number): Promise<NbdContextExtent[]> {
    return this.#op('query block status of', async () => {
      const id = this.#contexts.get(name);
      if (id === undefined) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot query meta context "${name}" of NBD export "${this.exportName}": it was not negotiated`);
      this.#checkRange(offset, bytes);
      if (bytes === 0) return [];
      const min = this.blockSizes.minimum;
      const start = alignDown(offset, min);
      const end = Math.min(alignUp(offset + bytes, min), this.length, start + alignDown(MAX_STATUS_BYTES, min));
      const p = await this.#request(NBD_CMD_BLOCK_STATUS, 0, start, end - start, 'query block status of');
      const out: NbdContextExtent[] = [];
      for (const e of p.byContext?.get(id) ?? []) {
        const from = Math.max(e.offset, offset);
        const to = Math.min(e.offset + e.bytes, offset + bytes);
        if (to > from) out.push({ offset: from, bytes: to - from, flags: e.flags });
      }
      if (out.length === 0) throw protocolError(`Cannot query meta context "${name}" of (${offset}, ${bytes}) over NBD: the server's extents do not cover the start of the range`);
      return out;
    });
  }

  /** Whether block status comes from the server (base:allocation was negotiated). */
  get hasBlockStatus(): boolean {
    return this.#allocationContextId !== undefined;
  }

  // ---------------------------------------------------------------- BlockIO

  read(offset: number, buf: Uint8Array): Promise<void> {
    return this.#op('read', () => this.#read(offset, buf));
  }

  write(offset: number, buf: Uint8Array, opts: WriteOptions = {}): Promise<void> {
    return this.#op('write to', () => this.#write(offset, buf, opts));
  }

  writeZeroes(offset: number, bytes: number, opts: WriteZeroesOptions = {}): Promise<void> {
    return this.#op('write zeroes to', () => this.#writeZeroes(offset, bytes, opts));
  }

  discard(offset: number, bytes: number): Promise<void> {
    return this.#op('discard on', () => this.#discard(offset, bytes));
  }

  flush(): Promise<void> {
    return this.#op('flush', () => this.#flush());
  }

  blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    return this.#op('query block status of', () => this.#blockStatus(offset, bytes));
  }

  /** Waits for the operations already started, sends DISC, and closes the connection. Idempotent. */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  // ---------------------------------------------------------------- operations

  /** Runs one BlockIO operation, counted so close() can wait for it; none starts after close(). */
  async #op<T>(op: string, fn: () => Promise<T>): Promise<T> {
    this.#checkOpen(op);
    this.#active++;
    try {
      return await fn();
    } finally {
      if (--this.#active === 0) for (const w of this.#idleWaiters.splice(0)) w();
    }
  }

  async #read(offset: number, buf: Uint8Array): Promise<void> {
    this.#checkRange(offset, buf.length);
    if (buf.length === 0) return;
    const min = this.blockSizes.minimum;
    const start = alignDown(offset, min);
    const end = Math.min(alignUp(offset + buf.length, min), this.length);
    if (start === offset && end === offset + buf.length) {
      await this.#readAligned(offset, buf);
      return;
    }
    const bounce = new Uint8Array(end - start);
    await this.#readAligned(start, bounce);
    buf.set(bounce.subarray(offset - start, offset - start + buf.length));
  }

  async #write(offset: number, buf: Uint8Array, opts: WriteOptions): Promise<void> {
    this.#checkRange(offset, buf.length);
    this.#checkWritable('write to');
    if (buf.length === 0) return;
    const min = this.blockSizes.minimum;
    const start = alignDown(offset, min);
    const end = Math.min(alignUp(offset + buf.length, min), this.length);
    // With a minimum block, writes are ordered by whole blocks: a read-modify-write must not
    // write back a block another write changed after it was read.
    const ticket = min > 1 ? this.#order.enter(start, end - start, true) : null;
    try {
      await ticket?.ready;
      let data = buf;
      const headPartial = start !== offset;
      const tailPartial = end !== offset + buf.length;
      if (headPartial || tailPartial) {
        // Read-modify-write of the partial blocks at the edges.
        data = new Uint8Array(end - start);
        const edges: Promise<void>[] = [];
        if (headPartial) edges.push(this.#readAligned(start, data.subarray(0, Math.min(min, end - start))));
        const tail = alignDown(offset + buf.length, min);
        if (tailPartial && !(headPartial && tail === start)) edges.push(this.#readAligned(tail, data.subarray(tail - start, end - start)));
        await settleAll(edges);
        data.set(buf, offset - start);
      }
      const fua = opts.fua === true;
      const flags = fua && this.#has(NBD_FLAG_SEND_FUA) ? NBD_CMD_FLAG_FUA : 0;
      await this.#inPieces(start, data.length, this.#maxPayload, (at, bytes) =>
        this.#request(NBD_CMD_WRITE, flags, at, bytes, 'write to', data.subarray(at - start, at - start + bytes)),
      );
      if (fua && flags === 0) await this.#flush();
    } finally {
      ticket?.release();
    }
  }

  async #writeZeroes(offset: number, bytes: number, opts: WriteZeroesOptions): Promise<void> {
    this.#checkRange(offset, bytes);
    this.#checkWritable('write zeroes to');
    if (bytes === 0) return;
    const fastOnly = opts.fastOnly === true;
    const canZero = this.#has(NBD_FLAG_SEND_WRITE_ZEROES);
    if (fastOnly && !(canZero && this.#has(NBD_FLAG_SEND_FAST_ZERO))) {
      throw new ShearError('ERR_NOT_IMPLEMENTED', `Cannot write zeroes fast to NBD export "${this.exportName}": the server does not offer FAST_ZERO`, { offset, bytes, op: 'write zeroes' });
    }
    const min = this.blockSizes.minimum;
    const start = alignUp(offset, min);
    const end = offset + bytes === this.length ? this.length : alignDown(offset + bytes, min);
    if (!canZero || end <= start) {
      if (fastOnly) throw new ShearError('ERR_NOT_IMPLEMENTED', `Cannot write zeroes fast to (${offset}, ${bytes}): smaller than the server's block of ${min} bytes`, { offset, bytes });
      await this.#writeZeroBuffers(offset, bytes, opts.fua === true);
      return;
    }
    if (fastOnly && (start > offset || end < offset + bytes)) {
      throw new ShearError('ERR_NOT_IMPLEMENTED', `Cannot write zeroes fast to (${offset}, ${bytes}): not aligned to the server's block of ${min} bytes`, { offset, bytes });
    }
    const fua = opts.fua === true;
    let flags = opts.mayUnmap ? 0 : NBD_CMD_FLAG_NO_HOLE;
    if (fastOnly) flags |= NBD_CMD_FLAG_FAST_ZERO;
    if (fua && this.#has(NBD_FLAG_SEND_FUA)) flags |= NBD_CMD_FLAG_FUA;
    const work: Promise<unknown>[] = [];
    // Partial blocks at the edges are written as zero buffers (each orders itself by block).
    if (start > offset) work.push(this.#writeZeroBuffers(offset, start - offset, fua));
    if (end < offset + bytes) work.push(this.#writeZeroBuffers(end, offset + bytes - end, fua));
    const ticket = min > 1 ? this.#order.enter(start, end - start, true) : null;
    work.push(
      (async () => {
        try {
          await ticket?.ready;
          await this.#inPieces(start, end - start, alignDown(MAX_EFFECT_BYTES, min), (at, n) => this.#request(NBD_CMD_WRITE_ZEROES, flags, at, n, 'write zeroes to'));
        } finally {
          ticket?.release();
        }
      })(),
    );
    await settleAll(work);
    if (fua && !this.#has(NBD_FLAG_SEND_FUA)) await this.#flush();
  }

  async #discard(offset: number, bytes: number): Promise<void> {
    this.#checkRange(offset, bytes);
    this.#checkWritable('discard on');
    if (bytes === 0 || !this.#has(NBD_FLAG_SEND_TRIM)) return;
    const min = this.blockSizes.minimum;
    const start = alignUp(offset, min);
    const end = offset + bytes === this.length ? this.length : alignDown(offset + bytes, min);
    if (end <= start) return;
    await this.#inPieces(start, end - start, alignDown(MAX_EFFECT_BYTES, min), (at, n) => this.#request(NBD_CMD_TRIM, 0, at, n, 'discard on'));
  }

  async #flush(): Promise<void> {
    if (!this.#has(NBD_FLAG_SEND_FLUSH)) return;
    await this.#request(NBD_CMD_FLUSH, 0, 0, 0, 'flush');
  }

  async #blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    this.#checkRange(offset, bytes);
    if (bytes === 0) return [];
    if (this.#allocationContextId === undefined) return [{ offset, bytes, data: true, zero: false, allocated: true }];
    const min = this.blockSizes.minimum;
    const start = alignDown(offset, min);
    const end = Math.min(alignUp(offset + bytes, min), this.length, start + alignDown(MAX_STATUS_BYTES, min));
    const p = await this.#request(NBD_CMD_BLOCK_STATUS, 0, start, end - start, 'query block status of');
    const out: BlockStatusExtent[] = [];
    const want = offset + bytes;
    for (const e of p.extents ?? []) {
      const from = Math.max(e.offset, offset);
      const to = Math.min(e.offset + e.bytes, want);
      if (to <= from) continue;
      const last = out[out.length - 1];
      if (last && last.data === e.data && last.zero === e.zero && last.offset + last.bytes === from) last.bytes += to - from;
      else out.push({ ...e, offset: from, bytes: to - from });
    }
    if (out.length === 0) throw protocolError(`Cannot query block status of (${offset}, ${bytes}) over NBD: the server's extents do not cover the start of the range`);
    return out;
  }

  // ---------------------------------------------------------------- requests

  async #readAligned(offset: number, buf: Uint8Array): Promise<void> {
    await this.#inPieces(offset, buf.length, this.#maxPayload, async (at, bytes) => {
      await this.#request(NBD_CMD_READ, 0, at, bytes, 'read', undefined, buf.subarray(at - offset, at - offset + bytes));
    });
  }

  async #writeZeroBuffers(offset: number, bytes: number, fua: boolean): Promise<void> {
    const zero = new Uint8Array(Math.min(bytes, this.#maxPayload, 1024 * 1024));
    for (let at = offset; at < offset + bytes; at += zero.length) {
      const n = Math.min(zero.length, offset + bytes - at);
      await this.#write(at, zero.subarray(0, n), { fua });
    }
  }

  /** Runs fn on consecutive pieces of at most `piece` bytes, all in flight together. */
  async #inPieces(offset: number, bytes: number, piece: number, fn: (at: number, bytes: number) => Promise<unknown>): Promise<void> {
    const all: Promise<unknown>[] = [];
    for (let at = offset; at < offset + bytes; at += piece) all.push(fn(at, Math.min(piece, offset + bytes - at)));
    await settleAll(all);
  }

  /** Sends one request once a slot is free and resolves with its settled record. */
  async #request(type: number, flags: number, offset: number, length: number, op: string, payload?: Uint8Array, target?: Uint8Array): Promise<Pending> {
    while (!this.#dead && (this.#inflight.size >= this.#maxInflight || this.#socket.writableNeedDrain)) {
      await new Promise<void>((resolve) => this.#slotWaiters.push(resolve));
    }
    if (this.#dead) throw this.#dead;
    const cookie = this.#nextCookie++;
    return new Promise<Pending>((resolve, reject) => {
      const p: Pending = { cookie, type, op, offset, length, resolve: () => resolve(p), reject };
      if (target) p.target = target;
      if (type === NBD_CMD_READ) p.coverage = new Coverage();
      if (type === NBD_CMD_BLOCK_STATUS) {
        p.extents = [];
        p.byContext = new Map();
      }
      this.#inflight.set(cookie, p);
      const header = encodeRequest({ flags, type, cookie, offset: BigInt(offset), length });
      const s = this.#socket;
      s.cork();
      s.write(header);
      if (payload) s.write(payload);
      s.uncork();
    });
  }

  #receive(chunk: Buffer): void {
    this.#decoder.push(chunk);
    try {
      for (let r = this.#decoder.next(); r; r = this.#decoder.next()) this.#dispatch(r);
    } catch (err) {
      this.#fail(isShearError(err) ? err : protocolError(`Cannot decode the server's replies: ${(err as Error).message}`));
    }
  }

  /** Applies one reply or chunk to its request. Throws (ERR_NBD_PROTOCOL) for a broken stream. */
  #dispatch(r: Reply): void {
    const p = this.#inflight.get(r.cookie);
    if (!p) throw protocolError(`Cannot match a reply: cookie ${r.cookie} is not in flight`);
    if (r.kind === 'simple') {
      if (r.error !== 0) {
        p.error = this.#remoteError(p, r.error, '');
      } else if (p.type === NBD_CMD_READ) {
        if (this.structured || !r.data) throw protocolError('Cannot accept a simple reply to a READ after structured replies were negotiated');
        p.target!.set(r.data);
        p.coverage!.add(0, p.length);
      } else if (p.type === NBD_CMD_BLOCK_STATUS) {
        throw protocolError('Cannot accept a simple success reply to BLOCK_STATUS');
      }
      this.#settle(p);
      return;
    }
    if (!this.structured) throw protocolError('Cannot accept a structured reply chunk: structured replies were not negotiated');
    const done = (r.flags & NBD_REPLY_FLAG_DONE) !== 0;
    switch (r.type) {
      case NBD_REPLY_TYPE_NONE:
        if (!done || r.payload.length !== 0) throw protocolError('Cannot accept a NONE chunk without DONE or with a payload');
        break;
      case NBD_REPLY_TYPE_OFFSET_DATA: {
        if (p.type !== NBD_CMD_READ) throw protocolError(`Cannot accept read data in the reply to a ${p.op} request`);
        const { offset, data } = parseOffsetData(r.payload);
        const at = this.#within(p, offset, data.length);
        p.target!.set(data, at);
        break;
      }
      case NBD_REPLY_TYPE_OFFSET_HOLE: {
        if (p.type !== NBD_CMD_READ) throw protocolError(`Cannot accept a hole in the reply to a ${p.op} request`);
        const { offset, bytes } = parseOffsetHole(r.payload);
        const at = this.#within(p, offset, bytes);
        p.target!.fill(0, at, at + bytes);
        break;
      }
      case NBD_REPLY_TYPE_BLOCK_STATUS: {
        if (p.type !== NBD_CMD_BLOCK_STATUS) throw protocolError(`Cannot accept block status in the reply to a ${p.op} request`);
        const { contextId, extents } = parseBlockStatus(r.payload);
        if (![...this.#contexts.values()].includes(contextId)) throw protocolError(`Cannot accept block status for context ${contextId}: it was not negotiated`);
        if (p.byContext!.has(contextId)) throw protocolError('Cannot accept two block status chunks for one context');
        const raw: NbdContextExtent[] = [];
        p.byContext!.set(contextId, raw);
        let at = p.offset;
        for (const e of extents) {
          // Only the last extent may run past the request, and never past the export.
          const bytes = Math.min(e.length, this.length - at);
          if (bytes <= 0) break;
          raw.push({ offset: at, bytes, flags: e.flags });
          if (contextId === this.#allocationContextId) p.extents!.push({ offset: at, bytes, data: (e.flags & NBD_STATE_HOLE) === 0, zero: (e.flags & NBD_STATE_ZERO) !== 0, allocated: true });
          at += bytes;
        }
        break;
      }
      default:
        if (ERROR_CHUNK_TYPES.has(r.type) || (r.type & NBD_REPLY_TYPE_FLAG_ERROR) !== 0) {
          let e: { error: number; message: string };
          try {
            e = parseErrorChunk(r.type, r.payload);
          } catch {
            // An error chunk of an unknown type: its layout is not ours to know; the spec says EINVAL-like.
            e = { error: 22, message: `the server sent error chunk type ${r.type}` };
          }
          p.error ??= this.#remoteError(p, e.error, e.message);
          break;
        }
        throw protocolError(`Cannot accept reply chunk type ${r.type}`);
    }
    if (done) this.#settle(p);
  }

  /** Checks a READ chunk lies inside the request and overlaps no earlier chunk; returns its index in the buffer. */
  #within(p: Pending, offset: bigint, bytes: number): number {
    const start = BigInt(p.offset);
    if (offset < start || offset + BigInt(bytes) > start + BigInt(p.length)) {
      throw protocolError(`Cannot accept a chunk at (${offset}, ${bytes}): it lies outside the request (${p.offset}, ${p.length})`);
    }
    const at = Number(offset - start);
    if (!p.coverage!.add(at, at + bytes)) throw protocolError(`Cannot accept a chunk at (${offset}, ${bytes}): it overlaps another chunk of the reply`);
    return at;
  }

  #remoteError(p: Pending, value: number, message: string): ShearError {
    if (value === NBD_ESHUTDOWN) this.#shutdownAsked = true;
    return errorFromNbd(value, message, { op: p.op, offset: p.offset, bytes: p.length });
  }

  #settle(p: Pending): void {
    this.#inflight.delete(p.cookie);
    if (p.error) p.reject(p.error);
    else if (p.type === NBD_CMD_READ && p.coverage!.bytes !== p.length) {
      p.reject(protocolError(`Cannot read (${p.offset}, ${p.length}) over NBD: the server's reply covered ${p.coverage!.bytes} bytes`));
    } else if (p.type === NBD_CMD_BLOCK_STATUS && p.byContext!.size === 0) {
      p.reject(protocolError(`Cannot query block status of (${p.offset}, ${p.length}) over NBD: the server sent no extents`));
    } else p.resolve();
    this.#wakeSlots();
    // A server shutting down asks us to leave (spec: ESHUTDOWN means soft disconnect).
    if (this.#shutdownAsked && !this.#dead) {
      this.#dead = new ShearError('ERR_NBD_DISCONNECTED', `Cannot use NBD export "${this.exportName}": the server is shutting down`);
      void this.close();
    }
  }

  #wakeSlots(): void {
    for (const w of this.#slotWaiters.splice(0)) w();
  }

  /** The connection is unusable: every request fails, the socket is destroyed. */
  #fail(err: ShearError): void {
    if (!this.#dead) this.#dead = err;
    for (const p of this.#inflight.values()) p.reject(err);
    this.#inflight.clear();
    this.#wakeSlots();
    this.#socket.destroy();
  }

  async #close(): Promise<void> {
    const s = this.#socket;
    while (this.#active > 0) await new Promise<void>((resolve) => this.#idleWaiters.push(resolve));
    this.#dead ??= new ShearError('ERR_CLOSED', `Cannot use NBD export "${this.exportName}": the driver is closed`);
    if (s.closed) return;
    const closed = new Promise<void>((resolve) => s.once('close', () => resolve()));
    if (!s.destroyed) {
      s.end(encodeRequest({ flags: 0, type: NBD_CMD_DISC, cookie: this.#nextCookie++, offset: 0n, length: 0 }));
    }
    const timer = setTimeout(() => s.destroy(), CLOSE_TIMEOUT_MS);
    await closed;
    clearTimeout(timer);
  }

  #has(flag: number): boolean {
    return (this.transmissionFlags & flag) !== 0;
  }

  #checkOpen(op: string): void {
    if (this.#closing) throw new ShearError('ERR_CLOSED', `Cannot ${op} NBD export "${this.exportName}": the driver is closed`);
    if (this.#dead) throw this.#dead;
  }

  #checkRange(offset: number, bytes: number): void {
    assertRange(offset, bytes, this.length, `range of NBD export "${this.exportName}"`);
  }

  #checkWritable(op: string): void {
    if (this.readOnly) throw new ShearError('ERR_READ_ONLY', `Cannot ${op} NBD export "${this.exportName}": the server exports it read-only`, { op, errno: 'EPERM' });
  }
}

/** Waits for every promise (so nothing runs on after we return), then throws the first failure. */
async function settleAll(promises: Promise<unknown>[]): Promise<void> {
  const results = await Promise.allSettled(promises);
  const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
}
