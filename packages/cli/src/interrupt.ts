import { ShearError } from '@shear/base';
import { constants } from 'node:os';

/** How long a command may take to unwind after SIGINT/SIGTERM before the process ends anyway. */
const UNWIND_MS = 800;
const STALL_UNWIND = process.env['SHEAR_STALL_UNWIND'] === '1';
/** Under the stall hook, the most the unwinding before the stall point may take. */
const STALL_GRACE_MS = 60_000;

/**
 * SIGINT/SIGTERM for a one-shot command: the first signal aborts `signal` (every long operation
 * takes it), the command unwinds (deletes what it had started) and the process exits with
 * 128 + the signal's number. The exit is guaranteed: if unwinding is not done within UNWIND_MS
 * (a stuck write, a wedged worker), the registered synchronous cleanups run and the process
 * exits at once; a second signal does the same. The command says, through `describe`, what the
 * one line printed at the end tells the user ("nothing was written to out.raw").
 */
export class Interruption {
  readonly #ac = new AbortController();
  readonly #cleanups = new Set<() => void>();
  #signal: NodeJS.Signals | undefined;
  #describe: () => string = () => 'stopped';
  #backstop: NodeJS.Timeout | undefined;

  readonly #onSignal = (sig: NodeJS.Signals): void => {
    if (this.#signal) {
      this.#forceExit();
      return;
    }
    this.#signal = sig;
    this.#ac.abort(new ShearError('ERR_ABORTED', `Interrupted by ${sig}`, { op: sig }));
    // Under the stall hook the limit counts from the stall, not from the signal: on a loaded
    // machine closing the workers alone can outlast UNWIND_MS, and the test must reach the
    // window it is about (nodes closed, partial file not yet deleted).
    this.#armBackstop(STALL_UNWIND ? STALL_GRACE_MS : UNWIND_MS);
  };

  #armBackstop(ms: number): void {
    if (this.#backstop) clearTimeout(this.#backstop);
    this.#backstop = setTimeout(() => this.#forceExit(), ms);
    this.#backstop.unref();
  }

  /** The stall hook reached: the usual limit from here. */
  stalled(): void {
    this.#armBackstop(UNWIND_MS);
  }

  constructor() {
    process.on('SIGINT', this.#onSignal);
    process.on('SIGTERM', this.#onSignal);
  }

  get signal(): AbortSignal {
    return this.#ac.signal;
  }

  /** The signal received, if any. */
  get received(): NodeJS.Signals | undefined {
    return this.#signal;
  }

  /** 130 for SIGINT, 143 for SIGTERM. */
  get exitCode(): number {
    return 128 + (this.#signal ? constants.signals[this.#signal] : constants.signals.SIGINT);
  }

  /** What the interrupted command leaves behind, for the one line printed at the end. */
  describe(fn: () => string): void {
    this.#describe = fn;
  }

  /** A synchronous cleanup for the forced exit (the normal path cleans up on its own). */
  onForcedExit(fn: () => void): () => void {
    this.#cleanups.add(fn);
    return () => this.#cleanups.delete(fn);
  }

  message(): string {
    return `shear: interrupted; ${this.#describe()}`;
  }

  #forceExit(): never {
    for (const fn of this.#cleanups) {
      try {
        fn();
      } catch {
        // Best effort: the process is leaving either way.
      }
    }
    process.stderr.write(this.message() + '\n');
    process.exit(this.exitCode);
  }

  dispose(): void {
    if (this.#backstop) clearTimeout(this.#backstop);
    process.off('SIGINT', this.#onSignal);
    process.off('SIGTERM', this.#onSignal);
  }
}

const PAUSE_AT = process.env['SHEAR_PAUSE_AT'];

/**
 * TEST-ONLY HOOK. With SHEAR_PAUSE_AT=<phase> in the environment, the command prints
 * "shear: paused at <phase>" on stderr when it reaches that phase and waits there until
 * `signal` aborts, then throws its reason: interruption tests signal a command in a known phase
 * without guessing at timing. Read once at module load; unset (production), it only compares a
 * string. `onPause` runs first (e.g. to hold a copy in the middle).
 */
export async function pausePoint(phase: string, signal: AbortSignal, onPause?: () => void): Promise<void> {
  signal.throwIfAborted();
  if (PAUSE_AT !== phase) return;
  onPause?.();
  process.stderr.write(`shear: paused at ${phase}\n`);
  // Signal handlers alone do not keep Node's event loop alive.
  const keepAlive = setInterval(() => {}, 2 ** 30);
  try {
    await new Promise<void>((resolve) => {
      if (signal.aborted) resolve();
      else signal.addEventListener('abort', () => resolve(), { once: true });
    });
  } finally {
    clearInterval(keepAlive);
  }
  signal.throwIfAborted();
}

/** Whether SHEAR_PAUSE_AT names `phase` (for phases that must arrange their pause themselves). */
export function pauseRequested(phase: string): boolean {
  return PAUSE_AT === phase;
}

/**
 * TEST-ONLY HOOK. With SHEAR_STALL_UNWIND=1, a command unwinding after a signal stops here for
 * good, as behind a wedged disk or worker, so the forced exit (UNWIND_MS later) and its
 * synchronous cleanups are what end the process: tests check those leave nothing behind. Unset
 * (production), it returns at once.
 */
export async function stallUnwind(signal: AbortSignal, intr?: Interruption): Promise<void> {
  if (!STALL_UNWIND || !signal.aborted) return;
  process.stderr.write('shear: unwinding stalled\n');
  intr?.stalled();
  // Signal handlers alone do not keep Node's event loop alive; the forced exit ends it.
  setInterval(() => {}, 2 ** 30);
  await new Promise<never>(() => {});
}
