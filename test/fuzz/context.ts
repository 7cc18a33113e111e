import type { FuzzEnv } from './env.js';
import { Findings, type Finding, type TargetStats } from './findings.js';

/** What the lanes of one target share: the daemon, the counters, and how to report problems. */
export class CampaignContext {
  readonly env: FuzzEnv;
  readonly stats: TargetStats;
  readonly findings: Findings;
  readonly hangMs: number;
  readonly target: string;
  stopped = false;
  #index = 0;
  #crashReported = false;

  readonly #log: (line: string) => void;

  constructor(env: FuzzEnv, stats: TargetStats, findings: Findings, hangMs: number, log: (line: string) => void = () => {}) {
    this.#log = log;
    this.env = env;
    this.stats = stats;
    this.findings = findings;
    this.hangMs = hangMs;
    this.target = stats.target;
  }

  /** A running number for every input of the target (with the seed, it names the input). */
  nextIndex(): number {
    return this.#index++;
  }

  finding(f: Omit<Finding, 'target' | 'input'> & { input?: Uint8Array }): void {
    const input = f.input ? Buffer.from(f.input.subarray(0, 4096)).toString('base64') : undefined;
    if (this.findings.add({ ...f, target: this.target, input }, this.stats)) this.#log(`  FINDING ${this.target} ${f.what}: ${f.detail}${f.index !== undefined ? ` [input #${f.index}]` : ''}${input ? ` input(base64)=${input.slice(0, 160)}` : ''}`);
  }

  /**
   * Whether the daemon still answers QMP. When it does not (it exited, or no answer within the
   * hang deadline), that is a crash or a hang of the whole daemon: recorded once, and the
   * target stops.
   */
  async checkAlive(why: string): Promise<boolean> {
    if (!this.env.alive) {
      this.#crash(`the daemon exited (${this.env.d.proc.exitCode ?? this.env.d.proc.signalCode}) after: ${why}`);
      return false;
    }
    let timer: NodeJS.Timeout | undefined;
    const answered = await Promise.race([
      this.env.d.cmd('query-version').then(() => true, () => false),
      new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), this.hangMs))),
    ]);
    clearTimeout(timer);
    if (answered) return true;
    if (!this.env.alive) this.#crash(`the daemon exited (${this.env.d.proc.exitCode ?? this.env.d.proc.signalCode}) after: ${why}`);
    else if (!this.#crashReported) {
      this.#crashReported = true;
      this.finding({ what: 'hang', detail: `the daemon stopped answering QMP after: ${why}` });
      this.stopped = true;
    }
    return false;
  }

  #refusals = 0;

  /**
   * A connection the daemon refused while it still answers QMP (its listener is gone): a
   * violation, and after a few in a row the target stops rather than spin.
   */
  async connectFailed(what: string, err: unknown): Promise<void> {
    if (!(await this.checkAlive(`${what} failed`))) return;
    this.finding({ what: 'violation', detail: `${what} failed while the daemon runs: ${(err as Error).message}` });
    if (++this.#refusals >= 3) this.stopped = true;
    await new Promise((r) => setTimeout(r, 100));
  }

  /** No answer to an input in time: a hang, confirmed by a liveness probe of the daemon. */
  async hangFound(input: Uint8Array | undefined, index: number | undefined, detail: string): Promise<void> {
    const alive = await this.checkAlive(detail);
    if (!alive) return;
    // What the daemon was doing, for whoever reads the finding: its jobs and its copy pool.
    const jobs = await this.env.d.cmd<{ id: string; type: string; status: string }[]>('query-jobs').catch(() => []);
    const pool = (await this.env.d.resources().catch(() => undefined))?.pool;
    const state = `jobs ${jobs.map((j) => `${j.id}:${j.type}:${j.status}`).join(',') || 'none'}; pool ${pool ? `${pool['in-flight']} in flight, ${pool.queued} queued` : 'none'}`;
    this.finding({ what: 'hang', detail: `${detail} (${state})`, input, index });
  }

  #crash(detail: string): void {
    if (this.#crashReported) return;
    this.#crashReported = true;
    this.finding({ what: 'crash', detail });
    this.stopped = true;
  }
}
