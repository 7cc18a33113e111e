// libvirt 9 without systemd: a transient TCG domain running the pattern-writing guest, backed up
// in pull mode (`virsh backup-begin` with a checkpoint, then incrementals from it), each backup
// ended with `virsh domjobabort` and compared with the disk at its point in time. virtnbdbackup,
// the benchmark's peer, backs up the same domain once.
import t from 'tap';
import { execFile, execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { requireTools } from '@shear/testkit';
import { prepareGuest, requireGuestKernel } from '../lib/vm.js';
import { TestDomain, ensureLibvirtd, virsh, type LibvirtDaemons } from '../lib/vm-libvirt.js';
import { nbdUnixUrl, readImage } from '../lib/vm-pull.js';
import { assertBackup, checkedBackup, type BackupResult } from '../lib/vm-backup.js';
import { checkPointInTime } from '../lib/vm-pattern.js';
import { vmCopier } from '../lib/vm-copier.js';

const run = promisify(execFile);
const MiB = 2 ** 20;
const SIZE = 64 * MiB;

t.setTimeout(15 * 60_000);

interface Env {
  dir: string;
  dom: TestDomain;
  daemons: LibvirtDaemons;
}

// Both tests use one domain: booting a TCG guest is most of a test's time.
let env: Promise<Env> | undefined;
let owned: { dom?: TestDomain; daemons?: LibvirtDaemons; dir?: string } = {};

async function setUp(): Promise<Env> {
  const daemons = await ensureLibvirtd();
  owned.daemons = daemons;
  const dir = mkdtempSync(path.join(os.tmpdir(), 'shear-lvtest-'));
  owned.dir = dir;
  const guest = prepareGuest(dir);
  const disk = path.join(dir, 'disk.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', disk, String(SIZE)]);
  const dom = await TestDomain.create({ guest, dir, disk, name: `shear-test-${process.pid}-${path.basename(dir).slice(-6)}` });
  owned.dom = dom;
  return { dir, dom, daemons };
}

// One owner for the domain, the directory and the daemons (when this file started them), in
// that order, whatever happened.
t.teardown(async () => {
  const { dom, daemons, dir } = owned;
  owned = {};
  try {
    await dom?.destroy();
  } finally {
    if (dir) rmSync(dir, { recursive: true, force: true });
    await daemons?.stop();
  }
});

const TOOLS = ['virsh', 'libvirtd', 'virtlogd', 'qemu-system-x86_64', 'qemu-img'];

t.test('libvirt pull-mode backups (virsh backup-begin, checkpoints): a full and two incrementals, each at its point in time', async (t) => {
  if (!requireTools(t, ...TOOLS) || !requireGuestKernel(t)) return;
  const copier = vmCopier(t);
  const { dir, dom, daemons } = await (env ??= setUp());
  t.comment(`libvirtd ${daemons.started ? 'started by this test' : 'already running'}; domain booted (tcg) in ${(dom.bootMs / 1000).toFixed(1)} s`);
  let prev: BackupResult | undefined;
  for (let k = 0; k < 3; k++) {
    const kind = k === 0 ? 'full' : `incremental ${k}`;
    await dom.waitGeneration(dom.generation() + 5);
    let genAtPull = 0;
    const r = await checkedBackup({
      dir, tag: String(k), disk: dom.disk, copier, backing: prev?.target, diskId: `libvirt:${dom.name}/vda`,
      pause: async () => void (await virsh('suspend', dom.name)),
      resume: async () => void (await virsh('resume', dom.name)),
      startExport: async () => {
        const b = await dom.backupBegin({ scratch: path.join(dir, `scratch-${k}.qcow2`), checkpoint: `cp${k + 1}`, ...(k > 0 ? { incremental: `cp${k}` } : {}) });
        if (k > 0 && !b.bitmap) throw new Error('libvirt exported no bitmap for an incremental backup');
        return { url: nbdUnixUrl(b.exportName, dom.nbdSocket), bitmap: b.bitmap, end: () => dom.backupEnd() };
      },
      afterResume: async () => void (genAtPull = await dom.waitGeneration(dom.generation() + 3)),
    });
    assertBackup(t, kind, r, prev, genAtPull);
    t.match(await virsh('domjobinfo', dom.name), /Job type:\s+None/, `${kind}: domjobabort ended the backup job`);
    prev = r;
  }
  t.match(await virsh('checkpoint-list', dom.name, '--name'), /cp1\s+cp2\s+cp3/, 'libvirt holds the chain of checkpoints');
});

t.test('virtnbdbackup backs up the same domain (the benchmark peer works here)', async (t) => {
  if (!requireTools(t, ...TOOLS, 'virtnbdbackup', 'virtnbdrestore') || !requireGuestKernel(t)) return;
  const { dir, dom } = await (env ??= setUp());
  // virtnbdbackup refuses checkpoints it did not create: start its chain afresh.
  for (const cp of (await virsh('checkpoint-list', dom.name, '--name', '--topological')).split('\n').map((s) => s.trim()).filter(Boolean).reverse()) {
    await virsh('checkpoint-delete', dom.name, cp);
  }
  await dom.waitGeneration(dom.generation() + 3);
  // Paused throughout, so that its backup and the copy are of one point in time.
  await virsh('suspend', dom.name);
  let copy: Buffer;
  const out = path.join(dir, 'vnb');
  try {
    copy = await readImage(dom.disk, path.join(dir, 'vnb-copy.raw'), { shareLock: true });
    await run('virtnbdbackup', ['-d', dom.name, '-l', 'full', '-o', out], { maxBuffer: 16 << 20 });
  } finally {
    await virsh('resume', dom.name);
  }
  const restoredDir = path.join(dir, 'vnb-restored');
  await run('virtnbdrestore', ['-i', out, '-o', restoredDir], { maxBuffer: 16 << 20 });
  const restored = await readImage(path.join(restoredDir, path.basename(dom.disk)), path.join(dir, 'vnb-restored.raw'));
  const check = checkPointInTime(restored, copy);
  t.ok(check.written > 0, 'the guest had written its pattern');
  t.same(check.torn.slice(0, 10), [], 'no torn block in what virtnbdrestore restored');
  t.ok(restored.equals(copy), 'virtnbdbackup + virtnbdrestore give back the paused disk');
});
