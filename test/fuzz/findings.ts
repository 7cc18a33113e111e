/** What a campaign counts, per target, and the inputs behind each problem (the first few kept). */
export interface TargetStats {
  target: string;
  inputs: number;
  connections: number;
  /** Inputs after which the daemon closed the connection, as the protocol says it may. */
  expectedCloses: number;
  crashes: number;
  hangs: number;
  violations: number;
  /** Replies that were errors, by error (QMP class, NBD errno or option reply type). */
  errors: Record<string, number>;
  /** Inputs accepted (a QMP return, an NBD success). */
  accepted: number;
  byKind: Record<string, number>;
  seconds: number;
}

export interface Finding {
  target: string;
  what: 'crash' | 'hang' | 'violation';
  detail: string;
  /** The input that caused it, base64, with the seed and index that regenerate it. */
  input?: string;
  index?: number;
}

export class Findings {
  readonly list: Finding[] = [];
  readonly #perKey = new Map<string, number>();

  /** Counts a finding; true when it is one of the first of its kind (kept, worth printing). */
  add(f: Finding, stats: TargetStats): boolean {
    if (f.what === 'crash') stats.crashes++;
    else if (f.what === 'hang') stats.hangs++;
    else stats.violations++;
    // Keep at most 5 of each kind of finding: one broken rule can fire a million times.
    const key = `${f.target}:${f.what}:${f.detail.replace(/\d+/g, 'N').slice(0, 80)}`;
    const n = (this.#perKey.get(key) ?? 0) + 1;
    this.#perKey.set(key, n);
    if (n <= 5) this.list.push(f);
    return n <= 5;
  }
}

export function newStats(target: string): TargetStats {
  return { target, inputs: 0, connections: 0, expectedCloses: 0, crashes: 0, hangs: 0, violations: 0, errors: {}, accepted: 0, byKind: {}, seconds: 0 };
}

export function bump(rec: Record<string, number>, key: string, by = 1): void {
  rec[key] = (rec[key] ?? 0) + by;
}
