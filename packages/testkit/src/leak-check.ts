/**
 * Leak check for test processes: what a test file opened must be closed when it ends.
 *
 * `installLeakCheck()` records a baseline when the process starts (it is loaded with
 * `--import=@shear/testkit/leak-check`, see .taprc) and, when the process ends, reports
 * everything that was opened since and is still open:
 *
 * - file descriptors (from /proc/self/fd, with what they point at),
 * - handles and timers, including unref'd ones (tracked with async_hooks, since
 *   `process.getActiveResourcesInfo()` only lists handles that keep the process alive):
 *   timers, TCP and UNIX sockets and servers, child process handles, worker threads, message
 *   ports, signal watchers, fs watchers,
 * - child processes that still run (from /proc/self/task/N/children),
 * - temporary directories made with mkdtemp under os.tmpdir() that still exist.
 *
 * A leak prints one line per resource (`fd 23 -> /tmp/x/disk.raw still open after the test
 * file ended`) on stdout as TAP comments and on stderr, and makes the process exit with 1, which
 * tap reports as a failure of the test file.
 *
 * Linux only (it reads /proc); elsewhere fds and children are not checked.
 */
import { createHook } from 'node:async_hooks';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import { syncBuiltinESMExports } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { isMainThread } from 'node:worker_threads';

/** Async resource types that are handles (or timers) a test can leave open. */
const TRACKED_TYPES = new Set([
  'Timeout',
  'TCPWRAP',
  'TCPSERVERWRAP',
  'PIPEWRAP',
  'PIPESERVERWRAP',
  'PROCESSWRAP',
  'UDPWRAP',
  'TTYWRAP',
  'SIGNALWRAP',
  'FSEVENTWRAP',
  'STATWATCHER',
  'WORKER',
  'MESSAGEPORT',
]);
// Not tracked, on purpose:
// - FILEHANDLE (fs/promises): its destroy hook fires at garbage collection, not at close(), so
//   a closed FileHandle looks live; an unclosed one is found by the fd check instead.
// - DNSCHANNEL: node's resolver, made once for the whole process the first time it is needed.
// - requests (FSREQCALLBACK, WRITEWRAP, ...): none can be pending once the event loop is empty.

/**
 * Creation stacks from these places are the test runner's own resources (tap's root test, its
 * exit and signal handlers), which live until the process exits.
 */
const RUNNER_FRAMES = /[\\/]node_modules[\\/](?:@tapjs|tap|signal-exit|async-hook-domain)[\\/]/;

/**
 * The allow-list. Each entry is something a test cannot close and that is not a leak.
 */
const ALLOWED = {
  /**
   * Module source files: worker threads inherit tap's --import hooks, and a worker terminated
   * while it is still loading its modules (tests that kill workers on purpose) leaves those
   * reads to node's module loader, which does not close them. Tests never open source files
   * with these extensions by descriptor.
   * And /dev/null: libuv opens it once per event loop at the first listen(), a spare descriptor
   * it closes to shed connections when the process runs out of them, and keeps it.
   */
  fdTarget: /[\\/]node_modules[\\/].*\.(?:[cm]?js|json)$|\.(?:[cm]?ts)$|^\/dev\/null$/,
};

export interface FdInfo {
  fd: number;
  target: string;
}

export interface ChildInfo {
  pid: number;
  state: string;
  cmdline: string;
}

interface TrackedResource {
  type: string;
  ref: WeakRef<object>;
  /** An object holding the creation stack (captured unformatted, formatted only when reported). */
  at: { stack?: string };
}

export interface Leak {
  kind: 'fd' | 'handle' | 'worker' | 'child' | 'tmpdir';
  message: string;
}

/** Open file descriptors of this process and what they point at (empty off Linux). */
export function openFds(): FdInfo[] {
  let names: string[];
  try {
    names = fs.readdirSync('/proc/self/fd');
  } catch {
    return [];
  }
  const out: FdInfo[] = [];
  for (const name of names) {
    let target: string;
    try {
      target = fs.readlinkSync(`/proc/self/fd/${name}`);
    } catch {
      continue; // the descriptor readdirSync itself used, already closed
    }
    out.push({ fd: Number(name), target });
  }
  return out.sort((a, b) => a.fd - b.fd);
}

/** Child processes of this process (any of its threads) that have not been reaped. */
export function childProcesses(): ChildInfo[] {
  const pids = new Set<number>();
  try {
    for (const task of fs.readdirSync('/proc/self/task')) {
      let list = '';
      try {
        list = fs.readFileSync(`/proc/self/task/${task}/children`, 'utf8');
      } catch {
        continue;
      }
      for (const p of list.split(/\s+/)) if (p) pids.add(Number(p));
    }
  } catch {
    return [];
  }
  const out: ChildInfo[] = [];
  for (const pid of pids) {
    let state = '?';
    let cmdline = '';
    try {
      const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
      state = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0] ?? '?';
      cmdline = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter(Boolean).join(' ');
    } catch {
      continue; // exited and reaped meanwhile
    }
    out.push({ pid, state, cmdline });
  }
  return out;
}

function firstLines(s: string, n: number): string {
  return s.split('\n').slice(0, n).join('\n');
}

/** A stack frame in this file (the async hook that captured the stack). */
const SELF_FRAME = /[\\/]leak-check\.[jt]s:\d/;

/** Frames of a creation stack that are not node's or this file's own, innermost first. */
function callerFrames(stack: string | undefined, max = 4): string[] {
  if (!stack) return [];
  return stack
    .split('\n')
    .slice(1)
    .map((l) => l.trim())
    .filter((l) => l.startsWith('at ') && !l.includes('node:') && !SELF_FRAME.test(l))
    .slice(0, max);
}

/** Whether the code that created a resource is the test runner's (its own frame, not a caller's). */
function madeByRunner(r: TrackedResource): boolean {
  const creator = callerFrames(r.at.stack, 1)[0];
  return creator !== undefined && RUNNER_FRAMES.test(creator);
}

/** What a tracked resource is, in words, from the live object when it still exists. */
function describe(r: TrackedResource): string {
  const obj = r.ref.deref() as Record<string, unknown> | undefined;
  let what = r.type;
  if (r.type === 'Timeout' && obj) {
    const cb = obj['_onTimeout'] as ((...a: unknown[]) => unknown) | undefined;
    const repeat = obj['_repeat'];
    const name = cb?.name ? `${cb.name}()` : cb ? JSON.stringify(firstLines(String(cb), 1).slice(0, 80)) : '?';
    what = `${repeat ? 'setInterval' : 'setTimeout'} timer (${String(obj['_idleTimeout'])} ms, callback ${name})`;
  } else if (r.type === 'WORKER' && obj) {
    what = `worker thread ${String(obj['threadId'] ?? '?')}`;
  } else if (r.type === 'PROCESSWRAP' && obj) {
    what = `child process handle (pid ${String(obj['pid'] ?? '?')})`;
  } else if ((r.type === 'TCPWRAP' || r.type === 'PIPEWRAP') && obj) {
    what = `${r.type === 'TCPWRAP' ? 'TCP' : 'UNIX/pipe'} socket`;
    const owner = obj['owner'] as { remoteAddress?: string; remotePort?: number; _host?: string | null } | undefined;
    if (owner?.remoteAddress) what += ` to ${owner.remoteAddress}:${owner.remotePort}`;
  } else if ((r.type === 'TCPSERVERWRAP' || r.type === 'PIPESERVERWRAP') && obj) {
    const owner = obj['owner'] as { address?: () => unknown } | undefined;
    let addr = '';
    try {
      addr = JSON.stringify(owner?.address?.());
    } catch {
      /* closed */
    }
    what = `${r.type === 'TCPSERVERWRAP' ? 'TCP' : 'UNIX'} server${addr ? ` on ${addr}` : ''}`;
  } else if (r.type === 'MESSAGEPORT') {
    what = 'MessagePort';
  }
  const frames = callerFrames(r.at.stack, 8)
    .filter((f) => !RUNNER_FRAMES.test(f))
    .slice(0, 3);
  return frames.length ? `${what}, created ${frames.join(' <- ')}` : what;
}

export interface LeakCheckOptions {
  /** Where the report goes (default: TAP comments on stdout and the same lines on stderr). */
  report?: (lines: string[]) => void;
  /** Seconds to wait after tap's root test completed before reporting what keeps the process alive. */
  graceSeconds?: number;
}

/**
 * Tracks resources from now on; `check()` lists what was opened since and is still open.
 * Only one per process is meaningful (async_hooks and fs are process-wide).
 */
export class LeakTracker {
  readonly #baseFds = new Map<number, string>();
  readonly #baseChildren = new Set<number>();
  readonly #live = new Map<number, TrackedResource>();
  readonly #tmpDirs = new Set<string>();
  readonly #hook;
  /** Resources that are process-wide by design; see exempt(). */
  readonly #exempt = new WeakSet<object>();

  constructor() {
    for (const { fd, target } of openFds()) this.#baseFds.set(fd, target);
    for (const c of childProcesses()) this.#baseChildren.add(c.pid);
    const live = this.#live;
    this.#hook = createHook({
      init(asyncId, type, _triggerId, resource) {
        if (!TRACKED_TYPES.has(type)) return;
        const at: { stack?: string } = {};
        const limit = Error.stackTraceLimit;
        Error.stackTraceLimit = 14; // async_hooks and timers take the first five frames
        Error.captureStackTrace(at);
        Error.stackTraceLimit = limit;
        live.set(asyncId, { type, ref: new WeakRef(resource as object), at });
      },
      destroy(asyncId) {
        live.delete(asyncId);
      },
    });
    this.#hook.enable();
    this.#watchMkdtemp();
  }

  /** Never report this object (a process-wide resource whose owner keeps it on purpose). */
  exempt(resource: object | undefined | null): void {
    if (resource) this.#exempt.add(resource);
  }

  disable(): void {
    this.#hook.disable();
  }

  /** Records the directories made by mkdtemp under the system temp dir (fs, fs/promises, callbacks). */
  #watchMkdtemp(): void {
    const tmp = path.resolve(os.tmpdir());
    const note = (dir: unknown) => {
      if (typeof dir === 'string' && path.resolve(dir).startsWith(tmp + path.sep)) this.#tmpDirs.add(path.resolve(dir));
    };
    const mkdtempSync = fs.mkdtempSync;
    const mkdtemp = fs.mkdtemp;
    const mkdtempP = fsp.mkdtemp;
    fs.mkdtempSync = function (this: unknown, ...args: Parameters<typeof fs.mkdtempSync>) {
      const dir = mkdtempSync.apply(this, args);
      note(dir);
      return dir;
    } as typeof fs.mkdtempSync;
    fs.mkdtemp = function (this: unknown, ...args: unknown[]) {
      const cb = args[args.length - 1];
      if (typeof cb === 'function') {
        args[args.length - 1] = (err: unknown, dir: unknown) => {
          if (!err) note(dir);
          (cb as (e: unknown, d: unknown) => void)(err, dir);
        };
      }
      return (mkdtemp as (...a: unknown[]) => void).apply(this, args);
    } as typeof fs.mkdtemp;
    fsp.mkdtemp = async function (this: unknown, ...args: Parameters<typeof fsp.mkdtemp>) {
      const dir = await mkdtempP.apply(this, args);
      note(dir);
      return dir;
    } as typeof fsp.mkdtemp;
    // ESM named imports (`import { mkdtempSync } from 'node:fs'`) see the wrappers only after this.
    syncBuiltinESMExports();
  }

  /** Everything opened since the tracker started and still open now. */
  check(): Leak[] {
    const leaks: Leak[] = [];
    let workers = 0;
    /** fd -> the handle reported for it, so an fd line says what it is. */
    const fdOwners = new Map<number, string>();
    for (const r of this.#live.values()) {
      const obj = r.ref.deref();
      if (obj && this.#exempt.has(obj)) continue;
      // process.stdin/stdout/stderr, made on first use: not this file's to close.
      if ((r.type === 'TTYWRAP' || r.type === 'PIPEWRAP') && [0, 1, 2].includes((obj as { fd?: number } | undefined)?.fd ?? -1)) continue;
      if (madeByRunner(r)) continue;
      if (r.type === 'MESSAGEPORT') continue; // reported below through their worker, if any
      if (r.type === 'WORKER') workers++;
      const fd = (obj as { fd?: unknown } | undefined)?.fd;
      if (typeof fd === 'number' && fd >= 0) fdOwners.set(fd, r.type);
      leaks.push({ kind: r.type === 'WORKER' ? 'worker' : 'handle', message: `${describe(r)} still active after the test file ended` });
    }
    if (workers === 0) {
      // A MessagePort without a worker: a MessageChannel left open.
      for (const r of this.#live.values()) {
        if (r.type !== 'MESSAGEPORT') continue;
        const obj = r.ref.deref();
        if (obj && this.#exempt.has(obj)) continue;
        if (madeByRunner(r)) continue;
        leaks.push({ kind: 'handle', message: `${describe(r)} still open after the test file ended` });
      }
    }
    for (const { fd, target } of openFds()) {
      if (this.#baseFds.get(fd) === target || ALLOWED.fdTarget.test(target)) continue;
      // A worker thread holds its own event loop (eventpoll, eventfd, pipes): the worker is named.
      if (workers > 0 && (target.startsWith('anon_inode:') || target.startsWith('pipe:'))) continue;
      const owner = fdOwners.get(fd);
      leaks.push({ kind: 'fd', message: `fd ${fd} -> ${target}${owner ? ` (the ${owner} above)` : ''} still open after the test file ended` });
    }
    for (const c of childProcesses()) {
      if (this.#baseChildren.has(c.pid) || c.state === 'Z') continue;
      leaks.push({ kind: 'child', message: `child process ${c.pid} (${c.cmdline.slice(0, 200)}) still running after the test file ended` });
    }
    for (const dir of this.#tmpDirs) {
      if (fs.existsSync(dir)) leaks.push({ kind: 'tmpdir', message: `temporary directory ${dir} (made with mkdtemp) still exists after the test file ended` });
    }
    return leaks;
  }
}

const TAP_ROOT = Symbol.for('TAP private constructor');

interface TapRoot {
  timer?: object;
  results?: { ok: boolean };
  on(ev: 'complete', fn: () => void): void;
}

function defaultReport(lines: string[]): void {
  const text = lines.map((l) => `leak-check: ${l}\n`).join('');
  // TAP comments land in the failing file's block of the runner's output; stderr shows them
  // with any reporter.
  try {
    fs.writeSync(1, lines.map((l) => `# leak-check: ${l}\n`).join(''));
  } catch {
    /* stdout closed */
  }
  try {
    fs.writeSync(2, text);
  } catch {
    /* stderr closed */
  }
}

let installed: LeakTracker | undefined;

/**
 * Starts tracking and checks when the process ends. Does nothing in worker threads, in child
 * processes that inherited the flag (only the process that installed first checks), or with
 * SHEAR_LEAK_CHECK=0.
 */
export function installLeakCheck(opts: LeakCheckOptions = {}): LeakTracker | undefined {
  if (installed || !isMainThread || process.env['SHEAR_LEAK_CHECK'] === '0') return installed;
  const owner = process.env['SHEAR_LEAK_CHECK_OWNER'];
  if (owner && owner !== String(process.pid)) return undefined;
  process.env['SHEAR_LEAK_CHECK_OWNER'] = String(process.pid);
  const tracker = (installed = new LeakTracker());
  const report = opts.report ?? defaultReport;
  const graceSeconds = opts.graceSeconds ?? (Number(process.env['SHEAR_LEAK_CHECK_GRACE_S']) || 10);
  let done = false;
  let root: TapRoot | undefined;

  const run = (why: string, alreadyFailing: boolean): boolean => {
    done = true;
    if (root?.timer) tracker.exempt(root.timer); // tap's own per-file timeout, never cleared
    const leaks = tracker.check();
    if (leaks.length === 0) return false;
    const head = `${leaks.length} resource(s) left open ${why}${alreadyFailing ? ' (the file already failed; these may follow from that failure)' : ''}:`;
    report([head, ...leaks.map((l) => `  ${l.message}`)]);
    return true;
  };

  // tap stores its root test in a global when a test file first imports it: watch for that, to
  // know when the file's tests (and their teardowns) are over.
  const g = globalThis as Record<symbol, unknown>;
  if (!(TAP_ROOT in g)) {
    Object.defineProperty(g, TAP_ROOT, {
      configurable: true,
      enumerable: false,
      get: () => root,
      set: (v: TapRoot) => {
        root = v;
        v.on('complete', () => {
          // The root completes after its teardowns; when the file used t.teardown at the top
          // level that is when it went idle, so something still holding the event loop after a
          // grace period is a leak that would otherwise hang until tap's timeout.
          const grace = setTimeout(() => {
            if (done) return;
            if (run(`${graceSeconds} s after the test file's last test ended (they keep the process from exiting)`, false)) process.exit(1);
          }, graceSeconds * 1000);
          grace.unref();
          tracker.exempt(grace);
        });
      },
    });
  }

  process.on('exit', (code) => {
    if (done) return;
    // A file that tap did not finish (timeout, bail out, crash) is reported by tap already.
    if (root && !root.results) return;
    const failing = code !== 0 || (process.exitCode !== undefined && process.exitCode !== 0) || root?.results?.ok === false;
    if (run('after the test file ended', failing)) process.exitCode = 1;
  });
  return tracker;
}
