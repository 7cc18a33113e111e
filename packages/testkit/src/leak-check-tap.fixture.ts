// Child process for leak-check.test.ts: a tap test file that leaks, to show how tap reports it.
// argv[2] 'subtest': an unref'd timer left by a subtest; 'teardown': a listening server that keeps
// the process alive in a file whose root test has a teardown (tap ends such a root when idle).
import net from 'node:net';
import t from 'tap';

if (process.argv[2] === 'subtest') {
  t.test('leaves a timer', async (t) => {
    setTimeout(function forgotten() {}, 60_000).unref();
    t.pass('done');
  });
} else {
  t.teardown(() => {});
  t.test('leaves a server listening', async (t) => {
    net.createServer().listen(0, '127.0.0.1');
    t.pass('done');
  });
}
