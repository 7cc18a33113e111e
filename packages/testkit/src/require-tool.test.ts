import t from 'tap';
import { haveLibnbdPython, requireLibnbdPython, requireTools } from './require-tool.js';

/** A recorder in place of tap's Test: what the helper asked for. */
function recorder() {
  const calls: { verdict: 'pass' | 'fail'; msg: string; skip?: string }[] = [];
  return {
    calls,
    pass: (msg: string, extra?: { skip?: string }) => calls.push({ verdict: 'pass', msg, ...(extra?.skip ? { skip: extra.skip } : {}) }),
    fail: (msg: string) => calls.push({ verdict: 'fail', msg }),
  };
}

function withCI<T>(value: string | undefined, fn: () => T): T {
  const saved = process.env['CI'];
  if (value === undefined) delete process.env['CI'];
  else process.env['CI'] = value;
  try {
    return fn();
  } finally {
    if (saved === undefined) delete process.env['CI'];
    else process.env['CI'] = saved;
  }
}

t.test('a missing tool fails the test under CI and skips it loudly elsewhere', async (t) => {
  const ci = recorder();
  t.equal(withCI('true', () => requireTools(ci, 'sh', 'no-such-tool-for-shear')), false);
  t.match(ci.calls, [{ verdict: 'fail', msg: /no-such-tool-for-shear/ }]);
  const local = recorder();
  t.equal(withCI(undefined, () => requireTools(local, 'no-such-tool-for-shear')), false);
  t.match(local.calls, [{ verdict: 'pass', skip: /no-such-tool-for-shear/ }]);
  const present = recorder();
  t.equal(withCI('true', () => requireTools(present, 'sh')), true);
  t.same(present.calls, []);
});

t.test('python3-libnbd follows the same policy', async (t) => {
  // /bin/false stands for a python without the bindings: `import nbd` fails.
  const ci = recorder();
  t.equal(withCI('true', () => requireLibnbdPython(ci, '/bin/false')), false);
  t.match(ci.calls, [{ verdict: 'fail', msg: /python3-libnbd/ }], 'missing under CI: a failure, not a skip');
  const local = recorder();
  t.equal(withCI(undefined, () => requireLibnbdPython(local, '/bin/false')), false);
  t.match(local.calls, [{ verdict: 'pass', skip: /python3-libnbd/ }], 'missing locally: a loud skip');
  const here = recorder();
  t.equal(withCI('true', () => requireLibnbdPython(here)), haveLibnbdPython(), 'the real one as found on this machine');
});
