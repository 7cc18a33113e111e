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

/**
 * Returns true when every tool is present. Otherwise fails the test under CI, or skips it with
 * a loud message locally, and returns false so the caller can return early.
 */
export function requireTools(t: SkippableTest, ...names: string[]): boolean {
  const missing = names.filter((n) => !haveTool(n));
  if (missing.length === 0) return true;
  const msg = `required tool(s) missing: ${missing.join(', ')} (run: npm run setup)`;
  if (process.env['CI']) {
    t.fail(msg);
  } else {
    process.stderr.write(`\n!!! SKIPPING: ${msg}\n\n`);
    t.pass(msg, { skip: msg });
  }
  return false;
}
