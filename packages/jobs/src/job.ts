import { ShearError } from '@shear/base';
import { checkTransition, checkVerb, type JobStatus, type JobVerb } from './job-states.js';
import type { JobTxn } from './job-txn.js';

/** What a job type implements; the Job runs it through QEMU's lifecycle. */
export interface JobDriver {
  readonly type: string;
  /** Block jobs also report BLOCK_JOB_* events (backup); generic jobs only JOB_STATUS_CHANGE. */
  readonly blockJob?: boolean;
  /** The job's work. Resolves when done; rejects on failure; must stop soon after `signal` fires. */
  run(signal: AbortSignal, job: Job): Promise<void>;
  /** Success, when every job of the transaction succeeded: make the result permanent. */
  commit?(): Promise<void> | void;
  /** Failure or cancellation: undo what commit would have kept. */
  abort?(): Promise<void> | void;
  /** After commit or abort, always: release what the job holds. */
  clean?(): Promise<void> | void;
  pause?(): void;
  resume?(): void;
  setSpeed?(bytesPerSec: number): void;
  /** QEMU's progress: bytes done (offset) of bytes to do (len). */
  progress(): { offset: number; len: number };
  /** Shear's own fields for query-jobs and query-block-jobs (named `x-shear-...`). */
  extraInfo?(): Record<string, unknown>;
  /** The node the job works on, for query-block-jobs' `device` when it differs from the id. */
  readonly device?: string;
}

export interface JobOptions {
  autoFinalize?: boolean;
  autoDismiss?: boolean;
  speed?: number;
}

export type JobEventSink = (name: string, data: Record<string, unknown>) => void;

/**
 * One job: QEMU's state machine (job-states.ts), verbs, events and transaction membership.
 * Coordinator-only object. State changes happen only through `transition`, which checks the
 * table and emits JOB_STATUS_CHANGE, so events and states can never disagree.
 */
export class Job {
  readonly id: string;
  readonly driver: JobDriver;
  readonly autoFinalize: boolean;
  readonly autoDismiss: boolean;
  txn!: JobTxn;
  #status: JobStatus = 'undefined';
  #speed: number;
  #error: ShearError | undefined;
  #cancelled = false;
  #userPaused = false;
  #started = false;
  #bodyDone = false;
  readonly #ac = new AbortController();
  readonly #emit: JobEventSink;
  readonly #onNull: (job: Job) => void;
  #concluded!: () => void;
  /** Resolves when the job reaches `concluded`. */
  readonly concluded: Promise<void>;

  /** @internal Created by JobManager. */
  constructor(id: string, driver: JobDriver, opts: JobOptions, emit: JobEventSink, onNull: (job: Job) => void) {
    this.id = id;
    this.driver = driver;
    this.autoFinalize = opts.autoFinalize ?? true;
    this.autoDismiss = opts.autoDismiss ?? true;
    this.#speed = opts.speed ?? 0;
    this.#emit = emit;
    this.#onNull = onNull;
    this.concluded = new Promise((resolve) => (this.#concluded = resolve));
    this.transition('created');
  }

  get status(): JobStatus {
    return this.#status;
  }
  get type(): string {
    return this.driver.type;
  }
  get error(): ShearError | undefined {
    return this.#error;
  }
  get cancelled(): boolean {
    return this.#cancelled;
  }
  get paused(): boolean {
    return this.#userPaused;
  }
  get bodyDone(): boolean {
    return this.#bodyDone;
  }
  get speed(): number {
    return this.#speed;
  }
  get signal(): AbortSignal {
    return this.#ac.signal;
  }

  /** @internal Moves to `to`, checked against QEMU's table, and tells the world. */
  transition(to: JobStatus): void {
    checkTransition(this.id, this.#status, to);
    this.#status = to;
    this.#emit('JOB_STATUS_CHANGE', { status: to, id: this.id });
    if (to === 'concluded') this.#concluded();
    if (to === 'null') this.#onNull(this);
  }

  /** @internal Starts the body (created -> running). */
  start(): void {
    if (this.#started) return;
    this.#started = true;
    if (this.#cancelled) {
      // Cancelled before it started: nothing ran, so nothing is kept.
      this.#bodyDone = true;
      this.#error = new ShearError('ERR_ABORTED', `Job '${this.id}' was cancelled before it started`, { job: this.id });
      void this.txn.jobFailed(this);
      return;
    }
    this.transition('running');
    if (this.#userPaused) this.#enterPause();
    void this.#runBody();
  }

  async #runBody(): Promise<void> {
    let err: unknown;
    try {
      await this.driver.run(this.#ac.signal, this);
    } catch (e) {
      err = e;
    }
    if (this.#status === 'paused') this.transition('running');
    this.#bodyDone = true;
    if (err === undefined && this.#cancelled) err = new ShearError('ERR_ABORTED', `Job '${this.id}' was cancelled`, { job: this.id });
    if (err !== undefined) {
      this.#error = err instanceof ShearError ? err : new ShearError('ERR_JOB_FAILED', `Job '${this.id}' failed: ${(err as Error)?.message ?? String(err)}`, { job: this.id }, { cause: err });
      await this.txn.jobFailed(this);
    } else {
      await this.txn.jobSucceeded(this);
    }
  }

  /** @internal Emits a job event (BLOCK_JOB_*). */
  emit(name: string, data: Record<string, unknown>): void {
    this.#emit(name, data);
  }

  // ---- verbs ----

  /** @throws ERR_JOB_VERB_NOT_ALLOWED */
  cancel(): void {
    checkVerb(this.id, this.#status, 'cancel');
    if (this.#cancelled) return;
    this.#cancelled = true;
    if (!this.#started) return this.start();
    if (this.#bodyDone) {
      // Waiting or pending: it finished, but cancelling now still fails the transaction.
      this.#error = new ShearError('ERR_ABORTED', `Job '${this.id}' was cancelled`, { job: this.id });
      void this.txn.jobFailed(this);
      return;
    }
    this.#ac.abort(new ShearError('ERR_ABORTED', `Job '${this.id}' was cancelled`, { job: this.id }));
    if (this.#userPaused) {
      this.#userPaused = false;
      this.driver.resume?.();
    }
  }

  /** @internal Cancellation by the transaction (another member failed). */
  cancelByTxn(): void {
    if (this.#bodyDone || this.#cancelled) return;
    this.#cancelled = true;
    if (!this.#started) return this.start();
    this.#ac.abort(new ShearError('ERR_ABORTED', `Job '${this.id}' was cancelled because another job of its transaction failed`, { job: this.id }));
    if (this.#userPaused) {
      this.#userPaused = false;
      this.driver.resume?.();
    }
  }

  pause(): void {
    checkVerb(this.id, this.#status, 'pause');
    if (this.#userPaused) throw new ShearError('ERR_JOB_VERB_NOT_ALLOWED', 'Job is already paused', { job: this.id, op: 'pause' });
    this.#userPaused = true;
    if (this.#status === 'running') this.#enterPause();
  }

  /** Pauses because an error policy said `stop` (QEMU's BLOCK_ERROR_ACTION_STOP). */
  pauseForError(): void {
    if (this.#userPaused || this.#status !== 'running') return;
    this.#userPaused = true;
    this.#enterPause();
  }

  #enterPause(): void {
    this.driver.pause?.();
    this.transition('paused');
  }

  resume(): void {
    checkVerb(this.id, this.#status, 'resume');
    if (!this.#userPaused) throw new ShearError('ERR_JOB_VERB_NOT_ALLOWED', "Can't resume a job that was not paused", { job: this.id, op: 'resume' });
    this.#userPaused = false;
    if (this.#status === 'paused') this.transition('running');
    this.driver.resume?.();
  }

  setSpeed(bytesPerSec: number): void {
    checkVerb(this.id, this.#status, 'set-speed');
    if (!Number.isSafeInteger(bytesPerSec) || bytesPerSec < 0) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Invalid parameter 'speed': ${bytesPerSec} must be a non-negative integer`, { job: this.id });
    }
    this.#speed = bytesPerSec;
    this.driver.setSpeed?.(bytesPerSec);
  }

  complete(): void {
    checkVerb(this.id, this.#status, 'complete');
  }

  async finalize(): Promise<void> {
    checkVerb(this.id, this.#status, 'finalize');
    await this.txn.finalize();
  }

  dismiss(): void {
    checkVerb(this.id, this.#status, 'dismiss');
    this.transition('null');
  }

  /** QEMU's verb check without acting, for transactions that must check before changing anything. */
  checkVerb(verb: JobVerb): void {
    checkVerb(this.id, this.#status, verb);
  }
}
