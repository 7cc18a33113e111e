import { ShearError } from '@shear/base';
import {
  BASE_ALLOCATION,
  EXPORT_NAME_PADDING_BYTES,
  EXPORT_NAME_REPLY_BYTES,
  GREETING_BYTES,
  MAX_PAYLOAD_BYTES,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_EXPORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_FLAG_ERROR,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  OPTION_REPLY_HEADER_BYTES,
  PREFERRED_BLOCK_BYTES,
} from '../protocol/constants.js';
import {
  encodeClientFlags,
  encodeExportRequest,
  encodeMetaContextRequest,
  encodeOption,
  parseExportNameReply,
  parseGreeting,
  parseInfoReply,
  parseMetaContextReply,
  parseOptionReplyHeader,
} from '../protocol/handshake.js';
import { decodeString } from '../protocol/strings.js';
import { protocolError } from '../protocol/wire-error.js';
import type { SocketReader } from '../socket-reader.js';

/** Option replies longer than this are a broken server (names and messages are at most 4 KiB). */
const MAX_OPTION_REPLY_BYTES = 64 * 1024;

export interface BlockSizes {
  minimum: number;
  preferred: number;
  maximum: number;
}

/** What the handshake settled. */
export interface Negotiated {
  size: number;
  transmissionFlags: number;
  structured: boolean;
  /** The ID of base:allocation, when the server selected it. */
  allocationContextId: number | undefined;
  /** Every meta context the server selected, by name (base:allocation included). */
  contexts: Map<string, number>;
  blockSizes: BlockSizes;
}

interface OptionReply {
  type: number;
  data: Buffer;
}

const REPLY_NAMES: Readonly<Record<number, string>> = {
  [NBD_REP_ERR_UNSUP]: 'unsupported',
  [NBD_REP_ERR_POLICY]: 'refused by policy',
  [NBD_REP_ERR_UNKNOWN]: 'unknown export',
  [NBD_REP_ERR_TLS_REQD]: 'TLS required',
};

/**
 * The client side of fixed-newstyle option haggling: structured replies, base:allocation,
 * NBD_OPT_GO with block sizes, falling back to NBD_OPT_EXPORT_NAME for servers without GO.
 * @throws ERR_NBD_EXPORT_NOT_FOUND, ERR_PERMISSION_DENIED (TLS or policy), ERR_NBD_PROTOCOL, ERR_NBD_DISCONNECTED
 */
export async function negotiate(reader: SocketReader, send: (b: Buffer) => void, exportName: string, extraContexts: readonly string[] = []): Promise<Negotiated> {
  const serverFlags = parseGreeting(await reader.read(GREETING_BYTES));
  if ((serverFlags & NBD_FLAG_FIXED_NEWSTYLE) === 0) throw protocolError('Cannot negotiate with the NBD server: it does not speak fixed newstyle');
  const noZeroes = (serverFlags & NBD_FLAG_NO_ZEROES) !== 0;
  send(encodeClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0)));

  async function reply(option: number): Promise<OptionReply> {
    const h = parseOptionReplyHeader(await reader.read(OPTION_REPLY_HEADER_BYTES));
    if (h.option !== option) throw protocolError(`Cannot negotiate: a reply for option ${h.option} came while waiting for option ${option}`);
    if (h.length > MAX_OPTION_REPLY_BYTES) throw protocolError(`Cannot negotiate: an option reply of ${h.length} bytes is too long`);
    return { type: h.type, data: await reader.read(h.length) };
  }

  send(encodeOption(NBD_OPT_STRUCTURED_REPLY));
  const sr = await reply(NBD_OPT_STRUCTURED_REPLY);
  const structured = sr.type === NBD_REP_ACK;

  const contexts = new Map<string, number>();
  if (structured) {
    const queries = [BASE_ALLOCATION, ...extraContexts.filter((c) => c !== BASE_ALLOCATION)];
    send(encodeOption(NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest({ name: exportName, queries })));
    for (;;) {
      const r = await reply(NBD_OPT_SET_META_CONTEXT);
      if (r.type === NBD_REP_META_CONTEXT) {
        const ctx = parseMetaContextReply(r.data);
        if (queries.includes(ctx.name)) contexts.set(ctx.name, ctx.id);
        continue;
      }
      // Errors here (an unknown export included) are told by GO below; without a context we report all data.
      if (r.type !== NBD_REP_ACK) contexts.clear();
      break;
    }
  }
  const allocationContextId = contexts.get(BASE_ALLOCATION);

  send(encodeOption(NBD_OPT_GO, encodeExportRequest({ name: exportName, infos: [NBD_INFO_BLOCK_SIZE] })));
  let size: bigint | undefined;
  let transmissionFlags = 0;
  let blockSizes: BlockSizes = { minimum: 1, preferred: PREFERRED_BLOCK_BYTES, maximum: MAX_PAYLOAD_BYTES };
  for (;;) {
    const r = await reply(NBD_OPT_GO);
    if (r.type === NBD_REP_INFO) {
      const info = parseInfoReply(r.data);
      if (info.type === NBD_INFO_EXPORT) {
        size = info.size;
        transmissionFlags = info.flags;
      } else if (info.type === NBD_INFO_BLOCK_SIZE) {
        blockSizes = checkBlockSizes(info);
      }
      continue;
    }
    if (r.type === NBD_REP_ACK) break;
    if (r.type === NBD_REP_ERR_UNSUP) {
      // A server without GO: EXPORT_NAME cannot report errors; an unknown name closes the connection.
      send(encodeOption(NBD_OPT_EXPORT_NAME, Buffer.from(exportName, 'utf8')));
      const e = parseExportNameReply(await reader.read(EXPORT_NAME_REPLY_BYTES));
      if (!noZeroes) await reader.read(EXPORT_NAME_PADDING_BYTES);
      size = e.size;
      transmissionFlags = e.flags;
      break;
    }
    throw refusal(exportName, r);
  }
  if (size === undefined) throw protocolError(`Cannot open NBD export "${exportName}": the server sent no export size`);
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw protocolError(`Cannot open NBD export "${exportName}": its size ${size} is over 2^53`);
  return { size: Number(size), transmissionFlags, structured, allocationContextId, contexts, blockSizes };
}

function refusal(exportName: string, r: OptionReply): ShearError {
  let message = '';
  try {
    message = decodeString(r.data, 'an error message');
  } catch {
    // An undecodable message is left out; the reply type still says what happened.
  }
  const what = REPLY_NAMES[r.type] ?? ((r.type & NBD_REP_FLAG_ERROR) !== 0 ? `error 0x${r.type.toString(16)}` : `unexpected reply type ${r.type}`);
  const why = `server reported: ${what}${message ? ` (${message})` : ''}`;
  if (r.type === NBD_REP_ERR_UNKNOWN) return new ShearError('ERR_NBD_EXPORT_NOT_FOUND', `Cannot open NBD export "${exportName}": ${why}`);
  if (r.type === NBD_REP_ERR_POLICY || r.type === NBD_REP_ERR_TLS_REQD) return new ShearError('ERR_PERMISSION_DENIED', `Cannot open NBD export "${exportName}": ${why}`);
  return protocolError(`Cannot open NBD export "${exportName}": ${why}`);
}

function isPow2(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

/** The spec's rules for block sizes; a server breaking them is not trusted with our I/O. */
function checkBlockSizes(b: BlockSizes): BlockSizes {
  if (!isPow2(b.minimum) || b.minimum > 65536 || !isPow2(b.preferred) || b.preferred < b.minimum || b.maximum < b.minimum) {
    throw protocolError(`Cannot use the server's block sizes: minimum ${b.minimum}, preferred ${b.preferred}, maximum ${b.maximum} break the spec's rules`);
  }
  return { minimum: b.minimum, preferred: b.preferred, maximum: b.maximum };
}
