import { MAX_STRING_BYTES } from './constants.js';
import { protocolError } from './wire-error.js';

const strictDecoder = new TextDecoder('utf-8', { fatal: true });

/**
 * Decodes a protocol string: UTF-8, no NUL, at most MAX_STRING_BYTES.
 * @throws ERR_NBD_PROTOCOL
 */
export function decodeString(bytes: Uint8Array, what: string): string {
  if (bytes.length > MAX_STRING_BYTES) throw protocolError(`Cannot decode ${what}: ${bytes.length} bytes is over the limit of ${MAX_STRING_BYTES}`);
  let text: string;
  try {
    text = strictDecoder.decode(bytes);
  } catch {
    throw protocolError(`Cannot decode ${what}: it is not valid UTF-8`);
  }
  if (text.includes('\0')) throw protocolError(`Cannot decode ${what}: it contains a NUL character`);
  return text;
}

/** UTF-8 bytes of `text`, cut at a character boundary to at most `maxBytes`. */
export function encodeTruncated(text: string, maxBytes: number): Buffer {
  const full = Buffer.from(text.replaceAll('\0', ' '), 'utf8');
  if (full.length <= maxBytes) return full;
  let end = maxBytes;
  // Back up over continuation bytes (10xxxxxx) so no character is cut in half.
  while (end > 0 && (full[end]! & 0xc0) === 0x80) end--;
  return full.subarray(0, end);
}
