import { ShearError } from '@shear/base';

/** An NBD export named by a URI of the NBD URI spec, as QEMU's `nbd` blockdev options take it. */
export interface NbdTarget {
  server: { type: 'unix'; path: string } | { type: 'inet'; host: string; port: string };
  export: string;
}

const FORMS = 'expected nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT]/EXPORT';

/** Whether an argument is meant as an NBD URI rather than a file name. */
export function isNbdUrl(s: string): boolean {
  return /^nbd(\+unix|\+tcp)?:\/\//.test(s);
}

/** The two forms Shear accepts (no TLS: `nbds` is refused). `what` names the option for errors. */
export function parseNbdUrl(url: string, what: string): NbdTarget {
  const bad = (why = FORMS): never => {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Invalid ${what} "${url}": ${why}`);
  };
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    return bad();
  }
  const name = decodeURIComponent(u.pathname.replace(/^\//, ''));
  if (u.protocol === 'nbd+unix:') {
    const socket = u.searchParams.get('socket');
    if (u.host !== '' || !socket) return bad();
    return { server: { type: 'unix', path: socket }, export: name };
  }
  if (u.protocol === 'nbd:' || u.protocol === 'nbd+tcp:') {
    if (!u.hostname) return bad();
    const host = u.hostname.startsWith('[') ? u.hostname.slice(1, -1) : u.hostname;
    const port = u.port === '' ? '10809' : u.port;
    return { server: { type: 'inet', host, port }, export: name };
  }
  return bad(`scheme "${u.protocol}" is not supported; ${FORMS}`);
}
