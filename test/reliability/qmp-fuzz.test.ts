import t from 'tap';
import fc from 'fast-check';
import path from 'node:path';
import { startDaemon } from '../lib/daemon.js';
import { makeRawImage } from '../lib/images.js';

const MiB = 2 ** 20;
const RUNS = Number(process.env['SHEAR_FUZZ_RUNS'] ?? 400);

/** Member names the commands use, so generated arguments often get past the first check. */
const KEYS = ['node', 'name', 'node-name', 'device', 'target', 'sync', 'bitmap', 'bitmap-mode', 'job-id', 'id', 'speed', 'granularity', 'persistent', 'disabled', 'driver', 'filename', 'file', 'actions', 'type', 'data', 'bitmaps', 'mode', 'addr', 'writable', 'command', 'x-perf', 'max-chunk', 'options', 'size'];
const VALUES = fc.oneof(
  fc.constantFrom('disk0', 'null0', 'b0', 'full', 'none', 'incremental', 'bitmap', 'always', 'nbd', 'file', 'qcow2', 'j0', '', '#block1', '../../etc/passwd', 'write -P 1 0 4k', 'read 0 1G'),
  fc.integer({ min: -2, max: 2 ** 40 }),
  fc.boolean(),
  fc.constant(null),
  fc.double(),
  fc.jsonValue({ maxDepth: 2 }),
);
const ARGS = fc.dictionary(fc.oneof(fc.constantFrom(...KEYS), fc.string({ maxLength: 6 })), VALUES, { maxKeys: 6 });

t.test('the QMP command layer answers generated garbage with errors, never an internal error, and keeps serving', async (t) => {
  const dir = t.testdir();
  const disk = path.join(dir, 'disk.raw');
  makeRawImage(disk, 4 * MiB, 9);
  const d = await startDaemon(dir, ['--blockdev', `driver=file,node-name=disk0,filename=${disk}`, '--blockdev', 'driver=null-co,node-name=null0,size=4194304', '--allow-dir', dir]);
  t.teardown(() => d.stop());
  const commands = (await d.cmd<{ name: string }[]>('query-commands')).map((c) => c.name).filter((n) => n !== 'quit');
  let errors = 0;
  let ok = 0;
  const internal: string[] = [];
  await fc.assert(
    fc.asyncProperty(fc.constantFrom(...commands), ARGS, async (cmd, args) => {
      try {
        await d.cmd(cmd, args);
        ok++;
      } catch (err) {
        const e = err as { qmpClass?: string; desc?: string; code?: string };
        if (e.code === 'ERR_QMP_DISCONNECTED') throw err;
        if (/internal error/.test(e.desc ?? '')) internal.push(`${cmd} ${JSON.stringify(args)}: ${e.desc}`);
        errors++;
      }
      return true;
    }),
    { numRuns: RUNS },
  );
  t.same(internal, [], 'no generated input reached an internal error');
  t.ok(errors > RUNS / 2, `${errors} refusals, ${ok} accepted`);
  t.match(await d.cmd('query-version'), { qemu: { major: 7 } }, 'the daemon still serves');
  t.equal(d.proc.exitCode, null, 'and is alive');
});
