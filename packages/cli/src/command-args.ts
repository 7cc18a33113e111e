import { parseArgs } from 'node:util';
import { ShearError } from '@shear/base';
import { parseSize } from './parse-size.js';

/**
 * The argument checks every one-shot command makes: a bad argument is ERR_INVALID_ARGUMENT whose
 * message ends with the command's usage text, whichever check found it.
 */
export class Usage {
  constructor(readonly text: string) {}

  fail(message: string): never {
    throw new ShearError('ERR_INVALID_ARGUMENT', `${message}\n\n${this.text}`);
  }

  /** node:util's parseArgs, its refusals (unknown option, missing value) as usage errors. */
  parse<T extends Parameters<typeof parseArgs>[0] & object>(config: T): ReturnType<typeof parseArgs<T>> {
    try {
      return parseArgs(config);
    } catch (err) {
      return this.fail((err as Error).message);
    }
  }

  oneOf<T extends string>(value: string | undefined, allowed: readonly T[], what: string): T | undefined {
    if (value === undefined) return undefined;
    if (!allowed.includes(value as T)) this.fail(`Invalid ${what} "${value}": expected ${allowed.join(' or ')}`);
    return value as T;
  }

  /** A size option; a value that is not a size is a usage error like any other. */
  size(value: string, what: string): number {
    try {
      return parseSize(value, what);
    } catch (err) {
      return this.fail((err as Error).message);
    }
  }

  /** An integer option in [min, max], `fallback` when absent. */
  integer(value: string | undefined, what: string, min: number, max: number, fallback: number): number {
    const n = value === undefined ? fallback : Number(value);
    if (!Number.isInteger(n) || n < min || n > max) this.fail(`Invalid ${what} "${value}": expected an integer from ${min} to ${max}`);
    return n;
  }
}
