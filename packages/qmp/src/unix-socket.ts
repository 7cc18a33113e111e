import { chmod, link, lstat, mkdtemp, rm, unlink } from 'node:fs/promises';
import net from 'node:net';
import { dirname, join, resolve } from 'node:path';
import { ShearError } from '@shear/base';

/** sun_path holds 108 bytes on Linux, the last one a NUL. */
const MAX_SOCKET_PATH_BYTES = 107;

function errnoOf(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

/** Whether something accepts connections on the socket at `path`. */
function probe(path: string): Promise<'live' | 'stale' | 'gone'> {
  return new Promise((done, fail) => {
    const s = net.connect(path);
    s.once('connect', () => {
      s.destroy();
      done('live');
    });
    s.once('error', (err) => {
      s.destroy();
      const code = errnoOf(err);
      if (code === 'ECONNREFUSED') done('stale');
      else if (code === 'ENOENT') done('gone');
      else fail(err);
    });
  });
}

/**
 * Makes `path` free for a new socket: absent is fine, a stale socket (nobody listening) is
 * removed, anything else is refused.
 *
 * @throws ERR_QMP_SOCKET_IN_USE when the path is not a socket or a server listens on it
 */
async function claimPath(path: string): Promise<void> {
  let isSocket: boolean;
  try {
    isSocket = (await lstat(path)).isSocket();
  } catch (err) {
    if (errnoOf(err) === 'ENOENT') return;
    throw err;
  }
  if (!isSocket) {
    throw new ShearError('ERR_QMP_SOCKET_IN_USE', `Cannot listen on QMP socket "${path}": the path exists and is not a socket`, { path });
  }
  const state = await probe(path);
  if (state === 'live') {
    throw new ShearError('ERR_QMP_SOCKET_IN_USE', `Cannot listen on QMP socket "${path}": another server is listening on it`, { path });
  }
  if (state === 'stale') await unlink(path).catch((err: unknown) => {
    if (errnoOf(err) !== 'ENOENT') throw err;
  });
}

function listenOn(server: net.Server, path: string): Promise<void> {
  return new Promise((done, fail) => {
    server.once('error', fail);
    server.listen(path, () => {
      server.off('error', fail);
      done();
    });
  });
}

export interface UnixListener {
  readonly server: net.Server;
  readonly path: string;
  /** Closes the listener (not its connections) and removes the socket file if it is still ours. */
  close(): Promise<void>;
}

/**
 * Listens on a UNIX socket that is never connectable by others, not even for an instant: the
 * socket is created inside a fresh 0700 directory next to `path`, made 0600, then hard-linked
 * to `path` (link fails rather than replacing a file that appeared meanwhile).
 *
 * @throws ERR_QMP_SOCKET_IN_USE (see claimPath), ERR_INVALID_ARGUMENT when the path is too long
 */
export async function listenUnix(path: string, onConnection: (socket: net.Socket) => void): Promise<UnixListener> {
  const abs = resolve(path);
  await claimPath(abs);
  const dir = await mkdtemp(join(dirname(abs), '.q'));
  const tmp = join(dir, 's');
  if (Buffer.byteLength(tmp) > MAX_SOCKET_PATH_BYTES || Buffer.byteLength(abs) > MAX_SOCKET_PATH_BYTES) {
    await rm(dir, { recursive: true, force: true });
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot listen on QMP socket "${path}": the path is too long for a UNIX socket`, { path });
  }
  const server = net.createServer(onConnection);
  try {
    await listenOn(server, tmp);
    await chmod(tmp, 0o600);
    try {
      await link(tmp, abs);
    } catch (err) {
      if (errnoOf(err) === 'EEXIST') {
        throw new ShearError('ERR_QMP_SOCKET_IN_USE', `Cannot listen on QMP socket "${path}": the path was created by someone else meanwhile`, { path });
      }
      throw err;
    }
  } catch (err) {
    await new Promise<void>((done) => server.close(() => done()));
    throw err;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  const ours = await lstat(abs);
  return {
    server,
    path: abs,
    close: async () => {
      await new Promise<void>((done) => server.close(() => done()));
      try {
        const now = await lstat(abs);
        if (now.ino === ours.ino && now.dev === ours.dev) await unlink(abs);
      } catch (err) {
        if (errnoOf(err) !== 'ENOENT') throw err;
      }
    },
  };
}
