import { ShearError } from '@shear/base';

/**
 * QEMU's error classes (qapi/error.json, QapiErrorClass). GenericError "should be the default
 * case for most errors"; the others exist for old clients that branched on them.
 */
export const QMP_ERROR_CLASSES = ['GenericError', 'CommandNotFound', 'DeviceNotActive', 'DeviceNotFound', 'KVMMissingCap'] as const;
export type QmpErrorClass = (typeof QMP_ERROR_CLASSES)[number];

export function isQmpErrorClass(value: unknown): value is QmpErrorClass {
  return typeof value === 'string' && (QMP_ERROR_CLASSES as readonly string[]).includes(value);
}

/** The `error` member of a QMP reply. */
export interface QmpErrorBody {
  class: QmpErrorClass;
  desc: string;
}

/**
 * Marks an error with the QMP class it must be reported under, for the few commands where QEMU
 * uses a class other than GenericError (block-job-* report a missing job as DeviceNotActive).
 * Returns the same error.
 */
export function withQmpClass<E extends Error>(err: E, qmpClass: QmpErrorClass): E & { qmpClass: QmpErrorClass } {
  return Object.assign(err, { qmpClass });
}

/** How a command's errors map to classes. */
export interface QmpErrorMapping {
  /** Class for ShearErrors of kind 'not-found' (default GenericError, as QEMU for nodes, bitmaps and job-*). */
  notFoundClass?: QmpErrorClass;
}

/** Message for failures that are not ShearErrors: a bug, whose detail goes to the log only. */
export function internalErrorDesc(command: string): string {
  return `Cannot run command '${command}': internal error (details are in the daemon log)`;
}

/**
 * The QMP error for what a handler threw. An explicit `qmpClass` on the error wins; then
 * ShearError kinds; anything that is not a ShearError is a bug and becomes a GenericError with
 * a generic desc (`internal: true` tells the caller to log it).
 */
export function toQmpError(err: unknown, command: string, mapping: QmpErrorMapping = {}): QmpErrorBody & { internal: boolean } {
  const explicit = typeof err === 'object' && err !== null ? (err as { qmpClass?: unknown }).qmpClass : undefined;
  if (err instanceof ShearError) {
    let cls: QmpErrorClass = 'GenericError';
    if (isQmpErrorClass(explicit)) cls = explicit;
    else if (err.code === 'ERR_QMP_COMMAND_NOT_FOUND') cls = 'CommandNotFound';
    else if (err.kind === 'not-found') cls = mapping.notFoundClass ?? 'GenericError';
    return { class: cls, desc: err.message, internal: err.kind === 'internal' };
  }
  if (err instanceof Error && isQmpErrorClass(explicit)) {
    return { class: explicit, desc: err.message, internal: false };
  }
  return { class: 'GenericError', desc: internalErrorDesc(command), internal: true };
}
