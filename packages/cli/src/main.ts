#!/usr/bin/env node
import { ShearError } from '@shear/base';
import { runBackup, BACKUP_USAGE } from './commands/backup.js';
import { runDemo } from './commands/demo.js';
import { runDaemon, DAEMON_USAGE } from './commands/daemon.js';
import { runJobs, JOBS_USAGE } from './commands/jobs.js';
import { EXIT, exitCodeFor } from './exit-codes.js';
import { createLogger } from './logger.js';

const USAGE = `usage: shear <command> [options]

commands:
  backup      copy a disk image to a new image (full, or top layer), in parallel
  daemon      run the daemon: block nodes and backup jobs behind a QMP socket
  demo        make a demo disk, back it up, verify it, and walk through dirty bitmaps
  jobs        show (or --watch) a daemon's jobs: progress, fleecing cache state, events
  help        this text; \`shear help backup\` for a command's options

exit status: 0 ok, 1 failed, 2 usage, 3 not found, 4 permission or target exists,
             5 no space, 6 corrupt or unsupported image, 7 verification mismatch, 130 interrupted`;

function logLevelOf(argv: string[]): string | undefined {
  const i = argv.indexOf('--log-level');
  return i >= 0 ? argv[i + 1] : argv.find((a) => a.startsWith('--log-level='))?.slice('--log-level='.length);
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  const log = createLogger(logLevelOf(rest) ?? (command === 'daemon' ? 'info' : undefined));
  const ac = new AbortController();
  const onSignal = (sig: NodeJS.Signals) => {
    log.warn({ evt: 'cli.signal', signal: sig }, 'interrupted, stopping');
    ac.abort(new ShearError('ERR_ABORTED', `Interrupted by ${sig}`));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    switch (command) {
      case 'backup':
        return await runBackup(rest, log.child({ component: 'backup' }), ac.signal);
      case 'demo':
        return await runDemo(rest, log.child({ component: 'demo' }), ac.signal);
      case 'daemon':
        return await runDaemon(rest, log.child({ component: 'daemon' }), ac.signal);
      case 'jobs':
        return await runJobs(rest, ac.signal);
      case undefined:
      case 'help':
      case '--help':
      case '-h':
        process.stdout.write(({ backup: BACKUP_USAGE, daemon: DAEMON_USAGE, jobs: JOBS_USAGE }[rest[0] ?? ''] ?? USAGE) + '\n');
        return EXIT.OK;
      default:
        process.stderr.write(`shear: unknown command "${command}"\n\n${USAGE}\n`);
        return EXIT.USAGE;
    }
  } catch (err) {
    const e = err instanceof ShearError ? err : new ShearError('ERR_INTERNAL', (err as Error)?.message ?? String(err), {}, { cause: err });
    if (e.kind === 'internal' && !(e as { exitCode?: number }).exitCode) log.error({ err: e }, 'internal error');
    process.stderr.write(`shear: ${e.message}\n`);
    return (e as { exitCode?: number }).exitCode ?? exitCodeFor(e.kind);
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

process.exitCode = await main(process.argv.slice(2));
