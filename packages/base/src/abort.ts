import { ShearError } from './shear-error.js';

/** Throws ERR_ABORTED if `signal` has fired, carrying the abort reason as the cause. */
export function throwIfAborted(signal: AbortSignal | undefined, what: string): void {
  if (signal?.aborted) {
    throw new ShearError('ERR_ABORTED', `Cannot continue ${what}: it was cancelled`, {}, { cause: signal.reason });
  }
}
