// --allow-dir confines every file name a client gives: the ones blockdev-add opens and the ones
// blockdev-create makes (found by the fuzz campaign: blockdev-create made files anywhere).
import t from 'tap';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startDaemon } from '../lib/daemon.js';

t.test('blockdev-create refuses a file outside --allow-dir and creates nothing there', async (t) => {
  const dir = t.testdir();
  const outside = mkdtempSync(path.join(os.tmpdir(), 'shear-outside-'));
  t.teardown(() => rmSync(outside, { recursive: true, force: true }));
  const d = await startDaemon(dir, ['--allow-dir', dir]);
  t.teardown(() => d.stop());

  for (const filename of [path.join(outside, 'made.raw'), `${dir}/${path.relative(dir, outside)}/dotdot.raw`]) {
    const err = await d.cmd('blockdev-create', { 'job-id': 'c0', options: { driver: 'file', filename, size: 65536 } }).then(
      () => undefined,
      (e: { qmpClass?: string; desc?: string }) => e,
    );
    t.match(err, { qmpClass: 'GenericError', desc: /outside the directories this daemon may use/ }, `refused: ${filename}`);
    t.notOk(existsSync(filename), 'and the file was not created');
  }
  t.same((await d.cmd<unknown[]>('query-jobs')).length, 0, 'no job was started');

  const inside = path.join(dir, 'ok.raw');
  const concluded = d.qmp.waitEvent('JOB_STATUS_CHANGE', (e) => e['id'] === 'c1' && e['status'] === 'concluded', { timeoutMs: 60_000 });
  await d.cmd('blockdev-create', { 'job-id': 'c1', options: { driver: 'file', filename: inside, size: 65536 } });
  await concluded;
  await d.cmd('job-dismiss', { id: 'c1' });
  t.ok(existsSync(inside), 'a file inside the allowed directory is created');
});
