import {
  MAX_ERROR_MESSAGE_BYTES,
  MAX_PAYLOAD_BYTES,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  REQUEST_HEADER_BYTES,
  SIMPLE_REPLY_HEADER_BYTES,
  STRUCTURED_REPLY_HEADER_BYTES,
} from './constants.js';
import { ByteQueue } from './byte-queue.js';
import { decodeString, encodeTruncated } from './strings.js';
import { protocolError } from './wire-error.js';

/**
 * The transmission-phase codec: request headers, simple replies and structured reply chunks.
 * Cookies (the spec's "handle") and offsets are BigInt: cookies are opaque 64-bit values that
 * must round-trip bit-exactly, and offsets are checked against the export size before anyone
 * turns them into numbers.
 */

export interface RequestHeader {
  flags: number;
  type: number;
  cookie: bigint;
  offset: bigint;
  length: number;
}

export function encodeRequest(h: RequestHeader, payload?: Uint8Array): Buffer {
  const b = Buffer.allocUnsafe(REQUEST_HEADER_BYTES + (payload?.length ?? 0));
  b.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  b.writeUInt16BE(h.flags, 4);
  b.writeUInt16BE(h.type, 6);
  b.writeBigUInt64BE(h.cookie, 8);
  b.writeBigUInt64BE(h.offset, 16);
  b.writeUInt32BE(h.length, 24);
  if (payload) b.set(payload, REQUEST_HEADER_BYTES);
  return b;
}

/** @throws ERR_NBD_PROTOCOL on a wrong size or bad magic */
export function parseRequestHeader(buf: Uint8Array): RequestHeader {
  if (buf.length !== REQUEST_HEADER_BYTES) throw protocolError(`Cannot parse a request: expected ${REQUEST_HEADER_BYTES} bytes, got ${buf.length}`);
  const b = Buffer.from(buf.buffer, buf.byteOffset, buf.length);
  const magic = b.readUInt32BE(0);
  if (magic !== NBD_REQUEST_MAGIC) throw protocolError(`Cannot parse a request: bad magic 0x${magic.toString(16).padStart(8, '0')}`);
  return { flags: b.readUInt16BE(4), type: b.readUInt16BE(6), cookie: b.readBigUInt64BE(8), offset: b.readBigUInt64BE(16), length: b.readUInt32BE(24) };
}

// ---- replies (server side) ----

/** A simple reply header; a successful READ's data follows it. */
export function encodeSimpleReply(cookie: bigint, error: number): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_HEADER_BYTES);
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error >>> 0, 4);
  b.writeBigUInt64BE(cookie, 8);
  return b;
}

function chunk(flags: number, type: number, cookie: bigint, payloadBytes: number, extra: number): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_BYTES + extra);
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(cookie, 8);
  b.writeUInt32BE(payloadBytes, 16);
  return b;
}

export function encodeNoneChunk(cookie: bigint): Buffer {
  return chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, 0, 0);
}

/** The header (and offset) of an OFFSET_DATA chunk; `dataBytes` of data must follow. */
export function encodeOffsetDataHeader(flags: number, cookie: bigint, offset: number, dataBytes: number): Buffer {
  const b = chunk(flags, NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + dataBytes, 8);
  b.writeBigUInt64BE(BigInt(offset), STRUCTURED_REPLY_HEADER_BYTES);
  return b;
}

export function encodeHoleChunk(flags: number, cookie: bigint, offset: number, bytes: number): Buffer {
  const b = chunk(flags, NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12, 12);
  b.writeBigUInt64BE(BigInt(offset), STRUCTURED_REPLY_HEADER_BYTES);
  b.writeUInt32BE(bytes, STRUCTURED_REPLY_HEADER_BYTES + 8);
  return b;
}

export interface WireExtent {
  /** Non-zero, fits u32. */
  length: number;
  flags: number;
}

export function encodeBlockStatusChunk(flags: number, cookie: bigint, contextId: number, extents: readonly WireExtent[]): Buffer {
  const payload = 4 + 8 * extents.length;
  const b = chunk(flags, NBD_REPLY_TYPE_BLOCK_STATUS, cookie, payload, payload);
  let at = STRUCTURED_REPLY_HEADER_BYTES;
  b.writeUInt32BE(contextId >>> 0, at);
  at += 4;
  for (const e of extents) {
    b.writeUInt32BE(e.length, at);
    b.writeUInt32BE(e.flags >>> 0, at + 4);
    at += 8;
  }
  return b;
}

/** An ERROR chunk (always final here); the message is cut to MAX_ERROR_MESSAGE_BYTES. */
export function encodeErrorChunk(cookie: bigint, error: number, message: string): Buffer {
  const msg = encodeTruncated(message, MAX_ERROR_MESSAGE_BYTES);
  const payload = 6 + msg.length;
  const b = chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, cookie, payload, payload);
  b.writeUInt32BE(error >>> 0, STRUCTURED_REPLY_HEADER_BYTES);
  b.writeUInt16BE(msg.length, STRUCTURED_REPLY_HEADER_BYTES + 4);
  msg.copy(b, STRUCTURED_REPLY_HEADER_BYTES + 6);
  return b;
}

// ---- replies (client side) ----

export type Reply =
  | { kind: 'simple'; cookie: bigint; error: number; data?: Buffer }
  | { kind: 'chunk'; cookie: bigint; flags: number; type: number; payload: Buffer };

export interface ReplyDecoderOptions {
  /**
   * Bytes of data that follow a successful simple reply for this cookie (the READ length), or
   * undefined when the cookie is not in flight (a protocol error).
   */
  simpleDataBytes(cookie: bigint): number | undefined;
  /** Largest chunk payload accepted; default MAX_PAYLOAD_BYTES + 8. */
  maxChunkBytes?: number;
}

type DecoderState =
  | { at: 'magic' }
  | { at: 'simple-header' }
  | { at: 'simple-data'; cookie: bigint; bytes: number }
  | { at: 'chunk-header' }
  | { at: 'chunk-payload'; cookie: bigint; flags: number; type: number; bytes: number };

/**
 * Splits the server's byte stream into replies. Feed bytes with push(); take whole replies
 * with next() until it returns null. After a protocol error the stream cannot be resynced: the
 * decoder stays failed and the caller must drop the connection.
 */
export class ReplyDecoder {
  readonly #queue = new ByteQueue();
  readonly #opts: ReplyDecoderOptions;
  readonly #maxChunk: number;
  #state: DecoderState = { at: 'magic' };
  #failed: Error | null = null;

  constructor(opts: ReplyDecoderOptions) {
    this.#opts = opts;
    this.#maxChunk = opts.maxChunkBytes ?? MAX_PAYLOAD_BYTES + 8;
  }

  /** Bytes received and not yet returned as part of a reply. */
  get buffered(): number {
    return this.#queue.length;
  }

  push(bytes: Uint8Array): void {
    this.#queue.push(bytes);
  }

  /** @throws ERR_NBD_PROTOCOL (and keeps throwing it) */
  next(): Reply | null {
    if (this.#failed) throw this.#failed;
    try {
      return this.#step();
    } catch (err) {
      this.#failed = err as Error;
      this.#queue.clear();
      throw err;
    }
  }

  #step(): Reply | null {
    const q = this.#queue;
    for (;;) {
      const s = this.#state;
      switch (s.at) {
        case 'magic': {
          if (q.length < 4) return null;
          const magic = q.take(4).readUInt32BE(0);
          if (magic === NBD_SIMPLE_REPLY_MAGIC) this.#state = { at: 'simple-header' };
          else if (magic === NBD_STRUCTURED_REPLY_MAGIC) this.#state = { at: 'chunk-header' };
          else throw protocolError(`Cannot parse a reply: bad magic 0x${magic.toString(16).padStart(8, '0')}`);
          break;
        }
        case 'simple-header': {
          if (q.length < SIMPLE_REPLY_HEADER_BYTES - 4) return null;
          const h = q.take(SIMPLE_REPLY_HEADER_BYTES - 4);
          const error = h.readUInt32BE(0);
          const cookie = h.readBigUInt64BE(4);
          const bytes = this.#opts.simpleDataBytes(cookie);
          if (bytes === undefined) throw protocolError(`Cannot parse a reply: cookie ${cookie} is not in flight`);
          if (error !== 0 || bytes === 0) {
            this.#state = { at: 'magic' };
            return { kind: 'simple', cookie, error };
          }
          this.#state = { at: 'simple-data', cookie, bytes };
          break;
        }
        case 'simple-data': {
          if (q.length < s.bytes) return null;
          this.#state = { at: 'magic' };
          return { kind: 'simple', cookie: s.cookie, error: 0, data: q.take(s.bytes) };
        }
        case 'chunk-header': {
          if (q.length < STRUCTURED_REPLY_HEADER_BYTES - 4) return null;
          const h = q.take(STRUCTURED_REPLY_HEADER_BYTES - 4);
          const bytes = h.readUInt32BE(12);
          if (bytes > this.#maxChunk) throw protocolError(`Cannot parse a reply chunk: a payload of ${bytes} bytes is over the limit of ${this.#maxChunk}`);
          this.#state = { at: 'chunk-payload', flags: h.readUInt16BE(0), type: h.readUInt16BE(2), cookie: h.readBigUInt64BE(4), bytes };
          break;
        }
        case 'chunk-payload': {
          if (q.length < s.bytes) return null;
          this.#state = { at: 'magic' };
          return { kind: 'chunk', cookie: s.cookie, flags: s.flags, type: s.type, payload: q.take(s.bytes) };
        }
      }
    }
  }
}

// ---- chunk payloads ----

export function parseOffsetData(payload: Buffer): { offset: bigint; data: Buffer } {
  if (payload.length < 9) throw protocolError(`Cannot parse an OFFSET_DATA chunk: ${payload.length} bytes is too short`);
  return { offset: payload.readBigUInt64BE(0), data: payload.subarray(8) };
}

export function parseOffsetHole(payload: Buffer): { offset: bigint; bytes: number } {
  if (payload.length !== 12) throw protocolError(`Cannot parse an OFFSET_HOLE chunk: expected 12 bytes, got ${payload.length}`);
  const bytes = payload.readUInt32BE(8);
  if (bytes === 0) throw protocolError('Cannot parse an OFFSET_HOLE chunk: the hole is empty');
  return { offset: payload.readBigUInt64BE(0), bytes };
}

export function parseBlockStatus(payload: Buffer): { contextId: number; extents: WireExtent[] } {
  if (payload.length < 12 || (payload.length - 4) % 8 !== 0) throw protocolError(`Cannot parse a BLOCK_STATUS chunk: ${payload.length} bytes is not 4 + 8n (n >= 1)`);
  const extents: WireExtent[] = [];
  for (let at = 4; at < payload.length; at += 8) {
    const length = payload.readUInt32BE(at);
    if (length === 0) throw protocolError('Cannot parse a BLOCK_STATUS chunk: an extent is empty');
    extents.push({ length, flags: payload.readUInt32BE(at + 4) });
  }
  return { contextId: payload.readUInt32BE(0), extents };
}

export function parseErrorChunk(type: number, payload: Buffer): { error: number; message: string; offset?: bigint } {
  if (payload.length < 6) throw protocolError(`Cannot parse an error chunk: ${payload.length} bytes is too short`);
  const error = payload.readUInt32BE(0);
  const msgLen = payload.readUInt16BE(4);
  const expected = 6 + msgLen + (type === NBD_REPLY_TYPE_ERROR_OFFSET ? 8 : 0);
  if (payload.length !== expected) throw protocolError(`Cannot parse an error chunk: expected ${expected} bytes, got ${payload.length}`);
  if (error === 0) throw protocolError('Cannot parse an error chunk: the error value is 0');
  const message = decodeString(payload.subarray(6, 6 + msgLen), 'an error message');
  if (type === NBD_REPLY_TYPE_ERROR_OFFSET) return { error, message, offset: payload.readBigUInt64BE(6 + msgLen) };
  return { error, message };
}

export const ERROR_CHUNK_TYPES: ReadonlySet<number> = new Set([NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_ERROR_OFFSET]);
