import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createServer, connect, type Server, type Socket } from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';
import { QmpClient } from '@shear/qmp';

export const run = promisify(execFile);
export const PYTHON = '/usr/bin/python3';

/** qemu-storage-daemon with a QMP monitor on a socket. */
export async function startQsd(sockDir: string): Promise<{ cmd: (name: string, args?: Record<string, unknown>) => Promise<unknown>; stop: () => Promise<void> }> {
  const sock = path.join(sockDir, 'qsd-qmp.sock');
  const proc = spawn('qemu-storage-daemon', ['--chardev', `socket,path=${sock},server=on,wait=off,id=m`, '--monitor', 'chardev=m'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (d) => (stderr += d));
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
  while (!existsSync(sock) && proc.exitCode === null) await new Promise((r) => setTimeout(r, 20));
  if (!existsSync(sock)) throw new Error(`qemu-storage-daemon did not start: ${stderr}`);
  const qmp = await QmpClient.connect(sock);
  return {
    cmd: (name, args) => qmp.execute(name, args ?? {}),
    async stop() {
      await qmp.execute('quit').catch(() => {});
      const guard = setTimeout(() => proc.kill('SIGKILL'), 30_000);
      await exited;
      clearTimeout(guard);
      await qmp.close();
    },
  };
}

/** Writes `clusters` (64 KiB each) of byte `fill` through an NBD URI, as a guest would; fill 'zero' sends WRITE_ZEROES. */
export async function guestWrite(uri: string, clusters: number[], fill: number | 'zero'): Promise<void> {
  const script = `
import nbd, sys, json
h = nbd.NBD(); h.connect_uri(sys.argv[1])
for c in json.loads(sys.argv[2]):
    if sys.argv[3] == 'zero': h.zero(65536, c * 65536)
    else: h.pwrite(bytes([int(sys.argv[3])]) * 65536, c * 65536)
h.flush(); h.shutdown()
`;
  await run(PYTHON, ['-c', script, uri, JSON.stringify(clusters), String(fill)]);
}

/** nbdkit serving `file` on a unix socket (foreground, killed by stop()). */
export async function startNbdkit(sock: string, args: string[]): Promise<{ proc: ChildProcess; status: () => string; stop: () => Promise<void> }> {
  const proc = spawn('nbdkit', ['-f', '-U', sock, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (d) => (stderr += d));
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
  // The socket file appears at bind(), before listen(): wait until a connection is accepted.
  while ((!existsSync(sock) || !(await accepts(sock))) && proc.exitCode === null) await new Promise((r) => setTimeout(r, 20));
  if (proc.exitCode !== null) throw new Error(`nbdkit did not start: ${stderr}`);
  return {
    proc,
    status: () => (proc.exitCode === null && proc.signalCode === null ? 'running' : `exited (${proc.exitCode ?? proc.signalCode}): ${stderr}`),
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGTERM');
      await exited;
    },
  };
}

/**
 * A unix-socket proxy to an NBD server that cuts every connection once `cutAfter` bytes came
 * from the server in total: a server that drops the connection mid-copy, at a known point.
 */
export async function startCuttingProxy(listen: string, upstream: string, cutAfter: number): Promise<{ stop: () => Promise<void> }> {
  const sockets = new Set<Socket>();
  let fromServer = 0;
  const server: Server = createServer((client) => {
    const up = connect(upstream);
    sockets.add(client);
    sockets.add(up);
    const end = (): void => {
      client.destroy();
      up.destroy();
    };
    client.on('error', end);
    up.on('error', end);
    client.on('close', end);
    up.on('close', end);
    client.on('data', (d) => up.write(d));
    up.on('data', (d: Buffer) => {
      fromServer += d.length;
      if (fromServer > cutAfter) {
        for (const s of sockets) s.destroy();
        return;
      }
      client.write(d);
    });
  });
  await new Promise<void>((resolve) => server.listen(listen, resolve));
  return {
    stop: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

function accepts(sock: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(sock);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => {
      s.destroy();
      resolve(false);
    });
  });
}
