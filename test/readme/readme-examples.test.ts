/**
 * The README, followed literally, against a real daemon, so that it cannot drift from Shear.
 *
 * Every ```console block of README.md is a session, run in an empty temporary directory with the
 * workspace's node_modules/.bin first on PATH (as the README's "Running shear" says):
 *   - `$ COMMAND` (a trailing `\` continues it on the next line; `# comment` is the shell's) runs
 *     with bash and must exit 0; `$ COMMAND &` starts it in the background (the daemon). The
 *     lines under a `$` line are its expected stdout, matched in order against its lines (others
 *     may come between): `...` inside a line is any text, runs of blanks are any blanks, and a line
 *     that is only `...` says "more output here" and is not checked.
 *   - `-> {"execute": ..., "arguments": ...}` (continued on indented lines until the JSON is
 *     whole) or the short form `-> name {args}` is sent to the QMP socket of the session's
 *     `shear daemon --qmp unix:PATH`, connected at the first `->` or `<-` line.
 *   - `<- ...` lines after a `->` are what must come back: a `return` or `error` is matched with
 *     that command's reply, an event with the events that arrived since it was sent (waited for,
 *     in any order); `<-` lines before the first `->` are matched with the greeting. A `->` with
 *     no `<- {"return"...}` or `<- {"error"...}` must still succeed. Matching is on the fields
 *     shown: `, ...}` leaves out the other fields, `"key": ...` matches any value; arrays match
 *     element by element.
 *   - Indented `   ... text ...` lines are narration.
 * A session that ends with the daemon running sends it `quit`; the daemon must exit 0.
 *
 * It also checks that the option lists of `shear help`, `shear help backup|daemon|jobs|restore|verify` and the
 * README's lists under "The command line" name the same options with the same argument (so a
 * new option needs a README line; its description is free), and that `npx shear --help` runs
 * from the repository root.
 */
import t, { type Test } from 'tap';
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { QmpClient, QmpCommandError, type QmpEvent } from '@shear/qmp';
import { requireTools } from '@shear/testkit';
import { SHEAR_BIN, childEnv } from '../lib/cli.js';
import { matches, outputMatches, readSessions, type Expected, type Session } from './session.js';

const run = promisify(execFile);
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const README = readFileSync(path.join(ROOT, 'README.md'), 'utf8');
const STEP_TIMEOUT_MS = 120_000;

interface Daemon {
  proc: ChildProcess;
  output: () => string;
  exited: Promise<number | null>;
  socket: string;
}

/** Waits until `pred` holds for an event received at index `from` or later. */
function waitForEvent(events: QmpEvent[], client: QmpClient, from: number, pred: (e: QmpEvent) => boolean): Promise<QmpEvent> {
  const seen = events.slice(from).find(pred);
  if (seen) return Promise.resolve(seen);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      client.off('event', on);
      reject(new Error(`no such event within ${STEP_TIMEOUT_MS} ms`));
    }, STEP_TIMEOUT_MS);
    const on = (e: QmpEvent) => {
      if (!pred(e)) return;
      clearTimeout(timer);
      client.off('event', on);
      resolve(e);
    };
    client.on('event', on);
  });
}

function describe(e: Expected): string {
  return `README.md:${e.line}: <- ${e.text}`;
}

async function runSession(t: Test, session: Session): Promise<void> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'shear-readme-'));
  const env = { ...childEnv(), PATH: `${path.join(ROOT, 'node_modules', '.bin')}:${process.env['PATH']}` };
  let daemon: Daemon | undefined;
  let client: QmpClient | undefined;
  const events: QmpEvent[] = [];
  let quitSent = false;
  t.teardown(async () => {
    await client?.close();
    if (daemon && daemon.proc.exitCode === null && daemon.proc.signalCode === null) {
      daemon.proc.kill('SIGKILL');
      await daemon.exited;
    }
    rmSync(dir, { recursive: true, force: true });
  });

  const connect = async (): Promise<QmpClient> => {
    if (client) return client;
    if (!daemon) throw new Error('a QMP line before any "$ shear daemon --qmp unix:PATH ... &"');
    const socket = path.resolve(dir, daemon.socket);
    while (!existsSync(socket)) {
      if (daemon.proc.exitCode !== null) throw new Error(`the daemon exited ${daemon.proc.exitCode}: ${daemon.output()}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    client = await QmpClient.connect(socket, { negotiate: false });
    client.on('event', (e: QmpEvent) => events.push(e));
    for (const e of session.greeting) t.ok(matches(client.greeting, e.value), describe(e), { found: client.greeting });
    return client;
  };

  for (const step of session.steps) {
    if (step.kind === 'shell') {
      const where = `README.md:${step.line}: $ ${step.command}${step.background ? ' &' : ''}`;
      if (step.background) {
        const proc = spawn('bash', ['-c', `exec ${step.command}`], { cwd: dir, env, stdio: ['ignore', 'pipe', 'pipe'] });
        let output = '';
        proc.stdout!.on('data', (d) => (output += d));
        proc.stderr!.on('data', (d) => (output += d));
        const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
        const qmp = /--qmp\s+unix:(\S+)/.exec(step.command);
        if (qmp) daemon = { proc, output: () => output, exited, socket: qmp[1]! };
        else t.fail(`${where}: only the daemon runs in the background here`);
        continue;
      }
      let out: { stdout: string; stderr: string };
      try {
        out = await run('bash', ['-c', step.command], { cwd: dir, env, timeout: STEP_TIMEOUT_MS, maxBuffer: 16 * 2 ** 20 });
      } catch (err) {
        const e = err as { code?: number; stdout?: string; stderr?: string };
        t.fail(`${where}: exited ${e.code}`, { stdout: e.stdout, stderr: e.stderr });
        return;
      }
      const missing = outputMatches(out.stdout, step.expect);
      t.equal(missing, undefined, `${where}: prints what the README shows`, { stdout: out.stdout, stderr: out.stderr });
      continue;
    }
    const where = `README.md:${step.line}: -> ${step.text}`;
    const qmp = await connect();
    const from = events.length;
    let reply: { return: unknown } | { error: { class: string; desc: string } };
    try {
      reply = { return: await qmp.execute(step.execute, step.args) };
    } catch (err) {
      if (!(err instanceof QmpCommandError)) throw err;
      reply = { error: { class: err.qmpClass, desc: err.desc } };
    }
    if (step.execute === 'quit') quitSent = true;
    const replies = step.expect.filter((e) => 'return' in e.value || 'error' in e.value);
    if (replies.length === 0) t.ok('return' in reply, `${where}: succeeds`, { reply });
    for (const e of replies) t.ok(matches(reply, e.value), describe(e), { found: reply });
    for (const e of step.expect.filter((x) => 'event' in x.value)) {
      const found = await waitForEvent(events, qmp, from, (ev) => matches(ev, e.value)).catch((err: Error) => err);
      t.ok(!(found instanceof Error), describe(e), found instanceof Error ? { error: found.message, events: events.slice(from) } : {});
      if (found instanceof Error) return;
    }
    if (t.passing() === false) return;
  }

  if (daemon) {
    if (!quitSent) await (await connect()).execute('quit');
    const code = await daemon.exited;
    t.equal(code, 0, 'the daemon exits 0 after quit', { output: daemon.output() });
  }
}

const sessions = readSessions(README);

t.test('the README has its example sessions', async (t) => {
  t.ok(sessions.length >= 3, `${sessions.length} console blocks`);
  t.ok(sessions.some((s) => s.steps.some((x) => x.kind === 'send')), 'with QMP sessions');
});

for (const session of sessions) {
  t.test(`README.md:${session.line}: the session under "${session.title}"`, async (t) => {
    const tools = ['qemu-img', 'qemu-io', 'nbdinfo', 'nbdcopy'].filter((tool) => session.steps.some((s) => s.kind === 'shell' && new RegExp(`(^|[|;&]\\s*)${tool}\\b`).test(s.command)));
    if (!requireTools(t, ...tools)) return;
    await runSession(t, session);
  });
}

/** Options of a usage text or a README list: `--name` with its argument word, if any. */
function options(text: string, indent: RegExp): Map<string, string> {
  const found = new Map<string, string>();
  for (const line of text.split('\n')) {
    const m = new RegExp(`${indent.source}(--[\\w-]+)(?: ([^\\s-][^\\s]*))?`).exec(line);
    if (m) found.set(m[1]!, m[2] ?? '');
  }
  return found;
}

/** The first fenced block after a heading line that matches `heading`. */
function blockAfter(heading: RegExp): string {
  const lines = README.split('\n');
  const at = lines.findIndex((l) => /^#+ /.test(l) && heading.test(l));
  if (at < 0) return '';
  const open = lines.findIndex((l, i) => i > at && l.startsWith('```'));
  const close = lines.findIndex((l, i) => i > open && l.startsWith('```'));
  if (lines.slice(at + 1, open).some((l) => /^#+ /.test(l))) return '';
  return lines.slice(open + 1, close).join('\n');
}

async function help(...args: string[]): Promise<string> {
  return (await run(process.execPath, [SHEAR_BIN, 'help', ...args])).stdout;
}

function sameOptions(t: Test, what: string, fromHelp: Map<string, string>, fromReadme: Map<string, string>): void {
  for (const [name, arg] of fromHelp) {
    t.ok(fromReadme.has(name), `${what}: ${name} is in the README's list`);
    if (fromReadme.has(name)) t.equal(fromReadme.get(name), arg, `${what}: ${name} takes the same argument in both`);
  }
  for (const name of fromReadme.keys()) t.ok(fromHelp.has(name), `${what}: the README's ${name} is in shear help`);
}

t.test("the README's option lists are shear help's", async (t) => {
  for (const command of ['backup', 'pull', 'daemon', 'jobs', 'restore', 'verify']) {
    const list = blockAfter(new RegExp(`^### \`shear ${command}\``));
    t.ok(list, `the README has a list under "### \`shear ${command}\`"`);
    sameOptions(t, `shear ${command}`, options(await help(command), /^ {2}/), options(list, /^/));
  }
  // The top level: `shear COMMAND` lines and `shear --OPTION` lines of "The command line".
  const usage = await help();
  const overview = blockAfter(/^## The command line/);
  const commandsOf = (text: string, re: RegExp) => new Set([...text.matchAll(re)].map((m) => m[1]!));
  const helpCommands = commandsOf(usage.slice(usage.indexOf('commands:'), usage.indexOf('\n\n', usage.indexOf('commands:'))), /^ {2}([a-z][\w-]*)\s/gm);
  const readmeCommands = commandsOf(overview, /^shear ([a-z][\w-]*)/gm);
  t.same([...readmeCommands].sort(), [...helpCommands].sort(), 'the same commands in shear help and the README');
  sameOptions(t, 'shear', options(usage, /^ {2}/), options(overview, /^shear /));
});

t.test('npx shear --help works from the repository root', async (t) => {
  const { stdout } = await run('npx', ['--no-install', 'shear', '--help'], { cwd: ROOT });
  t.match(stdout, /^usage: shear <command>/, 'npx finds the workspace bin');
});

