import { type ErrorCode, type ErrorKind, ERROR_CODES, kindOf } from './error-codes.js';

/** Where a failure happened. Attached at the failure site, never parsed from the message. */
export interface ErrorContext {
  node?: string;
  job?: string;
  bitmap?: string;
  offset?: number;
  bytes?: number;
  op?: string;
  path?: string;
  errno?: string;
}

/**
 * The one error type of Shear. `code` is stable and documented; `kind` is the small
 * classification protocols map to their own error space; `message` is for people and
 * follows the style "Cannot <action> <what>: <why>".
 */
export class ShearError extends Error {
  readonly code: ErrorCode;
  readonly kind: ErrorKind;
  readonly context: ErrorContext;

  constructor(code: ErrorCode, message: string, context: ErrorContext = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ShearError';
    this.code = code;
    this.kind = kindOf(code);
    this.context = context;
  }
}

export function isShearError(err: unknown, code?: ErrorCode): err is ShearError {
  return err instanceof ShearError && (code === undefined || err.code === code);
}

/**
 * A ShearError as plain data. Structured clone (postMessage, piscina) keeps only message,
 * stack and cause of an Error, so errors cross threads in this form.
 */
export interface WireError {
  code: ErrorCode;
  message: string;
  context: ErrorContext;
  stack?: string;
  cause?: { message: string; code?: string };
}

export function toWire(err: unknown): WireError {
  if (err instanceof ShearError) {
    const wire: WireError = { code: err.code, message: err.message, context: { ...err.context } };
    if (err.stack !== undefined) wire.stack = err.stack;
    const cause = describeCause(err.cause);
    if (cause) wire.cause = cause;
    return wire;
  }
  const cause = describeCause(err);
  const wire: WireError = {
    code: 'ERR_INTERNAL',
    message: `Unexpected error: ${cause?.message ?? String(err)}`,
    context: {},
  };
  if (cause) wire.cause = cause;
  if (err instanceof Error && err.stack !== undefined) wire.stack = err.stack;
  return wire;
}

export function fromWire(wire: WireError): ShearError {
  const code: ErrorCode = wire.code in ERROR_CODES ? wire.code : 'ERR_INTERNAL';
  const cause = wire.cause ? Object.assign(new Error(wire.cause.message), wire.cause.code ? { code: wire.cause.code } : {}) : undefined;
  const err = new ShearError(code, wire.message, wire.context, cause ? { cause } : undefined);
  if (wire.stack !== undefined) err.stack = wire.stack;
  return err;
}

function describeCause(cause: unknown): WireError['cause'] | undefined {
  if (cause === undefined || cause === null) return undefined;
  if (cause instanceof Error) {
    const code = (cause as { code?: unknown }).code;
    return typeof code === 'string' ? { message: cause.message, code } : { message: cause.message };
  }
  return { message: String(cause) };
}
