// A real QEMU guest for the VM tests: qemu-system-x86_64 booting Debian's kernel with the test
// initramfs (vm-initramfs.ts), one virtio-blk disk, its QMP on a UNIX socket and its serial
// console in a file the test reads for the guest's reports.
import { spawn, type ChildProcess } from 'node:child_process';
import { accessSync, constants, existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { QmpClient } from '@shear/qmp';
import { skipLoudly } from '@shear/testkit';
import { buildInitramfs, findGuestKernel, type GuestKernel } from './vm-initramfs.js';
import { MARK } from './vm-pattern.js';

export type Accel = 'kvm' | 'tcg';

/** The kernel and initramfs every guest of a test file boots; built once into `dir`. */
export interface GuestBoot {
  kernel: GuestKernel;
  initrd: string;
}

/** Builds the initramfs into `dir` (the caller owns `dir`). Throws when no guest kernel is installed. */
export function prepareGuest(dir: string): GuestBoot {
  const kernel = findGuestKernel();
  if (!kernel) throw new Error('no kernel in /boot with its modules in /lib/modules (install linux-image-amd64: npm run setup)');
  const initrd = path.join(dir, 'initrd.cpio');
  buildInitramfs(kernel, initrd);
  return { kernel, initrd };
}

/** The kernel command line of the test guest (also used by the libvirt domain). */
export const GUEST_CMDLINE = 'console=ttyS0 panic=-1 quiet SHEAR_PACE=0.1';

export interface VmOptions {
  guest: GuestBoot;
  /** The guest's disk: a qcow2 image. */
  disk: string;
  /** Node name of the disk's format node, for QMP. */
  nodeName?: string;
  memoryMiB?: number;
  /** How long a KVM boot may take before it is taken as hung and TCG is used (default 20 s). */
  kvmBootTimeoutMs?: number;
  /** How long a TCG boot may take (default 240 s: the machine may be loaded). */
  tcgBootTimeoutMs?: number;
}

/** Whether /dev/kvm can be opened: only then is KVM tried at all. */
function kvmUsable(): boolean {
  try {
    accessSync('/dev/kvm', constants.R_OK | constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

/**
 * A running guest. One owner: close() kills QEMU, waits for it to exit, closes the QMP connection
 * and removes the VM's socket directory, on every path (boot failure included).
 */
export class TestVm {
  readonly accel: Accel;
  /** From spawn to the guest's "ready" line. */
  readonly bootMs: number;
  readonly qmp: QmpClient;
  readonly nodeName: string;
  readonly disk: string;
  readonly #proc: ChildProcess;
  readonly #exited: Promise<void>;
  readonly #dir: string;
  readonly #console: GuestConsole;
  readonly #stderr: () => string;
  #closed = false;

  private constructor(init: { accel: Accel; bootMs: number; qmp: QmpClient; nodeName: string; disk: string; proc: ChildProcess; exited: Promise<void>; dir: string; consoleFile: string; stderr: () => string }) {
    this.accel = init.accel;
    this.bootMs = init.bootMs;
    this.qmp = init.qmp;
    this.nodeName = init.nodeName;
    this.disk = init.disk;
    this.#proc = init.proc;
    this.#exited = init.exited;
    this.#dir = init.dir;
    this.#console = new GuestConsole(init.consoleFile);
    this.#stderr = init.stderr;
  }

  /**
   * Boots the guest until it reports "ready": with KVM first when /dev/kvm is usable (a stock
   * kernel can hang on a nested-virtualisation stand-in, hence the short timeout), else or then
   * with TCG.
   */
  static async boot(opts: VmOptions): Promise<TestVm> {
    const errors: string[] = [];
    const accels: Accel[] = kvmUsable() ? ['kvm', 'tcg'] : ['tcg'];
    for (const accel of accels) {
      try {
        return await TestVm.#bootWith(accel, opts);
      } catch (err) {
        errors.push(`${accel}: ${(err as Error).message}`);
      }
    }
    throw new Error(`the guest did not boot:\n${errors.join('\n')}`);
  }

  static async #bootWith(accel: Accel, opts: VmOptions): Promise<TestVm> {
    const nodeName = opts.nodeName ?? 'disk0';
    // UNIX socket paths are limited to about 107 bytes: a short directory of its own.
    const dir = mkdtempSync(path.join(os.tmpdir(), 'shear-vm-'));
    const qmpSock = path.join(dir, 'qmp.sock');
    const consoleFile = path.join(dir, 'console.log');
    const args = [
      '-accel', accel, '-m', String(opts.memoryMiB ?? 256),
      '-nographic', '-nodefaults', '-no-user-config', '-monitor', 'none', '-no-reboot',
      '-kernel', opts.guest.kernel.vmlinuz, '-initrd', opts.guest.initrd, '-append', GUEST_CMDLINE,
      '-blockdev', JSON.stringify({ driver: 'qcow2', 'node-name': nodeName, file: { driver: 'file', filename: opts.disk } }),
      '-device', `virtio-blk-pci,drive=${nodeName},id=vda`,
      '-qmp', `unix:${qmpSock},server=on,wait=off`,
      '-serial', `file:${consoleFile}`,
    ];
    const started = Date.now();
    const proc = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    proc.stderr!.on('data', (d) => (stderr += d));
    const exited = new Promise<void>((resolve) => proc.once('close', () => resolve()));
    proc.once('error', (err) => (stderr += `spawn failed: ${err.message}`));
    let qmp: QmpClient | undefined;
    try {
      const timeoutMs = accel === 'kvm' ? (opts.kvmBootTimeoutMs ?? 20_000) : (opts.tcgBootTimeoutMs ?? 240_000);
      const deadline = started + timeoutMs;
      const failed = () => proc.exitCode !== null || proc.signalCode !== null;
      while (!existsSync(qmpSock)) {
        if (failed()) throw new Error(`qemu exited: ${stderr.trim()}`);
        if (Date.now() > deadline) throw new Error('no QMP socket in time');
        await sleep(50);
      }
      qmp = await QmpClient.connect(qmpSock, { timeoutMs: Math.max(1000, deadline - Date.now()) });
      await new GuestConsole(consoleFile).waitReady(deadline, () => (failed() ? `qemu exited: ${stderr.trim()}` : undefined));
      return new TestVm({ accel, bootMs: Date.now() - started, qmp, nodeName, disk: opts.disk, proc, exited, dir, consoleFile, stderr: () => stderr });
    } catch (err) {
      await qmp?.close();
      proc.kill('SIGKILL');
      await exited;
      const tail = existsSync(consoleFile) ? readFileSync(consoleFile, 'latin1').slice(-2000) : '';
      rmSync(dir, { recursive: true, force: true });
      throw new Error(`${(err as Error).message}; console: ${JSON.stringify(tail)}`, { cause: err });
    }
  }

  /** The guest's serial console. */
  get console(): GuestConsole {
    return this.#console;
  }

  /** The last generation the guest reported as written (0 before the first). */
  generation(): number {
    return this.#console.generation();
  }

  /** Waits until the guest has written generation `g`; throws on a guest error or QEMU's exit. */
  waitGeneration(g: number, timeoutMs = 120_000): Promise<number> {
    return this.#console.waitGeneration(g, timeoutMs, () => (this.#proc.exitCode !== null || this.#proc.signalCode !== null ? `qemu exited: ${this.#stderr()}` : undefined));
  }

  /** Runs a QMP command on the VM. */
  cmd<T = unknown>(name: string, args?: Record<string, unknown>): Promise<T> {
    return this.qmp.execute<T>(name, args);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.qmp.close();
    this.#proc.kill('SIGKILL');
    await this.#exited;
    rmSync(this.#dir, { recursive: true, force: true });
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * The guest's serial console, written to a file by QEMU: the guest reports "ready", then each
 * generation it has written, and any failure, as lines starting with MARK.
 */
export class GuestConsole {
  constructor(readonly file: string) {}

  text(): string {
    return existsSync(this.file) ? readFileSync(this.file, 'latin1') : '';
  }

  /** The last generation the guest reported as written (0 before the first). */
  generation(): number {
    const all = [...this.text().matchAll(new RegExp(`${MARK} gen (\\d+) `, 'g'))];
    return all.length ? Number(all.at(-1)![1]) : 0;
  }

  /** Waits for the guest's "ready"; `failure` names a reason to stop early (the VM is gone). */
  async waitReady(deadline: number, failure: () => string | undefined): Promise<void> {
    const re = new RegExp(`${MARK} ready blocks=(\\d+)`);
    for (;;) {
      if (re.test(this.text())) return;
      this.#guestFailure();
      const why = failure();
      if (why) throw new Error(why);
      if (Date.now() > deadline) throw new Error('the guest did not report ready in time');
      await sleep(100);
    }
  }

  /** Waits until the guest has written generation `g`; throws on a guest error or `failure`. */
  async waitGeneration(g: number, timeoutMs: number, failure: () => string | undefined): Promise<number> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      this.#guestFailure();
      const now = this.generation();
      if (now >= g) return now;
      const why = failure();
      if (why) throw new Error(why);
      if (Date.now() > deadline) throw new Error(`the guest reached generation ${now}, not ${g}, in ${timeoutMs} ms`);
      await sleep(100);
    }
  }

  #guestFailure(): void {
    const bad = new RegExp(`${MARK} (write failed|insmod|no /dev/vda)[^\\n]*`).exec(this.text());
    if (bad) throw new Error(`the guest reported: ${bad[0]}`);
  }
}

/** The part of tap's Test this needs. */
interface Reporter {
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  fail(...args: any[]): unknown;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  pass(...args: any[]): unknown;
}

/** Like requireTools, for the guest kernel from linux-image-amd64: a failure in CI, a loud skip locally. */
export function requireGuestKernel(t: Reporter): boolean {
  if (findGuestKernel()) return true;
  const msg = 'no guest kernel: /boot/vmlinuz-* with its modules (run: npm run setup)';
  if (process.env['CI']) t.fail(msg);
  else skipLoudly(t, msg);
  return false;
}
