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

/** An export named by an NBD URI. */
export interface NbdExportRef {
  address: NbdBoundAddress;
  exportName: string;
}

const URI_FORMS = 'expected nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT]/EXPORT';

/** Whether a command-line argument is meant as an NBD URI rather than a file name. */
export function isNbdUri(s: string): boolean {
  return /^nbd(\+unix|\+tcp)?:\/\//.test(s);
}

/**
 * The inverse of `nbdUri`: the forms of the NBD URI spec Shear's commands take (no TLS, so
 * `nbds` is refused). `what` names the option in the error ("--source").
 * @throws ERR_INVALID_ARGUMENT
 */
export function parseNbdUri(uri: string, what: string): NbdExportRef {
  const bad = (why = URI_FORMS): never => {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Invalid ${what} "${uri}": ${why}`);
  };
  let u: URL;
  try {
    u = new URL(uri);
  } catch {
    return bad();
  }
  const exportName = decodeURIComponent(u.pathname.replace(/^\//, ''));
  if (u.protocol === 'nbd+unix:') {
    const socket = u.searchParams.get('socket');
    if (u.host !== '' || !socket) return bad();
    return { address: { type: 'unix', path: socket }, exportName };
  }
  if (u.protocol === 'nbd:' || u.protocol === 'nbd+tcp:') {
    if (!u.hostname) return bad();
    const host = u.hostname.startsWith('[') ? u.hostname.slice(1, -1) : u.hostname;
    return { address: { type: 'inet', host, port: parsePort(u.port === '' ? 10809 : u.port) }, exportName };
  }
  return bad(`scheme "${u.protocol}" is not supported; ${URI_FORMS}`);
}

/** A URI naming an export at an address, for tools (qemu-img, nbdinfo): nbd+unix:///NAME?socket=PATH or nbd://HOST:PORT/NAME. */
export function nbdUri(address: NbdBoundAddress, exportName: string): string {
  const name = encodeURIComponent(exportName);
  if (address.type === 'unix') return `nbd+unix:///${name}?socket=${encodeURIComponent(address.path)}`;
  const host = isIP(address.host) === 6 ? `[${address.host}]` : address.host;
  return `nbd://${host}:${address.port}/${name}`;
}
