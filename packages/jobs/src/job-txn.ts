import type { Job } from './job.js';
import { jobErrorText } from './job-error-text.js';

/**
 * Jobs that complete together (QEMU's JobTxn; a single job is a transaction of one). When
 * every member succeeded they move to pending together and are finalized together (commit);
 * when one fails, the others are cancelled, and once all have stopped every member is aborted.
 */
export class JobTxn {
  readonly jobs: Job[] = [];
  #aborting = false;
  #finalizing: Promise<void> | undefined;

  add(job: Job): void {
    this.jobs.push(job);
    job.txn = this;
  }

  /** @internal A member's body succeeded. */
  async jobSucceeded(job: Job): Promise<void> {
    if (this.#aborting) return this.#abortWhenStopped();
    job.transition('waiting');
    if (!this.jobs.every((j) => j.bodyDone && j.status === 'waiting')) return;
    for (const j of this.jobs) {
      j.transition('pending');
      // QEMU tells only about a pending job that waits for job-finalize (qemu-storage-daemon 7.2).
      if (j.driver.blockJob && !j.autoFinalize) j.emit('BLOCK_JOB_PENDING', { type: j.type, id: j.id });
    }
    if (this.jobs.every((j) => j.autoFinalize)) await this.finalize();
  }

  /** @internal A member failed or was cancelled: the whole transaction fails. */
  async jobFailed(_job: Job): Promise<void> {
    if (this.#aborting) return this.#abortWhenStopped();
    this.#aborting = true;
    for (const j of this.jobs) j.cancelByTxn();
    return this.#abortWhenStopped();
  }

  /** Commits every member (they are all pending). Idempotent while it runs. */
  finalize(): Promise<void> {
    this.#finalizing ??= (async () => {
      for (const j of this.jobs) {
        try {
          await j.driver.commit?.();
        } finally {
          await j.driver.clean?.();
        }
        const { offset, len } = j.driver.progress();
        if (j.driver.blockJob) j.emit('BLOCK_JOB_COMPLETED', { type: j.type, device: j.id, len, offset, speed: j.speed });
        j.transition('concluded');
        if (j.autoDismiss) j.transition('null');
      }
    })();
    return this.#finalizing;
  }

  #aborted = false;

  /** Once every member has stopped running, aborts them all, once. */
  async #abortWhenStopped(): Promise<void> {
    if (this.#aborted || !this.jobs.every((j) => j.bodyDone)) return;
    this.#aborted = true;
    for (const j of this.jobs) {
      if (j.status !== 'aborting') j.transition('aborting');
      try {
        await j.driver.abort?.();
      } finally {
        await j.driver.clean?.();
      }
      const { offset, len } = j.driver.progress();
      if (!j.driver.blockJob) {
        // Generic jobs report the outcome in query-jobs only.
      } else if (j.cancelled && (!j.error || j.error.code === 'ERR_ABORTED')) {
        j.emit('BLOCK_JOB_CANCELLED', { type: j.type, device: j.id, len, offset, speed: j.speed });
      } else {
        j.emit('BLOCK_JOB_COMPLETED', { type: j.type, device: j.id, len, offset, speed: j.speed, error: jobErrorText(j.error) });
      }
      j.transition('concluded');
      if (j.autoDismiss) j.transition('null');
    }
  }
}
