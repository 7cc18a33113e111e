import { ShearError } from '@shear/base';
import { Job, type JobDriver, type JobEventSink, type JobOptions } from './job.js';
import { checkJobId } from './job-states.js';
import { JobTxn } from './job-txn.js';
import { jobErrorText } from './job-error-text.js';

/** A job as query-jobs shows it (QEMU's JobInfo). */
export interface JobInfo {
  id: string;
  type: string;
  status: string;
  'current-progress': number;
  'total-progress': number;
  error?: string;
  /** Shear's full message when `error` holds only QEMU's strerror text. */
  'x-shear-error-detail'?: string;
}

/** A job as query-block-jobs shows it (QEMU's BlockJobInfo). */
export interface BlockJobInfo {
  type: string;
  device: string;
  len: number;
  offset: number;
  busy: boolean;
  paused: boolean;
  speed: number;
  'io-status': 'ok';
  ready: boolean;
  status: string;
  'auto-finalize': boolean;
  'auto-dismiss': boolean;
  error?: string;
}

/**
 * The daemon's jobs by id. Events go to `emit` (the QMP server); ids are unique among jobs
 * that have not reached `null`.
 */
export class JobManager {
  readonly #jobs = new Map<string, Job>();
  readonly #emit: JobEventSink;

  constructor(emit: JobEventSink) {
    this.#emit = emit;
  }

  /**
   * Creates a job in state `created`; `start` runs it. Jobs created with the same `txn` complete
   * together (grouped completion); without one each job is its own transaction.
   * @throws ERR_JOB_ID (malformed or in use)
   */
  create(id: string, driver: JobDriver, opts: JobOptions = {}, txn = new JobTxn()): Job {
    this.checkNewId(id);
    const job = new Job(id, driver, opts, this.#emit, (j) => this.#jobs.delete(j.id));
    txn.add(job);
    this.#jobs.set(id, job);
    return job;
  }

  /** @throws ERR_JOB_ID */
  checkNewId(id: string): void {
    checkJobId(id);
    if (this.#jobs.has(id)) throw new ShearError('ERR_JOB_ID', `Job ID '${id}' already in use`, { job: id });
  }

  /** Removes a job that was created but never started (a failed transaction). */
  discard(job: Job): void {
    if (job.status === 'created' && !job.bodyDone) this.#jobs.delete(job.id);
  }

  /** @throws ERR_JOB_NOT_FOUND ("Job not found", as QEMU's job-* commands say) */
  get(id: string): Job {
    const job = this.#jobs.get(id);
    if (!job) throw new ShearError('ERR_JOB_NOT_FOUND', 'Job not found', { job: id });
    return job;
  }

  /** For block-job-* commands, whose message names the job (QEMU class DeviceNotActive). */
  getBlockJob(id: string): Job {
    const job = this.#jobs.get(id);
    if (!job) {
      const err = new ShearError('ERR_JOB_NOT_FOUND', `Block job '${id}' not found`, { job: id });
      (err as ShearError & { qmpClass?: string }).qmpClass = 'DeviceNotActive';
      throw err;
    }
    return job;
  }

  list(): Job[] {
    return [...this.#jobs.values()];
  }

  queryJobs(): JobInfo[] {
    return this.list().map((j) => {
      const { offset, len } = j.driver.progress();
      const info: JobInfo = { id: j.id, type: j.type, status: j.status, 'current-progress': offset, 'total-progress': len };
      if (j.error && j.status === 'concluded') {
        info.error = jobErrorText(j.error);
        // QEMU's field has only strerror's words; the full story (which range, which node) is Shear's.
        if (info.error !== j.error.message) info['x-shear-error-detail'] = j.error.message;
      }
      return { ...info, ...j.driver.extraInfo?.() };
    });
  }

  queryBlockJobs(): BlockJobInfo[] {
    return this.list()
      .filter((j) => j.status !== 'concluded' && j.status !== 'null')
      .map((j) => {
        const { offset, len } = j.driver.progress();
        return {
          type: j.type,
          device: j.id,
          len,
          offset,
          busy: j.status === 'running',
          paused: j.paused,
          speed: j.speed,
          'io-status': 'ok' as const,
          ready: false,
          status: j.status,
          'auto-finalize': j.autoFinalize,
          'auto-dismiss': j.autoDismiss,
          ...j.driver.extraInfo?.(),
        };
      });
  }

  /** Cancels every job and waits until each has concluded (daemon shutdown). */
  async cancelAll(): Promise<void> {
    const running = this.list().filter((j) => j.status !== 'concluded' && j.status !== 'null');
    for (const j of running) {
      try {
        j.cancel();
      } catch {
        // Already on its way out.
      }
    }
    await Promise.all(running.map((j) => j.concluded));
  }
}
