// Writes chosen clusters through an NBD export with python3-libnbd (a client that is neither
// Shear's nor QEMU's), so the daemon behind the export records them in its dirty bitmaps.
// The data is deterministic (Python's random.Random(seed), in cluster order): the same call on
// two copies of an image leaves them equal, and repeating it changes nothing but the bitmaps.
import { spawn } from 'node:child_process';
import { CopyFailure, runCommand } from './copy-runner.js';

export const PYTHON = '/usr/bin/python3';

const SCRIPT = String.raw`
import json, random, sys, time
import nbd
sock, name, cluster, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
clusters = [int(x) for x in sys.stdin.read().split()]
h = nbd.NBD()
h.set_export_name(name)
h.connect_unix(sock)
if h.is_read_only():
    sys.exit('export %r is read-only' % name)
t0 = time.monotonic()
rnd = random.Random(seed)
for c in clusters:
    h.pwrite(rnd.randbytes(cluster), c * cluster)
if h.can_flush():
    h.flush()
h.shutdown()
print(json.dumps({"writes": len(clusters), "seconds": round(time.monotonic() - t0, 3)}))
`;

/** True when python3 with the libnbd binding can be used. */
export async function haveLibnbdPython(): Promise<boolean> {
  try {
    const r = await runCommand(PYTHON, ['-c', 'import nbd']);
    return r.code === 0;
  } catch {
    return false;
  }
}

/** Writes every cluster in `clusters` (indexes) with `clusterBytes` of seeded random data. */
export async function writeClustersOverNbd(socket: string, exportName: string, clusters: Uint32Array, clusterBytes: number, seed: number): Promise<{ writes: number; seconds: number }> {
  const r = await runWithInput(PYTHON, ['-c', SCRIPT, socket, exportName, String(clusterBytes), String(seed)], clusters.join('\n'));
  if (r.code !== 0) throw new CopyFailure(`Cannot fill the bitmap through NBD export "${exportName}" at ${socket}: python3-libnbd writer exited with ${r.code}:\n${r.stderr.trim().split('\n').slice(-6).join('\n')}`);
  const out = JSON.parse(r.stdout.trim().split('\n').pop()!) as { writes: number; seconds: number };
  if (out.writes !== clusters.length) throw new CopyFailure(`NBD writer wrote ${out.writes} clusters, expected ${clusters.length}`);
  return out;
}

function runWithInput(cmd: string, args: string[], input: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => { stdout += d; });
    child.stderr.setEncoding('utf8').on('data', (d: string) => { stderr += d; });
    const timer = setTimeout(() => child.kill('SIGKILL'), 10 * 60_000);
    child.once('error', (err) => { clearTimeout(timer); reject(err); });
    child.once('close', (code) => { clearTimeout(timer); resolve({ code, stdout, stderr }); });
    child.stdin.on('error', () => {}); // a writer that died early shows in its exit code
    child.stdin.end(input);
  });
}
