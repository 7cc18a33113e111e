import {
  CLIENT_FLAGS_BYTES,
  EXPORT_NAME_PADDING_BYTES,
  EXPORT_NAME_REPLY_BYTES,
  GREETING_BYTES,
  MAX_STRING_BYTES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_INIT_MAGIC,
  NBD_OPTS_MAGIC,
  NBD_REP_MAGIC,
  OPTION_HEADER_BYTES,
  OPTION_REPLY_HEADER_BYTES,
} from './constants.js';
import { decodeString } from './strings.js';
import { protocolError } from './wire-error.js';

/**
 * The handshake (option haggling) codec: pure functions from bytes to values and back. Parsers
 * take exactly the bytes of one message and throw ERR_NBD_PROTOCOL (nothing else) when the bytes
 * are not a valid message.
 */

function need(buf: Uint8Array, bytes: number, what: string): Buffer {
  if (buf.length !== bytes) throw protocolError(`Cannot parse ${what}: expected ${bytes} bytes, got ${buf.length}`);
  return Buffer.from(buf.buffer, buf.byteOffset, buf.length);
}

/** Reads a u32 length and that many string bytes at `at`; returns the string and the next position. */
function readLengthPrefixed(b: Buffer, at: number, what: string): { text: string; next: number } {
  if (b.length - at < 4) throw protocolError(`Cannot parse ${what}: the length field is cut short`);
  const len = b.readUInt32BE(at);
  if (len > MAX_STRING_BYTES) throw protocolError(`Cannot parse ${what}: length ${len} is over the limit of ${MAX_STRING_BYTES}`);
  if (len > b.length - at - 4) throw protocolError(`Cannot parse ${what}: length ${len} runs past the end of the option (${b.length - at - 4} bytes left)`);
  return { text: decodeString(b.subarray(at + 4, at + 4 + len), what), next: at + 4 + len };
}

function lengthPrefixed(text: string): Buffer {
  const bytes = Buffer.from(text, 'utf8');
  const out = Buffer.allocUnsafe(4 + bytes.length);
  out.writeUInt32BE(bytes.length, 0);
  bytes.copy(out, 4);
  return out;
}

// ---- greeting and client flags ----

export function encodeGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.alloc(GREETING_BYTES);
  b.writeBigUInt64BE(NBD_INIT_MAGIC, 0);
  b.writeBigUInt64BE(NBD_OPTS_MAGIC, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

/** @returns the server's handshake flags */
export function parseGreeting(buf: Uint8Array): number {
  const b = need(buf, GREETING_BYTES, 'the server greeting');
  if (b.readBigUInt64BE(0) !== NBD_INIT_MAGIC) throw protocolError('Cannot parse the server greeting: bad NBDMAGIC (not an NBD server?)');
  if (b.readBigUInt64BE(8) !== NBD_OPTS_MAGIC) throw protocolError('Cannot parse the server greeting: not a newstyle server (oldstyle is not supported)');
  return b.readUInt16BE(16);
}

export function encodeClientFlags(flags: number): Buffer {
  const b = Buffer.alloc(CLIENT_FLAGS_BYTES);
  b.writeUInt32BE(flags >>> 0, 0);
  return b;
}

export function parseClientFlags(buf: Uint8Array): number {
  return need(buf, CLIENT_FLAGS_BYTES, 'the client flags').readUInt32BE(0);
}

// ---- option requests ----

export interface OptionHeader {
  option: number;
  length: number;
}

export function encodeOption(option: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(OPTION_HEADER_BYTES + data.length);
  b.writeBigUInt64BE(NBD_OPTS_MAGIC, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(data.length, 12);
  b.set(data, OPTION_HEADER_BYTES);
  return b;
}

export function parseOptionHeader(buf: Uint8Array): OptionHeader {
  const b = need(buf, OPTION_HEADER_BYTES, 'an option header');
  if (b.readBigUInt64BE(0) !== NBD_OPTS_MAGIC) throw protocolError('Cannot parse an option header: bad IHAVEOPT magic');
  return { option: b.readUInt32BE(8), length: b.readUInt32BE(12) };
}

/** The data of NBD_OPT_INFO and NBD_OPT_GO. */
export interface ExportRequest {
  name: string;
  /** Requested NBD_INFO_* types, as sent (duplicates and unknown types kept). */
  infos: number[];
}

export function encodeExportRequest(req: ExportRequest): Buffer {
  const tail = Buffer.allocUnsafe(2 + 2 * req.infos.length);
  tail.writeUInt16BE(req.infos.length, 0);
  req.infos.forEach((t, i) => tail.writeUInt16BE(t, 2 + 2 * i));
  return Buffer.concat([lengthPrefixed(req.name), tail]);
}

export function parseExportRequest(data: Uint8Array): ExportRequest {
  const b = Buffer.from(data.buffer, data.byteOffset, data.length);
  const { text: name, next } = readLengthPrefixed(b, 0, 'the export name');
  if (b.length - next < 2) throw protocolError('Cannot parse the info request list: its count is missing');
  const count = b.readUInt16BE(next);
  if (b.length - next - 2 !== 2 * count) {
    throw protocolError(`Cannot parse the info request list: ${count} requests need ${2 * count} bytes, the option has ${b.length - next - 2}`);
  }
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(b.readUInt16BE(next + 2 + 2 * i));
  return { name, infos };
}

/** The data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT. */
export interface MetaContextRequest {
  name: string;
  queries: string[];
}

export function encodeMetaContextRequest(req: MetaContextRequest): Buffer {
  const count = Buffer.allocUnsafe(4);
  count.writeUInt32BE(req.queries.length, 0);
  return Buffer.concat([lengthPrefixed(req.name), count, ...req.queries.map(lengthPrefixed)]);
}

export function parseMetaContextRequest(data: Uint8Array): MetaContextRequest {
  const b = Buffer.from(data.buffer, data.byteOffset, data.length);
  const { text: name, next } = readLengthPrefixed(b, 0, 'the export name');
  if (b.length - next < 4) throw protocolError('Cannot parse the query list: its count is missing');
  const count = b.readUInt32BE(next);
  // Each query takes at least its 4-byte length: a count the data cannot hold is refused up front.
  if (count > (b.length - next - 4) / 4) throw protocolError(`Cannot parse the query list: ${count} queries do not fit in the option`);
  const queries: string[] = [];
  let at = next + 4;
  for (let i = 0; i < count; i++) {
    const q = readLengthPrefixed(b, at, 'a query');
    queries.push(q.text);
    at = q.next;
  }
  if (at !== b.length) throw protocolError(`Cannot parse the query list: ${b.length - at} bytes follow the last query`);
  return { name, queries };
}

// ---- option replies ----

export interface OptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

export function encodeOptionReply(option: number, type: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(OPTION_REPLY_HEADER_BYTES + data.length);
  b.writeBigUInt64BE(NBD_REP_MAGIC, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  b.set(data, OPTION_REPLY_HEADER_BYTES);
  return b;
}

export function parseOptionReplyHeader(buf: Uint8Array): OptionReplyHeader {
  const b = need(buf, OPTION_REPLY_HEADER_BYTES, 'an option reply header');
  if (b.readBigUInt64BE(0) !== NBD_REP_MAGIC) throw protocolError('Cannot parse an option reply: bad reply magic');
  return { option: b.readUInt32BE(8), type: b.readUInt32BE(12), length: b.readUInt32BE(16) };
}

/** NBD_REP_SERVER data: name, then optional description filling the rest. */
export function encodeServerReply(name: string, description?: string): Buffer {
  return Buffer.concat([lengthPrefixed(name), Buffer.from(description ?? '', 'utf8')]);
}

export function parseServerReply(data: Uint8Array): { name: string; description: string } {
  const b = Buffer.from(data.buffer, data.byteOffset, data.length);
  const { text: name, next } = readLengthPrefixed(b, 0, 'an export name');
  return { name, description: decodeString(b.subarray(next), 'an export description') };
}

export function encodeMetaContextReply(id: number, name: string): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(id >>> 0, 0);
  return Buffer.concat([b, Buffer.from(name, 'utf8')]);
}

export function parseMetaContextReply(data: Uint8Array): { id: number; name: string } {
  if (data.length < 4) throw protocolError(`Cannot parse a meta context reply: ${data.length} bytes is too short`);
  const b = Buffer.from(data.buffer, data.byteOffset, data.length);
  return { id: b.readUInt32BE(0), name: decodeString(b.subarray(4), 'a meta context name') };
}

// ---- NBD_REP_INFO payloads ----

export type InfoReply =
  | { type: typeof NBD_INFO_EXPORT; size: bigint; flags: number }
  | { type: typeof NBD_INFO_NAME; name: string }
  | { type: typeof NBD_INFO_DESCRIPTION; description: string }
  | { type: typeof NBD_INFO_BLOCK_SIZE; minimum: number; preferred: number; maximum: number }
  | { type: 'unknown'; infoType: number };

export function encodeInfoExport(size: number | bigint, flags: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt16BE(NBD_INFO_EXPORT, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(flags, 10);
  return b;
}

export function encodeInfoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const b = Buffer.alloc(14);
  b.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0);
  b.writeUInt32BE(minimum, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(maximum, 10);
  return b;
}

export function encodeInfoText(type: typeof NBD_INFO_NAME | typeof NBD_INFO_DESCRIPTION, text: string): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(type, 0);
  return Buffer.concat([b, Buffer.from(text, 'utf8')]);
}

export function parseInfoReply(data: Uint8Array): InfoReply {
  if (data.length < 2) throw protocolError(`Cannot parse an info reply: ${data.length} bytes is too short`);
  const b = Buffer.from(data.buffer, data.byteOffset, data.length);
  const type = b.readUInt16BE(0);
  switch (type) {
    case NBD_INFO_EXPORT:
      if (b.length !== 12) throw protocolError(`Cannot parse the export info: expected 12 bytes, got ${b.length}`);
      return { type, size: b.readBigUInt64BE(2), flags: b.readUInt16BE(10) };
    case NBD_INFO_BLOCK_SIZE:
      if (b.length !== 14) throw protocolError(`Cannot parse the block size info: expected 14 bytes, got ${b.length}`);
      return { type, minimum: b.readUInt32BE(2), preferred: b.readUInt32BE(6), maximum: b.readUInt32BE(10) };
    case NBD_INFO_NAME:
      return { type, name: decodeString(b.subarray(2), 'the export name info') };
    case NBD_INFO_DESCRIPTION:
      return { type, description: decodeString(b.subarray(2), 'the export description info') };
    default:
      return { type: 'unknown', infoType: type };
  }
}

/** The reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless both sides said NO_ZEROES. */
export function encodeExportNameReply(size: number | bigint, flags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(EXPORT_NAME_REPLY_BYTES + (noZeroes ? 0 : EXPORT_NAME_PADDING_BYTES));
  b.writeBigUInt64BE(BigInt(size), 0);
  b.writeUInt16BE(flags, 8);
  return b;
}

export function parseExportNameReply(buf: Uint8Array): { size: bigint; flags: number } {
  const b = need(buf, EXPORT_NAME_REPLY_BYTES, 'the export name reply');
  return { size: b.readBigUInt64BE(0), flags: b.readUInt16BE(8) };
}
