import { execFileSync } from 'node:child_process';

/**
 * Whether an external tool (qemu-img, nbdinfo, ...) can be run. In CI (CI set) a missing tool
 * is a failure; locally the caller skips, loudly.
 */
export function haveTool(name: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${JSON.stringify(name)}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** The part of tap's Test this needs (tap's `skip(name, cb)` starts a subtest, so a skipped pass is used). */
interface SkippableTest {
  // tap's own signatures are variadic tuples; any is what lets its `t` fit here.
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  pass(...args: any[]): unknown;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  fail(...args: any[]): unknown;
}

/** Marks the rest of the test as skipped, where a local run's reader will see it. */
export function skipLoudly(t: SkippableTest, msg: string): void {
  process.stderr.write(`\n!!! SKIPPING: ${msg}\n\n`);
  t.pass(msg, { skip: msg });
}

/** Something the test needs is missing: a failure under CI, a loud skip locally. */
function missing(t: SkippableTest, msg: string): false {
  if (process.env['CI']) t.fail(msg);
  else skipLoudly(t, msg);
  return false;
}

/**
 * Returns true when every tool is present. Otherwise fails the test under CI, or skips it with
 * a loud message locally, and returns false so the caller can return early.
 */
export function requireTools(t: SkippableTest, ...names: string[]): boolean {
  const absent = names.filter((n) => !haveTool(n));
  if (absent.length === 0) return true;
  return missing(t, `required tool(s) missing: ${absent.join(', ')} (run: npm run setup)`);
}

/**
 * The same for the native addon (`@shear/native`'s NativeIO, passed in so that testkit does not
 * load it): true when it is in use, else a failure under CI or a loud skip locally.
 */
export function requireNativeAddon(t: SkippableTest, native: { available: boolean; fallbackReason: string | undefined }): boolean {
  if (native.available) return true;
  return missing(t, `native addon not available (${native.fallbackReason}); build it with: npm run build:addon -w @shear/native`);
}

/**
 * Debian's python3 with the libnbd bindings (python3-libnbd is built for /usr/bin/python3; another
 * python3 first on PATH may lack them).
 */
export const LIBNBD_PYTHON = '/usr/bin/python3';

/** Whether `python` (LIBNBD_PYTHON unless a test names another) can `import nbd`. */
export function haveLibnbdPython(python = LIBNBD_PYTHON): boolean {
  try {
    execFileSync(python, ['-c', 'import nbd'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** requireTools for python3-libnbd: the same failure under CI, the same loud skip locally. */
export function requireLibnbdPython(t: SkippableTest, python = LIBNBD_PYTHON): boolean {
  if (haveLibnbdPython(python)) return true;
  return missing(t, `required package missing: python3-libnbd (${python} cannot import nbd; run: npm run setup)`);
}
