// A real VM (qemu-system-x86_64, Debian's kernel, a busybox guest writing a known pattern to its
// virtio disk) backed up through its own QMP's fleecing export: a full backup and three
// incrementals, each restored and compared with the disk at its point in time.
import t from 'tap';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { requireLibnbdPython, requireTools } from '@shear/testkit';
import { TestVm, prepareGuest, requireGuestKernel } from '../lib/vm.js';
import { startFleece, startNbdServer, type FleeceScheme } from '../lib/vm-fleece.js';
import { allocatedInTop, nbdUnixUrl } from '../lib/vm-pull.js';
import { assertBackup, checkedBackup, type BackupResult } from '../lib/vm-backup.js';
import { vmCopier } from '../lib/vm-copier.js';

const MiB = 2 ** 20;
const SIZE = 64 * MiB;

t.setTimeout(15 * 60_000);

t.test('a running VM backed up through its own fleecing export: full + three incrementals, each at its point in time', async (t) => {
  if (!requireTools(t, 'qemu-system-x86_64', 'qemu-img', 'qemu-nbd') || !requireLibnbdPython(t) || !requireGuestKernel(t)) return;
  const copier = vmCopier(t);
  const dir = mkdtempSync(path.join(os.tmpdir(), 'shear-vmtest-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const guest = prepareGuest(dir);
  const disk = path.join(dir, 'disk.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', disk, String(SIZE)]);
  const vm = await TestVm.boot({ guest, disk });
  t.teardown(() => vm.close());
  t.comment(`guest booted with ${vm.accel} in ${(vm.bootMs / 1000).toFixed(1)} s`);
  const nbdSock = path.join(path.dirname(vm.disk), 'nbd.sock');
  await startNbdServer(vm.qmp, nbdSock);

  // Full and first incremental through a fleecing overlay, the others through snapshot-access
  // (writable, so that shear pull can TRIM what it has copied).
  const schemes: FleeceScheme[] = ['backing-overlay', 'backing-overlay', 'snapshot-access', 'snapshot-access'];
  let prev: BackupResult | undefined;
  for (const [k, scheme] of schemes.entries()) {
    const kind = k === 0 ? 'full' : `incremental ${k}`;
    await vm.waitGeneration(vm.generation() + 5);
    let bitmapBytes = 0;
    let genAtPull = 0;
    const r = await checkedBackup({
      dir, tag: String(k), disk, copier, backing: prev?.target, diskId: 'test-vm/disk0', trim: scheme === 'snapshot-access',
      pause: () => vm.cmd('stop'),
      resume: () => vm.cmd('cont'),
      startExport: async () => {
        const fl = await startFleece(vm.qmp, {
          node: vm.nodeName, size: SIZE, scheme, dir, tag: `b${k}`, nextBitmap: `bm${k + 1}`,
          ...(k > 0 ? { bitmap: `bm${k}` } : {}), writable: scheme === 'snapshot-access',
        });
        if (fl.bitmap) bitmapBytes = await dirtyBytes(vm, fl.bitmap);
        return { url: nbdUnixUrl(fl.name, nbdSock), bitmap: fl.bitmap, end: fl.end };
      },
      // The guest overwrites more of its disk while the export is up: the backup must not see it.
      afterResume: async () => void (genAtPull = await vm.waitGeneration(vm.generation() + 3)),
    });
    const dirty = assertBackup(t, `${kind} (${scheme})`, r, prev, genAtPull);
    if (prev) {
      t.equal(bitmapBytes, dirty, `${kind}: the exported bitmap marks exactly those clusters`);
      t.ok((await allocatedInTop(r.target)) <= dirty, `${kind}: the overlay holds no more than the dirty clusters`);
      if (r.outcome.trimmedBytes !== undefined && scheme === 'snapshot-access') {
        t.equal(r.outcome.trimmedBytes, r.outcome.copiedBytes, `${kind}: everything copied was trimmed on the export (--trim)`);
      }
    }
    prev = r;
  }

  // The control: the same steps with the live disk exported instead of a point-in-time view.
  // The guest writes between the copy and the pull, so the checks must find blocks of another time.
  await vm.waitGeneration(vm.generation() + 3);
  let genAtPull = 0;
  const live = await checkedBackup({
    dir, tag: 'live', disk, copier, backing: undefined, diskId: 'test-vm/disk0-live',
    pause: () => vm.cmd('stop'),
    resume: () => vm.cmd('cont'),
    startExport: async () => {
      await vm.cmd('block-export-add', { type: 'nbd', id: 'live', 'node-name': vm.nodeName, name: 'live', writable: false });
      return {
        url: nbdUnixUrl('live', nbdSock),
        bitmap: undefined,
        end: async () => {
          const deleted = vm.qmp.waitEvent('BLOCK_EXPORT_DELETED', (e) => e['id'] === 'live', { timeoutMs: 30_000 });
          await vm.cmd('block-export-del', { id: 'live' });
          await deleted;
        },
      };
    },
    afterResume: async () => void (genAtPull = await vm.waitGeneration(vm.generation() + 3)),
  });
  t.ok(live.check.mixed.length > 0, `control: a pull of the live disk is caught holding ${live.check.mixed.length} blocks written after the point in time (up to generation ${genAtPull})`);
  t.notOk(live.restored.equals(live.copy), 'control: and it differs from the paused copy');
});

/** Dirty bytes of a bitmap on the VM's disk, from query-named-block-nodes. */
async function dirtyBytes(vm: TestVm, bitmap: string): Promise<number> {
  const nodes = await vm.cmd<{ 'node-name': string; 'dirty-bitmaps'?: { name: string; count: number }[] }[]>('query-named-block-nodes', { flat: true });
  const node = nodes.find((n) => n['node-name'] === vm.nodeName);
  const bm = node?.['dirty-bitmaps']?.find((b) => b.name === bitmap);
  if (!bm) throw new Error(`no bitmap ${bitmap} on ${vm.nodeName}`);
  return bm.count;
}
