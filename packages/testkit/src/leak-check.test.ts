import { spawn } from 'node:child_process';
import { existsSync, rmSync } from 'node:fs';
import t from 'tap';

const FIXTURE = new URL('./leak-check.fixture.ts', import.meta.url).pathname;
const TAP_FIXTURE = new URL('./leak-check-tap.fixture.ts', import.meta.url).pathname;

/** Runs a fixture in a fresh node with this process's flags (TypeScript hooks, the leak check). */
function run(file: string, arg: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const env: NodeJS.ProcessEnv = { ...process.env, SHEAR_LEAK_CHECK_GRACE_S: '1' };
  // A fresh check of its own, outside this tap run.
  delete env['SHEAR_LEAK_CHECK_OWNER'];
  delete env['SHEAR_LEAK_CHECK'];
  for (const k of Object.keys(env)) if (k === 'TAP' || k.startsWith('TAP_')) delete env[k];
  const execArgv = process.execArgv.filter((a) => !a.startsWith('--import=@shear/testkit/leak-check'));
  const child = spawn(process.execPath, [...execArgv, '--import=@shear/testkit/leak-check', file, arg], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  return new Promise((resolve) => child.once('close', (code) => resolve({ code, stdout, stderr })));
}

t.test('nothing left open: exit 0, nothing reported', async (t) => {
  const r = await run(FIXTURE, 'none');
  t.equal(r.stderr, '');
  t.notMatch(r.stdout, /leak-check/);
  t.equal(r.code, 0);
});

t.test('each kind of leak fails the process and is named', async (t) => {
  const cases: [string, RegExp][] = [
    ['fd', /fd \d+ -> \/\S+\/disk\.raw still open after the test file ended/],
    ['timer', /setInterval timer \(1000 ms, callback pollStatus\(\)\), created at .*leak-check\.fixture\.ts:\d+:\d+.* still active/],
    ['server', /TCP server on .*127\.0\.0\.1.*still active[\s\S]*fd \d+ -> socket:\[\d+\] \(the TCPSERVERWRAP above\) still open/],
    ['worker', /worker thread \d+, created at .*leak-check\.fixture\.ts.* still active/],
    ['child', /child process (\d+) \(sleep 30\) still running after the test file ended/],
  ];
  for (const [kind, message] of cases) {
    const r = await run(FIXTURE, kind);
    t.equal(r.code, 1, `${kind}: exit code`);
    t.match(r.stderr, message, `${kind}: message`);
    t.match(r.stdout, /^# leak-check: /m, `${kind}: TAP comment`);
    if (kind === 'fd') {
      const dir = /temporary directory (\S+) \(made with mkdtemp\) still exists/.exec(r.stderr)?.[1];
      t.ok(dir && existsSync(dir), 'the leaked mkdtemp directory is named too');
      if (dir) rmSync(dir, { recursive: true, force: true });
    }
    if (kind === 'child') {
      const pid = Number(/child process (\d+)/.exec(r.stderr)?.[1]);
      if (pid) process.kill(pid, 'SIGKILL');
    }
  }
});

t.test('in a tap file: a subtest leak fails the file after its tests passed', async (t) => {
  const r = await run(TAP_FIXTURE, 'subtest');
  t.match(r.stdout, /^ok 1 - leaves a timer/m);
  t.match(r.stdout, /^# leak-check:\s+setTimeout timer \(60000 ms, callback forgotten\(\)\)/m);
  t.equal(r.code, 1);
});

t.test('in a tap file whose root has a teardown: a handle that keeps the process alive is reported, not waited for', async (t) => {
  const started = Date.now();
  const r = await run(TAP_FIXTURE, 'teardown');
  t.match(r.stdout, /^ok 1 - leaves a server listening/m);
  t.match(r.stderr, /1 s after the test file's last test ended[\s\S]*TCP server on .*127\.0\.0\.1/);
  t.equal(r.code, 1);
  t.ok(Date.now() - started < 60_000, 'well before tap would time out');
});
