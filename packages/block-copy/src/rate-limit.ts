import { ShearError } from '@shear/base';

/** Bursts are allowed up to this much time's worth of bytes. */
export const RATE_SLICE_MS = 100;

/**
 * A token bucket in bytes per second that can change while a copy runs. `take` admits a task
 * whenever the bucket is not in debt, and lets the bucket go into debt by the task's size, so
 * tasks bigger than a slice still pass and the long-run rate is the set speed.
 * Copy-before-write tasks do not ask (a guest write is waiting on them).
 */
export class RateLimiter {
  #bytesPerSec = 0;
  #tokens = 0;
  #last = 0;

  constructor(bytesPerSec = 0) {
    this.setSpeed(bytesPerSec);
  }

  get speed(): number {
    return this.#bytesPerSec;
  }

  /** 0 means unlimited. @throws ERR_INVALID_ARGUMENT */
  setSpeed(bytesPerSec: number, now = performance.now()): void {
    if (!Number.isSafeInteger(bytesPerSec) || bytesPerSec < 0) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot set speed ${bytesPerSec}: it must be a non-negative integer (bytes per second)`);
    }
    this.#bytesPerSec = bytesPerSec;
    this.#tokens = Math.min(this.#tokens, this.#capacity());
    this.#last = now;
  }

  /** Milliseconds until `bytes` may start; when 0, the bytes are taken. */
  take(bytes: number, now = performance.now()): number {
    if (this.#bytesPerSec === 0) return 0;
    this.#tokens = Math.min(this.#capacity(), this.#tokens + ((now - this.#last) * this.#bytesPerSec) / 1000);
    this.#last = now;
    if (this.#tokens >= 0) {
      this.#tokens -= bytes;
      return 0;
    }
    return Math.ceil((-this.#tokens / this.#bytesPerSec) * 1000);
  }

  #capacity(): number {
    return (this.#bytesPerSec * RATE_SLICE_MS) / 1000;
  }
}
