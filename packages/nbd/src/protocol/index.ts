/** The pure NBD codec (no sockets): constants, handshake and transmission messages. */
export * from './constants.js';
export * from './handshake.js';
export * from './transmission.js';
export { ByteQueue } from './byte-queue.js';
export { decodeString, encodeTruncated } from './strings.js';
export { protocolError } from './wire-error.js';
