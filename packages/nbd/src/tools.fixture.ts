import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { connect } from 'node:net';
import type { Test } from 'tap';

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * Runs a tool without blocking the event loop (the server under test lives in this process),
 * with a deadline. Never throws for a non-zero exit: the result says.
 */
export function run(cmd: string, args: string[], opts: { timeoutMs?: number; input?: string; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  return new Promise((resolve) => {
    const child = execFile(cmd, args, { timeout: opts.timeoutMs ?? 20_000, maxBuffer: 64 * 1024 * 1024, env: opts.env ?? process.env, encoding: 'utf8' }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : -1) : 0;
      resolve({ code, stdout, stderr: err && code === -1 ? `${stderr}\n${err.message}` : stderr });
    });
    if (opts.input !== undefined) child.stdin?.end(opts.input);
  });
}

/** Runs and fails the test (returning undefined) when the tool exits non-zero. */
export async function runOk(t: Test, cmd: string, args: string[], opts: { timeoutMs?: number; input?: string; env?: NodeJS.ProcessEnv } = {}): Promise<string | undefined> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) {
    t.fail(`${cmd} ${args.join(' ')} exited ${r.code}: ${r.stderr.trim()}`);
    return undefined;
  }
  return r.stdout;
}

/** The python that has the libnbd bindings (Debian's; a pyenv python on PATH may lack them). */
export { LIBNBD_PYTHON as PYTHON } from '@shear/testkit';

/**
 * Starts a server process (qemu-nbd, nbdkit) that listens on `socket`, waits until the socket
 * exists, and kills it at teardown.
 */
export async function startDaemon(t: Test, cmd: string, args: string[], socket: string): Promise<ChildProcess> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    await exited;
  });
  // The socket file appears at bind(), before listen(): wait until a connection is accepted.
  // (So the daemon must outlive a client that leaves at once: qemu-nbd needs -t.)
  const start = Date.now();
  while (!existsSync(socket) || !(await accepts(socket))) {
    if (child.exitCode !== null) throw new Error(`${cmd} exited early (${child.exitCode}): ${stderr}`);
    if (Date.now() - start > 10_000) throw new Error(`${cmd} did not listen on ${socket}: ${stderr}`);
    await new Promise((r) => setTimeout(r, 10));
  }
  return child;
}

function accepts(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect({ path });
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
