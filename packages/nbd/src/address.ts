import { isIP } from 'node:net';
import { ShearError } from '@shear/base';

/**
 * Where an NBD server listens or a client connects; QEMU's SocketAddress (flat form), with the
 * port as a number or a numeric string.
 */
export type NbdAddress = { type: 'unix'; path: string } | { type: 'inet'; host: string; port: number | string };

/** The address actually bound (a TCP port 0 becomes the chosen port). */
export type NbdBoundAddress = { type: 'unix'; path: string } | { type: 'inet'; host: string; port: number };

/** Whether a literal host is a loopback address (or the name `localhost`). */
export function isLoopbackHost(host: string): boolean {
  const h = host.startsWith('[') && host.endsWith(']') ? host.slice(1, -1) : host;
  if (h === 'localhost') return true;
  if (isIP(h) === 4) return h.startsWith('127.');
  if (isIP(h) === 6) {
    const lower = h.toLowerCase();
    if (lower === '::1' || lower === '0:0:0:0:0:0:0:1') return true;
    const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/.exec(lower);
    return mapped !== null && mapped[1]!.startsWith('127.');
  }
  return false;
}

/** @throws ERR_INVALID_ARGUMENT for a port that is not an integer in 0..65535 */
export function parsePort(port: number | string): number {
  const n = typeof port === 'number' ? port : /^\d+$/.test(port) ? Number(port) : Number.NaN;
  if (!Number.isInteger(n) || n < 0 || n > 65535) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot use port "${String(port)}": expected an integer from 0 to 65535`);
  return n;
}

/** A URI naming an export at an address, for tools (qemu-img, nbdinfo): nbd+unix:///NAME?socket=PATH or nbd://HOST:PORT/NAME. */
export function nbdUri(address: NbdBoundAddress, exportName: string): string {
  const name = encodeURIComponent(exportName);
  if (address.type === 'unix') return `nbd+unix:///${name}?socket=${encodeURIComponent(address.path)}`;
  const host = isIP(address.host) === 6 ? `[${address.host}]` : address.host;
  return `nbd://${host}:${address.port}/${name}`;
}
