/**
 * TEST-ONLY FAULT HOOK. With SHEAR_CRASH_AT=<area>:<step> in the environment, the process kills
 * itself with SIGKILL the first time it passes that point, exactly as `kill -9` would at that
 * moment: crash tests use it to stop the daemon between two writes whose order matters (see
 * docs/reliability.md for the points). Read once, at module load, so that the variable cannot
 * be set later from inside the process; unset (production), crashPoint only compares a string.
 */
const CRASH_AT = process.env['SHEAR_CRASH_AT'];

export function crashPoint(area: string, step: string): void {
  if (CRASH_AT === undefined || CRASH_AT !== `${area}:${step}`) return;
  process.kill(process.pid, 'SIGKILL');
  // SIGKILL is delivered at once; block meanwhile so that not one more step runs.
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0);
}
