/**
 * The README's example sessions, read from its ```console blocks (the format is described in the
 * README's "Example sessions" section and in readme-examples.test.ts).
 */

export type Step =
  | { kind: 'shell'; line: number; command: string; background: boolean; expect: string[] }
  | { kind: 'send'; line: number; text: string; execute: string; args: Record<string, unknown> | undefined; expect: Expected[] };

export interface Expected {
  line: number;
  text: string;
  value: Record<string, unknown>;
}

export interface Session {
  /** The README heading the block is under. */
  title: string;
  line: number;
  /** The `<-` lines before the first `->`: the greeting. */
  greeting: Expected[];
  steps: Step[];
}

/** Stands for an elided value (`"key": ...`): matches anything. */
export const ANY = '\u0000any';

/** A `<-` line as a pattern: `, ...}` drops the other fields, `"key": ...` matches any value. */
export function parseExpected(text: string, line: number): Expected {
  const json = text
    .replace(/\{\s*\.\.\.\s*\}/g, '{}')
    .replace(/,\s*\.\.\.\s*(?=[}\]])/g, '')
    .replace(/:\s*\.\.\.(?=\s*[,}\]])/g, `: ${JSON.stringify(ANY)}`);
  try {
    return { line, text, value: JSON.parse(json) as Record<string, unknown> };
  } catch (err) {
    throw new Error(`README.md:${line}: cannot read "<- ${text}": ${(err as Error).message}`);
  }
}

/** Whether `actual` has every field of `expected` (recursively; arrays element by element). */
export function matches(actual: unknown, expected: unknown): boolean {
  if (expected === ANY) return true;
  if (Array.isArray(expected)) {
    return Array.isArray(actual) && actual.length === expected.length && expected.every((e, i) => matches(actual[i], e));
  }
  if (expected !== null && typeof expected === 'object') {
    if (actual === null || typeof actual !== 'object' || Array.isArray(actual)) return false;
    return Object.entries(expected).every(([k, v]) => k in actual && matches((actual as Record<string, unknown>)[k], v));
  }
  return actual === expected;
}

/** An expected output line as a regular expression: `...` is any text, runs of blanks any blanks. */
export function outputPattern(line: string): RegExp {
  const parts = line.trim().split('...').map((p) => p.split(/\s+/).map((w) => w.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')).join('\\s+'));
  return new RegExp(`^\\s*${parts.join('.*')}\\s*$`);
}

/** Whether every expected line matches a line of `output`, in order (other lines may come between). */
export function outputMatches(output: string, expect: string[]): string | undefined {
  const lines = output.split('\n');
  let at = 0;
  for (const e of expect) {
    const re = outputPattern(e);
    while (at < lines.length && !re.test(lines[at]!)) at++;
    if (at === lines.length) return e;
    at++;
  }
  return undefined;
}

function isBalanced(text: string): boolean {
  try {
    JSON.parse(text);
    return true;
  } catch {
    return false;
  }
}

function parseSend(text: string, line: number): Step {
  let execute: string;
  let args: Record<string, unknown> | undefined;
  try {
    if (text.startsWith('{')) {
      const msg = JSON.parse(text) as { execute?: unknown; arguments?: Record<string, unknown> };
      if (typeof msg.execute !== 'string') throw new Error('no "execute"');
      execute = msg.execute;
      args = msg.arguments;
    } else {
      const m = /^([\w-]+)\s*(.*)$/s.exec(text);
      if (!m) throw new Error('expected "name {args}"');
      execute = m[1]!;
      args = m[2] ? (JSON.parse(m[2]) as Record<string, unknown>) : undefined;
    }
  } catch (err) {
    throw new Error(`README.md:${line}: cannot read "-> ${text}": ${(err as Error).message}`);
  }
  return { kind: 'send', line, text, execute, args, expect: [] };
}

/** Strips a trailing shell comment that is not inside quotes (enough for the README's lines). */
function withoutComment(command: string): string {
  let quote = '';
  for (let i = 0; i < command.length; i++) {
    const ch = command[i]!;
    if (quote) {
      if (ch === quote) quote = '';
    } else if (ch === "'" || ch === '"') quote = ch;
    else if (ch === '#' && (i === 0 || /\s/.test(command[i - 1]!))) return command.slice(0, i).trimEnd();
  }
  return command.trimEnd();
}

/** Every ```console block of the README, as a session. */
export function readSessions(readme: string): Session[] {
  const lines = readme.split('\n');
  const sessions: Session[] = [];
  let title = '';
  for (let i = 0; i < lines.length; i++) {
    const heading = /^#+\s+(.*)$/.exec(lines[i]!);
    if (heading) title = heading[1]!;
    if (lines[i]!.trim() !== '```console') continue;
    const session: Session = { title, line: i + 1, greeting: [], steps: [] };
    let last: Step | undefined;
    for (i++; i < lines.length && lines[i]!.trim() !== '```'; i++) {
      const raw = lines[i]!;
      const n = i + 1;
      if (raw.trim() === '' || /^\s+\.\.\./.test(raw)) continue;
      if (raw.startsWith('$ ')) {
        let command = raw.slice(2);
        while (command.endsWith('\\') && i + 1 < lines.length) command = command.slice(0, -1) + ' ' + lines[++i]!.trim();
        command = withoutComment(command);
        const background = command.endsWith('&');
        last = { kind: 'shell', line: n, command: background ? command.slice(0, -1).trimEnd() : command, background, expect: [] };
        session.steps.push(last);
      } else if (raw.startsWith('-> ')) {
        let text = raw.slice(3).trim();
        const json = () => (text.startsWith('{') ? text : text.replace(/^[\w-]+\s*/, ''));
        while (json() !== '' && !isBalanced(json()) && i + 1 < lines.length && /^\s/.test(lines[i + 1]!)) text += ' ' + lines[++i]!.trim();
        last = parseSend(text, n);
        session.steps.push(last);
      } else if (raw.startsWith('<- ')) {
        const e = parseExpected(raw.slice(3).trim(), n);
        if (last?.kind === 'send') last.expect.push(e);
        else if (!last || last.kind === 'shell') session.greeting.push(e);
      } else if (last?.kind === 'shell') {
        if (raw.trim() !== '...') last.expect.push(raw);
      } else {
        throw new Error(`README.md:${n}: a line that is neither "$", "->", "<-" nor output of a "$" line: ${raw}`);
      }
    }
    sessions.push(session);
  }
  return sessions;
}
