import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

/** The built CLI (npm test builds before running tests). */
export const SHEAR_BIN = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'packages', 'cli', 'dist', 'main.js');

/**
 * The environment for a child `shear`: the test's own, without the hooks tap puts in
 * NODE_OPTIONS. The CLI is built JavaScript and needs none of them, and under load Node 20's
 * require(esm) in those hooks has crashed a child with a V8 fatal error before main.js ran.
 */
export function childEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, ...extra };
  delete env['NODE_OPTIONS'];
  for (const k of Object.keys(env)) if (k.startsWith('_TAPJS_PROCESSINFO_')) delete env[k];
  return env;
}

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs `shear ARGS`; `onSpawn` may signal the child (for interruption tests); `onStdout` sees
 * the output so far each time more arrives (to wait for a state the command reports).
 */
export function shear(args: string[], opts: { onSpawn?: (kill: (sig: NodeJS.Signals) => void, stderr: () => string) => void; onStdout?: (stdout: string) => void; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [SHEAR_BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: childEnv(opts.env) });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => {
      stdout += d;
      opts.onStdout?.(stdout);
    });
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
    opts.onSpawn?.((sig) => child.kill(sig), () => stderr);
  });
}
