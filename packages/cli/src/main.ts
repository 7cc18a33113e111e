#!/usr/bin/env node
import { ShearError } from '@shear/base';
import { runBackup, BACKUP_USAGE } from './commands/backup.js';
import { runPull, PULL_USAGE } from './commands/pull.js';
import { runDemo } from './commands/demo.js';
import { runDaemon, DAEMON_USAGE } from './commands/daemon.js';
import { runJobs, JOBS_USAGE } from './commands/jobs.js';
import { runRestore, RESTORE_USAGE } from './commands/restore.js';
import { runVerify, VERIFY_USAGE } from './commands/verify.js';
import { EXIT, exitCodeFor } from './exit-codes.js';
import { createLogger } from './logger.js';
import { Interruption } from './interrupt.js';
import { shearVersion } from './version.js';

const USAGE = `usage: shear <command> [options]

commands:
  backup      copy a disk image to a new image (full, or top layer), in parallel
  pull        back up a running VM's disk from its NBD export (full or incremental)
  daemon      run the daemon: block nodes and backup jobs behind a QMP socket
  demo        make a demo disk, back it up, verify it, and walk through dirty bitmaps
  jobs        show (or --watch) a daemon's jobs: progress, fleecing cache state, events
  restore     turn a point of a backup chain into a disk image, or write it into an NBD export
  verify      recompute a backup chain's manifest digests and name every MiB that differs
  help        this text; \`shear help backup\` for a command's options
  --version   print the version

exit status: 0 ok, 1 failed, 2 usage, 3 not found, 4 permission or target exists,
             5 no space, 6 corrupt or unsupported image, 7 verification mismatch,
             130 interrupted (SIGINT), 143 terminated (SIGTERM)`;

function logLevelOf(argv: string[]): string | undefined {
  const i = argv.indexOf('--log-level');
  return i >= 0 ? argv[i + 1] : argv.find((a) => a.startsWith('--log-level='))?.slice('--log-level='.length);
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === '--version' || command === '-V' || command === 'version') {
    process.stdout.write(`shear ${shearVersion()}\n`);
    return EXIT.OK;
  }
  const log = createLogger(logLevelOf(rest) ?? (command === 'daemon' ? 'info' : undefined));
  if (command === 'daemon') {
    // A signal is the daemon's ordinary stop: it shuts down in order (jobs cancelled, persistent
    // bitmaps stored) and exits 0, however long storing takes; no forced exit.
    const ac = new AbortController();
    const stop = (sig: NodeJS.Signals) => {
      log.info({ evt: 'cli.signal', signal: sig }, 'stopping');
      ac.abort(new ShearError('ERR_ABORTED', `Interrupted by ${sig}`));
    };
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
    try {
      return await runDaemon(rest, log.child({ component: 'daemon' }), ac.signal).catch((err) => report(err, log));
    } finally {
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
    }
  }
  const intr = new Interruption();
  try {
    const code = await runCommand(command, rest, log, intr);
    if (intr.received && code !== EXIT.OK) return interrupted(intr, log, undefined);
    return code;
  } catch (err) {
    // Whatever failed while unwinding after a signal, the user sees the one line about it.
    if (intr.received) return interrupted(intr, log, err);
    return report(err, log);
  } finally {
    intr.dispose();
  }
}

async function runCommand(command: string | undefined, rest: string[], log: ReturnType<typeof createLogger>, intr: Interruption): Promise<number> {
    switch (command) {
      case 'backup':
        return await runBackup(rest, log.child({ component: 'backup' }), intr.signal, intr);
      case 'pull':
        return await runPull(rest, log.child({ component: 'pull' }), intr.signal, intr);
      case 'demo':
        return await runDemo(rest, log.child({ component: 'demo' }), intr.signal);
      case 'jobs':
        return await runJobs(rest, intr.signal);
      case 'restore':
        return await runRestore(rest, log.child({ component: 'restore' }), intr.signal, intr);
      case 'verify':
        return await runVerify(rest, log.child({ component: 'verify' }), intr.signal);
      case undefined:
      case 'help':
      case '--help':
      case '-h':
        process.stdout.write(({ backup: BACKUP_USAGE, pull: PULL_USAGE, daemon: DAEMON_USAGE, jobs: JOBS_USAGE, restore: RESTORE_USAGE, verify: VERIFY_USAGE }[rest[0] ?? ''] ?? USAGE) + '\n');
        return EXIT.OK;
      default:
        process.stderr.write(`shear: unknown command "${command}"\n\n${USAGE}\n`);
        return EXIT.USAGE;
    }
}

function interrupted(intr: Interruption, log: ReturnType<typeof createLogger>, err: unknown): number {
  log.debug({ evt: 'cli.signal', signal: intr.received, err }, 'interrupted');
  process.stderr.write(intr.message() + '\n');
  return intr.exitCode;
}

function report(err: unknown, log: ReturnType<typeof createLogger>): number {
  const e = err instanceof ShearError ? err : new ShearError('ERR_INTERNAL', (err as Error)?.message ?? String(err), {}, { cause: err });
  if (e.kind === 'internal' && !(e as { exitCode?: number }).exitCode) log.error({ err: e }, 'internal error');
  process.stderr.write(`shear: ${e.message}\n`);
  return (e as { exitCode?: number }).exitCode ?? exitCodeFor(e.kind);
}

process.exitCode = await main(process.argv.slice(2));
