/**
 * The part of a pino logger this package uses, so any pino-compatible object fits and the
 * package does not depend on pino. Calls follow pino's `(mergingObject, message)` form.
 */
export interface QmpLogger {
  debug(obj: object, msg?: string): void;
  info(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
  error(obj: object, msg?: string): void;
  child(bindings: Record<string, unknown>): QmpLogger;
}

const noop = (): void => {};

export const silentLogger: QmpLogger = {
  debug: noop,
  info: noop,
  warn: noop,
  error: noop,
  child: () => silentLogger,
};
