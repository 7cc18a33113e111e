/**
 * The logger every package writes to: the part of a pino logger Shear uses, so a pino logger
 * fits as it is and no package but the CLI (which makes the root one) depends on pino. Calls
 * follow pino's `(mergingObject, message)` form; each record is one pino JSON line.
 */
export interface Logger {
  debug(fields: LogFields, msg?: string): void;
  info(fields: LogFields, msg?: string): void;
  warn(fields: LogFields, msg?: string): void;
  error(fields: LogFields, msg?: string): void;
  /** A logger whose records all carry `bindings` (`{ component }`, `{ job, node }`, a QMP session). */
  child(bindings: LogFields): Logger;
}

/**
 * A record's fields. The named ones mean the same in every package, so records about one job
 * or one node can be found together: `job` is the job id, `node` the block node name, `evt` a
 * stable dotted event name (`job.created`), `err` the error (pino serialises ShearError's code).
 */
export interface LogFields {
  evt?: string;
  job?: string;
  node?: string;
  component?: string;
  err?: unknown;
  [field: string]: unknown;
}

const noop = (): void => {};

/** Drops every record (tests, and libraries used without a logger). */
export const silentLogger: Logger = {
  debug: noop,
  info: noop,
  warn: noop,
  error: noop,
  child: () => silentLogger,
};
