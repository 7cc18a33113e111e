import { parseArgs } from 'node:util';
import { ShearError } from '@shear/base';
import { ShearDaemon } from '@shear/daemon';
import type { Logger } from '../logger.js';
import { parseOptionValue } from '../keyval.js';
import { EXIT } from '../exit-codes.js';

export const DAEMON_USAGE = `usage: shear daemon --qmp unix:PATH [options]

Runs the Shear daemon: block nodes, backup jobs and exports, controlled over a
QMP-compatible socket (the same commands as qemu-storage-daemon where both have them).

options:
  --qmp unix:PATH | tcp:HOST:PORT   control socket (UNIX sockets are created with mode 0600;
                                    TCP only on loopback); may be given twice
  --blockdev JSON|KEY=VALUE,...     a node to open at start, as blockdev-add takes it
                                    (repeatable), e.g. driver=file,node-name=disk0,filename=disk.raw
  --workers N                       copy worker threads (default: the machine's parallelism, at least 4)
  --allow-dir DIR                   confine file names given to blockdev-add to DIR (repeatable)
  --nbd-server JSON|KEY=VALUE,...   start the NBD server, as nbd-server-start takes it, e.g.
                                    addr.type=unix,addr.path=/run/shear-nbd.sock
  --export JSON|KEY=VALUE,...       an NBD export, as block-export-add takes it (repeatable), e.g.
                                    type=nbd,id=e0,node-name=disk0,writable=on
  --nbd-allow-remote                let the NBD server listen on non-loopback addresses
  --log-level LEVEL                 pino log level on stderr (default: info)

The daemon stops on SIGINT, SIGTERM and the QMP command quit, cancelling running jobs.`;

export function parseQmpAddress(spec: string): { path?: string; tcp?: { host: string; port: number } } {
  if (spec.startsWith('unix:')) return { path: spec.slice(5) };
  const m = /^tcp:(.+):(\d+)$/.exec(spec);
  if (m) return { tcp: { host: m[1]!, port: Number(m[2]) } };
  throw new ShearError('ERR_INVALID_ARGUMENT', `Invalid --qmp "${spec}": expected unix:PATH or tcp:HOST:PORT\n\n${DAEMON_USAGE}`);
}

/**
 * --nbd-server as qemu-storage-daemon takes it: JSON (nbd-server-start arguments), or
 * addr.type=unix,addr.path=... / addr.type=inet,addr.host=...,addr.port=...
 */
function nbdServerOption(text: string): Record<string, unknown> {
  const o = parseOptionValue(text, '--nbd-server');
  if (typeof (o['addr'] as { port?: unknown } | undefined)?.port === 'number') (o['addr'] as { port: unknown }).port = String((o['addr'] as { port: number }).port);
  return o;
}

/** --export as qemu-storage-daemon takes it: type=nbd,id=...,node-name=...[,name=...][,writable=on]. */
function exportOption(text: string, i: number): Record<string, unknown> {
  const o = parseOptionValue(text, `--export #${i + 1}`);
  if (typeof o['bitmaps'] === 'string') o['bitmaps'] = [o['bitmaps']];
  return o;
}

export async function runDaemon(argv: string[], log: Logger, signal: AbortSignal): Promise<number> {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        qmp: { type: 'string', multiple: true },
        blockdev: { type: 'string', multiple: true },
        'nbd-server': { type: 'string' },
        export: { type: 'string', multiple: true },
        workers: { type: 'string' },
        'allow-dir': { type: 'string', multiple: true },
        'nbd-allow-remote': { type: 'boolean' },
        'log-level': { type: 'string' },
      },
      strict: true,
    }));
  } catch (err) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `${(err as Error).message}\n\n${DAEMON_USAGE}`);
  }
  if (!values.qmp?.length) throw new ShearError('ERR_INVALID_ARGUMENT', `Missing --qmp\n\n${DAEMON_USAGE}`);
  const qmp: { path?: string; tcp?: { host: string; port: number } } = {};
  for (const q of values.qmp) Object.assign(qmp, parseQmpAddress(q));
  const workers = values.workers === undefined ? undefined : Number(values.workers);
  if (workers !== undefined && (!Number.isInteger(workers) || workers < 0 || workers > 256)) {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Invalid --workers "${values.workers}": expected an integer from 0 to 256`);
  }
  const blockdevs = (values.blockdev ?? []).map((b, i) => parseOptionValue(b, `--blockdev #${i + 1}`));
  const daemon = await ShearDaemon.start({
    qmp,
    blockdevs,
    ...(workers !== undefined ? { workers } : {}),
    ...(values['allow-dir'] ? { allowedDirs: values['allow-dir'] } : {}),
    ...(values['nbd-server'] ? { nbdServer: nbdServerOption(values['nbd-server']) } : {}),
    ...(values.export?.length ? { exports: values.export.map((e, i) => exportOption(e, i)) } : {}),
    nbdAllowRemote: values['nbd-allow-remote'] ?? false,
    log,
  });
  const onAbort = () => void daemon.shutdown('signal');
  signal.addEventListener('abort', onAbort, { once: true });
  try {
    await daemon.closed;
  } finally {
    signal.removeEventListener('abort', onAbort);
  }
  return EXIT.OK;
}
