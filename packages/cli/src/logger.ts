import { writeSync } from 'node:fs';
import { pino, type DestinationStream, type Logger as PinoLogger } from 'pino';

/** Commands take the one logger interface every package uses; the root behind it is pino. */
export type { Logger } from '@shear/base';

/**
 * The process's only root logger: pino records on stderr (stdout stays free for --json output),
 * one JSON object a line for programs, or human-readable lines when stderr is a terminal.
 * Everything else gets `log.child({ component, job, node, ... })`.
 */
export function createLogger(level?: string, opts: { pretty?: boolean } = {}): PinoLogger {
  level ??= process.env['SHEAR_LOG_LEVEL'] ?? 'warn';
  const pretty = opts.pretty ?? process.stderr.isTTY === true;
  return pino({ level, base: { pid: process.pid } }, pretty ? prettyStderr() : pino.destination({ fd: 2, sync: true }));
}

const LEVELS: Record<number, string> = { 10: 'TRACE', 20: 'DEBUG', 30: 'INFO', 40: 'WARN', 50: 'ERROR', 60: 'FATAL' };
/** Fields every record has, shown in the line's prefix or not at all. */
const HIDDEN = new Set(['level', 'time', 'pid', 'hostname', 'msg', 'component']);

/** A synchronous stderr destination that turns each JSON record into one readable line. */
function prettyStderr(): DestinationStream {
  return { write: (line: string) => void writeSync(2, formatRecord(line) + '\n') };
}

/**
 * `12:00:01.234 WARN  backup: retrying a failed range offset=1048576 attempt=1 err="..."`.
 * A line that is not a record passes unchanged.
 */
export function formatRecord(line: string): string {
  let r: Record<string, unknown>;
  try {
    r = JSON.parse(line) as Record<string, unknown>;
  } catch {
    return line.trimEnd();
  }
  const time = typeof r['time'] === 'number' ? new Date(r['time']).toISOString().slice(11, 23) : '';
  const level = (LEVELS[r['level'] as number] ?? String(r['level'])).padEnd(5);
  const component = typeof r['component'] === 'string' ? `${r['component']}: ` : '';
  const fields = Object.entries(r)
    .filter(([k]) => !HIDDEN.has(k))
    .map(([k, v]) => `${k}=${fieldValue(k, v)}`);
  return [time, level, `${component}${String(r['msg'] ?? '')}`, ...fields].filter(Boolean).join(' ');
}

function fieldValue(key: string, v: unknown): string {
  if (key === 'err' && v && typeof v === 'object') {
    const e = v as { code?: string; message?: string };
    return JSON.stringify(e.code ? `${e.code}: ${e.message}` : e.message);
  }
  if (typeof v === 'string') return /^[\w./:@-]+$/.test(v) ? v : JSON.stringify(v);
  return JSON.stringify(v);
}
