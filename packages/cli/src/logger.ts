import { pino, type Logger as PinoLogger } from 'pino';

export type Logger = PinoLogger;

/**
 * The process's only root logger: structured pino records on stderr (stdout stays free for
 * --json output). Everything else gets `log.child({ component, job, node, ... })`.
 */
export function createLogger(level?: string): Logger {
  level ??= process.env['SHEAR_LOG_LEVEL'] ?? 'warn';
  return pino({ level, base: { pid: process.pid } }, pino.destination({ fd: 2, sync: true }));
}
