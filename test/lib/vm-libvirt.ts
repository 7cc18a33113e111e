// libvirt for the VM tests, on a machine without systemd: virtlogd and libvirtd started as
// daemons when none answers (and stopped again by whoever started them), a transient TCG domain
// booting the test guest, and pull-mode backups with `virsh backup-begin`.
import { execFile, execFileSync } from 'node:child_process';
import { chmodSync, chownSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { GUEST_CMDLINE, GuestConsole, type GuestBoot } from './vm.js';

const run = promisify(execFile);
const VIRSH = ['-c', 'qemu:///system'];

export async function virsh(...args: string[]): Promise<string> {
  try {
    return (await run('virsh', [...VIRSH, ...args], { maxBuffer: 16 << 20 })).stdout;
  } catch (err) {
    const e = err as Error & { stderr?: string };
    throw new Error(`virsh ${args.join(' ')}: ${e.stderr?.trim() || e.message}`, { cause: err });
  }
}

function answers(): boolean {
  try {
    execFileSync('virsh', [...VIRSH, 'version'], { stdio: 'ignore', timeout: 10_000 });
    return true;
  } catch {
    return false;
  }
}

/** Whether a process runs (a zombie, which kill(pid, 0) still finds, has ended). */
function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

function pidFrom(file: string): number | undefined {
  if (!existsSync(file)) return undefined;
  const pid = Number(readFileSync(file, 'utf8').trim());
  return Number.isInteger(pid) && pid > 0 && pidAlive(pid) ? pid : undefined;
}

export interface LibvirtDaemons {
  /** Whether this handle started them (and stop() will stop them). */
  started: boolean;
  stop(): Promise<void>;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Ends a daemon this process started: SIGTERM, then SIGKILL if it lingers. */
async function stopPid(pid: number): Promise<void> {
  if (!pidAlive(pid)) return;
  process.kill(pid, 'SIGTERM');
  const by = Date.now() + 15_000;
  while (pidAlive(pid) && Date.now() < by) await sleep(100);
  if (pidAlive(pid)) process.kill(pid, 'SIGKILL');
  while (pidAlive(pid)) await sleep(50);
}

/**
 * Uses the running libvirtd when `virsh version` answers; otherwise starts `virtlogd -d` (unless
 * running) and `libvirtd -d` (not -l: that wants TLS) and waits until virsh answers.
 */
export async function ensureLibvirtd(timeoutMs = 60_000): Promise<LibvirtDaemons> {
  if (answers()) return { started: false, stop: async () => undefined };
  const mine: number[] = [];
  try {
    if (!pidFrom('/run/virtlogd.pid')) {
      await run('virtlogd', ['-d']);
      const pid = pidFrom('/run/virtlogd.pid');
      if (pid) mine.push(pid);
    }
    await run('libvirtd', ['-d']);
    const pid = pidFrom('/run/libvirtd.pid');
    if (pid) mine.push(pid);
    const by = Date.now() + timeoutMs;
    while (!answers()) {
      if (Date.now() > by) throw new Error(`libvirtd did not answer virsh version within ${timeoutMs} ms`);
      await sleep(250);
    }
  } catch (err) {
    for (const pid of mine.reverse()) await stopPid(pid);
    throw err;
  }
  let stopped: Promise<void> | undefined;
  return {
    started: true,
    stop: () => (stopped ??= (async () => {
      for (const pid of [...mine].reverse()) await stopPid(pid);
    })()),
  };
}

/** The uid of libvirt's QEMU user, which must own the NBD socket's directory. */
function libvirtQemuIds(): { uid: number; gid: number } {
  const out = execFileSync('id', ['libvirt-qemu'], { encoding: 'utf8' });
  const uid = /uid=(\d+)/.exec(out);
  const gid = /gid=(\d+)/.exec(out);
  if (!uid || !gid) throw new Error(`cannot read the ids of libvirt-qemu from: ${out}`);
  return { uid: Number(uid[1]), gid: Number(gid[1]) };
}

export interface DomainOptions {
  guest: GuestBoot;
  /** Directory for the domain's disk, console and scratch files; must be reachable by libvirt-qemu. */
  dir: string;
  disk: string;
  name: string;
}

/**
 * A transient `<domain type='qemu'>` (TCG) booting the test guest. One owner: destroy() ends it
 * (libvirt then gives the files back to root) and removes the socket directory, on every path.
 */
export class TestDomain {
  readonly name: string;
  readonly disk: string;
  readonly console: GuestConsole;
  /** A directory owned by libvirt-qemu, for the backup's NBD socket. */
  readonly sockDir: string;
  readonly bootMs: number;
  #destroyed = false;

  private constructor(name: string, disk: string, console: GuestConsole, sockDir: string, bootMs: number) {
    this.name = name;
    this.disk = disk;
    this.console = console;
    this.sockDir = sockDir;
    this.bootMs = bootMs;
  }

  static async create(o: DomainOptions, bootTimeoutMs = 240_000): Promise<TestDomain> {
    // libvirt-qemu must reach the disk, initramfs and console (it is given the files themselves).
    chmodSync(o.dir, 0o755);
    const consoleFile = path.join(o.dir, 'console.log');
    const xml = `<domain type='qemu'>
  <name>${o.name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>${o.guest.kernel.vmlinuz}</kernel><initrd>${o.guest.initrd}</initrd><cmdline>${GUEST_CMDLINE}</cmdline></os>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${o.disk}'/><target dev='vda' bus='virtio'/></disk>
    <serial type='file'><source path='${consoleFile}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
`;
    const xmlFile = path.join(o.dir, 'domain.xml');
    writeFileSync(xmlFile, xml);
    const sockDir = mkdtempSync(path.join(os.tmpdir(), 'shear-lv-'));
    const { uid, gid } = libvirtQemuIds();
    chownSync(sockDir, uid, gid);
    const started = Date.now();
    let created = false;
    try {
      await virsh('create', xmlFile);
      created = true;
      const console = new GuestConsole(consoleFile);
      await console.waitReady(started + bootTimeoutMs, () => undefined);
      return new TestDomain(o.name, o.disk, console, sockDir, Date.now() - started);
    } catch (err) {
      if (created) await virsh('destroy', o.name).catch(() => undefined);
      rmSync(sockDir, { recursive: true, force: true });
      throw err;
    }
  }

  get nbdSocket(): string {
    return path.join(this.sockDir, 'nbd.sock');
  }

  generation(): number {
    return this.console.generation();
  }

  waitGeneration(g: number, timeoutMs = 120_000): Promise<number> {
    return this.console.waitGeneration(g, timeoutMs, () => undefined);
  }

  /**
   * `virsh backup-begin` in pull mode with a checkpoint named `checkpoint`; an incremental from
   * `incremental` (a checkpoint) when given. Resolves with the exported bitmap's name, if any.
   */
  async backupBegin(o: { scratch: string; checkpoint: string; incremental?: string }): Promise<{ exportName: string; bitmap: string | undefined }> {
    const dir = path.dirname(o.scratch);
    const backupXml = path.join(dir, `backup-${o.checkpoint}.xml`);
    const checkpointXml = path.join(dir, `checkpoint-${o.checkpoint}.xml`);
    writeFileSync(backupXml, `<domainbackup mode='pull'>
  ${o.incremental ? `<incremental>${o.incremental}</incremental>` : ''}
  <server transport='unix' socket='${this.nbdSocket}'/>
  <disks><disk name='vda' backup='yes' type='file'><scratch file='${o.scratch}'/></disk></disks>
</domainbackup>
`);
    writeFileSync(checkpointXml, `<domaincheckpoint><name>${o.checkpoint}</name><disks><disk name='vda' checkpoint='bitmap'/></disks></domaincheckpoint>\n`);
    await virsh('backup-begin', this.name, backupXml, checkpointXml);
    const xml = await virsh('backup-dumpxml', this.name);
    const exportName = /exportname='([^']+)'/.exec(xml)?.[1];
    if (!exportName) throw new Error(`backup-dumpxml names no export: ${xml}`);
    return { exportName, bitmap: /exportbitmap='([^']+)'/.exec(xml)?.[1] };
  }

  /** Ends the running backup job (libvirt removes the export and the scratch node). */
  async backupEnd(): Promise<void> {
    await virsh('domjobabort', this.name);
    const by = Date.now() + 30_000;
    while (/Job type:\s+Unbounded/.test(await virsh('domjobinfo', this.name))) {
      if (Date.now() > by) throw new Error('the backup job did not end after domjobabort');
      await sleep(100);
    }
  }

  async destroy(): Promise<void> {
    if (this.#destroyed) return;
    this.#destroyed = true;
    try {
      await virsh('destroy', this.name);
    } finally {
      rmSync(this.sockDir, { recursive: true, force: true });
    }
  }
}
