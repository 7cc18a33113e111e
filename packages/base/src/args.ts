import { ShearError } from './shear-error.js';

/**
 * Reads a JSON object of arguments (QMP arguments, blockdev options) member by member, with
 * QEMU's messages for wrong types and missing members, and at the end refuses members nobody
 * read. Every check runs before the caller acts, so bad input changes nothing.
 */
export class ArgReader {
  readonly #obj: Record<string, unknown>;
  readonly #path: string;
  readonly #seen = new Set<string>();

  constructor(value: unknown, path = '') {
    if (typeof value !== 'object' || value === null || Array.isArray(value)) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Invalid parameter type for '${path || 'arguments'}', expected: object`);
    }
    this.#obj = value as Record<string, unknown>;
    this.#path = path;
  }

  #name(key: string): string {
    return this.#path ? `${this.#path}.${key}` : key;
  }

  has(key: string): boolean {
    return this.#obj[key] !== undefined;
  }

  #get(key: string): unknown {
    this.#seen.add(key);
    return this.#obj[key];
  }

  #missing(key: string): never {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Parameter '${this.#name(key)}' is missing`);
  }

  #type(key: string, expected: string): never {
    throw new ShearError('ERR_INVALID_ARGUMENT', `Invalid parameter type for '${this.#name(key)}', expected: ${expected}`);
  }

  string(key: string): string;
  string(key: string, fallback: string): string;
  string(key: string, fallback: undefined): string | undefined;
  string(key: string, ...fallback: [] | [string | undefined]): string | undefined {
    const v = this.#get(key);
    if (v === undefined) return fallback.length ? fallback[0] : this.#missing(key);
    if (typeof v !== 'string') this.#type(key, 'string');
    return v;
  }

  /** An integer (JSON number without fraction) within the safe range and [min, max]. */
  int(key: string, opts: { min?: number; max?: number; fallback?: number; optional?: boolean } = {}): number | undefined {
    const v = this.#get(key);
    if (v === undefined) {
      if (opts.fallback !== undefined) return opts.fallback;
      if (opts.optional) return undefined;
      this.#missing(key);
    }
    if (typeof v !== 'number' || !Number.isSafeInteger(v)) this.#type(key, 'integer');
    if ((opts.min !== undefined && v < opts.min) || (opts.max !== undefined && v > opts.max)) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Parameter '${this.#name(key)}' expects a value from ${opts.min ?? '-inf'} to ${opts.max ?? 'inf'}: current value is ${v}`);
    }
    return v;
  }

  bool(key: string, fallback?: boolean): boolean | undefined {
    const v = this.#get(key);
    if (v === undefined) return fallback;
    if (typeof v !== 'boolean') this.#type(key, 'boolean');
    return v;
  }

  /** One of the given strings. */
  enumOf<T extends string>(key: string, values: readonly T[], fallback?: T): T | undefined {
    const v = this.#get(key);
    if (v === undefined) return fallback;
    if (typeof v !== 'string') this.#type(key, 'string');
    if (!values.includes(v as T)) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Parameter '${this.#name(key)}' does not accept value '${v}'`);
    }
    return v as T;
  }

  /** A nested object, as a reader of its own. */
  object(key: string, optional = false): ArgReader | undefined {
    const v = this.#get(key);
    if (v === undefined) return optional ? undefined : this.#missing(key);
    if (typeof v !== 'object' || v === null || Array.isArray(v)) this.#type(key, 'object');
    return new ArgReader(v, this.#name(key));
  }

  array(key: string, optional = false): unknown[] | undefined {
    const v = this.#get(key);
    if (v === undefined) return optional ? undefined : this.#missing(key);
    if (!Array.isArray(v)) this.#type(key, 'array');
    return v;
  }

  /** The raw value, for members whose type is a union (a node name or an inline object). */
  raw(key: string): unknown {
    return this.#get(key);
  }

  /** Marks members as known without reading them (accepted and ignored). */
  ignore(...keys: string[]): void {
    for (const k of keys) this.#seen.add(k);
  }

  /** @throws ERR_INVALID_ARGUMENT naming the first member no one read */
  done(): void {
    for (const key of Object.keys(this.#obj)) {
      if (!this.#seen.has(key)) throw new ShearError('ERR_INVALID_ARGUMENT', `Parameter '${this.#name(key)}' is unexpected`);
    }
  }
}
