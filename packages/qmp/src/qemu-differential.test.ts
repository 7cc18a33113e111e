import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { requireTools } from '@shear/testkit';
import { QmpServer } from './server.js';
import { toQmpJson } from './json-writer.js';
import { RawConn } from './raw-conn.fixture.js';

/**
 * The same inputs go to a real qemu-storage-daemon and to Shear; both must answer each with the
 * same sequence of replies: same kind (return/error), same error class, same id. The desc texts
 * may differ (QMP says clients must not parse them); differences are listed as comments.
 */

const SYNC = '{"execute":"query-version","id":"sync"}';

const BEFORE_NEGOTIATION = [
  '{"execute":"query-version"}',
  '{"execute":"nope","id":1}',
  '{"execute":"query-version","arguments":[],"id":2}',
  '{"exec-oob":"qmp_capabilities","id":0}',
  '{"execute":"qmp_capabilities","arguments":{"enable":["foo"]},"id":3}',
  '{"execute":"qmp_capabilities","arguments":{"enable":"oob"},"id":4}',
  '{"execute":"qmp_capabilities","arguments":{"enable":[1]},"id":5}',
  '{"execute":"qmp_capabilities","arguments":{"enable":null},"id":"n"}',
  '{"execute":"qmp_capabilities","arguments":{"x":1},"id":6}',
  '[1,2]',
  '{ "execute": }',
  '{"id":{"deep":[1,{"x":null}]}}',
  '{"execute":"qmp_capabilities","id":"neg"}',
];

const AFTER_NEGOTIATION = [
  '{"execute":"qmp_capabilities","id":9}',
  '{"execute":"qmp_capabilities","arguments":{"x":1},"id":10}',
  '{"execute":"query-version","id":"s"}',
  '{"execute":"query-version","id":{"a":[1,2.5,null,true]}}',
  '{"execute":"query-version","id":[1,"x"]}',
  '{"execute":"query-version","id":null}',
  '{"execute":"query-version","id":-1.5e3}',
  '{"execute":"query-version","id":0.1}',
  '{"execute":"query-version","id":false}',
  '{"execute":"query-version","id":12345678901234567890}',
  '{"execute":"query-version","id":-9223372036854775808}',
  '{"execute":"query-version","id":"\\u00e9\\u2603\\ud83d\\ude00"}',
  '{"execute":"query-version","id":"\u00c3\u00a9"}',
  "{'execute':'query-version','id':'sq\\'x'}",
  '{"execute":"query-version","id":1}{"execute":"query-version","id":2}\n{"execute":"query-version","id":3}',
  '[1,2]',
  '"str" ',
  'null ',
  '42 ',
  '{}',
  '{"id":5}',
  '{"execute":1,"id":6}',
  '{"execute":"query-version","foo":1,"id":7}',
  '{"execute":"query-version","exec-oob":"x","id":7.5}',
  '{"execute":"query-version","control":{},"id":8}',
  '{"foo":1,"id":"f"}',
  '{"arguments":[],"id":13}',
  '{"execute":"query-version","arguments":[],"id":14}',
  '{"execute":"query-version","arguments":null,"id":15}',
  '{"execute":"query-version","arguments":{"x":1},"id":16}',
  '{"execute":"query-commands","arguments":{"x":1},"id":17}',
  '{"execute":"nope","id":18}',
  '{"execute":"nope","arguments":[],"id":19}',
  '{"execute":"query-version","id":1,"id":2}',
  '{"a" 1}\n',
  '{1:2}\n',
  '{"a":1,}\n',
  '[1,]\n',
  '[1 2]\n',
  '{"a":1 "b":2}\n',
  ']\n',
  '}\n',
  '{"execute":"query-version","id":"x\u0001y"}\n',
  '{"execute":"query-version","id":"\\x"}\n',
  '{"execute":"query-version","id":"\\u12"}\n',
  '{"execute":"query-version","id":"\\ud800"}\n',
  '{"execute":"query-version","id":"\\ufffe"}\n',
  '{"execute":"query-version","id":"\\u0000"}\n',
  '{"execute":"query-version","id":"\u00c3"}\n',
  '{"execute":"query-version","id":"\u00c0\u0080"}\n',
  '{"execute":"query-version","id":"\u00ed\u00a0\u0080"}\n',
  '{"execute":"query-version","id":"\u00ef\u00bf\u00be"}\n',
  '{"execute":"query-version","id":"\u00f0\u009f\u0098\u0080"}\n',
  '{"execute":"query-version","id":[0e1]}',
  '{"execute":"query-version","id":[-0, 1E+2, 1e-2, -5, 0.5E-3]}',
  '01\n',
  '-\n1.\n1e\n',
  '%d\n',
  'truex\n',
  'tru\n',
  '\u0001{"execute":"query-version","id":"c1"}',
  '@ "abc" 123 , : x{"execute":"query-version","id":"at"}',
  '@ "abc" 123\t\n{"execute":"query-version","id":"tab"}',
  '\u00ff{"execute":"query-version","id":"ff"}',
  '\u00ef\u00bb\u00bf{"execute":"query-version","id":"bom"}',
  '{"execute":"query-version","id":1\u0004',
  '{"execute":"query-version","id":1 {"execute":"query-version","id":5} }',
  `${'['.repeat(1024)}${']'.repeat(1024)}\n`,
  `${'['.repeat(1025)}\n]]]\n`,
  `{"execute":"query-version","id":${'['.repeat(1023)}${']'.repeat(1023)}}`,
];

interface Reply {
  kind: 'return' | 'error' | 'event' | 'other';
  class?: string;
  id?: string;
  desc?: string;
}

function summarise(msg: Record<string, unknown>): Reply {
  const id = Object.hasOwn(msg, 'id') ? { id: toQmpJson(msg['id']) } : {};
  if (Object.hasOwn(msg, 'return')) return { kind: 'return', ...id };
  const error = msg['error'] as { class: string; desc: string } | undefined;
  if (error) return { kind: 'error', class: error.class, desc: error.desc, ...id };
  return { kind: typeof msg['event'] === 'string' ? 'event' : 'other' };
}

/** Sends each input followed by a sync command; returns the replies to each input. */
async function transcript(path: string, inputs: string[][]): Promise<Reply[][]> {
  const conn = await RawConn.connect(path);
  try {
    await conn.nextLine();
    const out: Reply[][] = [];
    for (const input of inputs.flat()) {
      conn.send(input);
      conn.send(SYNC);
      const msgs = await conn.until((m) => m['id'] === 'sync');
      out.push(msgs.slice(0, -1).map(summarise));
    }
    return out;
  } finally {
    await conn.close();
  }
}

async function startQemu(t: Test, dir: string): Promise<string> {
  const path = join(dir, 'qsd.sock');
  const child = spawn(
    'qemu-storage-daemon',
    ['--chardev', `socket,path=${path},server=on,wait=off,id=m`, '--monitor', 'chardev=m'],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  t.teardown(async () => {
    child.kill('SIGTERM');
    await exited;
  });
  // Wait for the monitor socket (polling for readiness, not for an outcome).
  for (let i = 0; ; i++) {
    try {
      const c = await RawConn.connect(path);
      await c.close();
      return path;
    } catch (err) {
      if (i > 250 || child.exitCode !== null) throw new Error(`qemu-storage-daemon did not start: ${stderr || String(err)}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

t.test('qemu-storage-daemon and Shear answer malformed and edge inputs with the same classes', async (t) => {
  if (!requireTools(t, 'qemu-storage-daemon')) return;
  const dir = mkdtempSync(join(tmpdir(), 'qmp-diff-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const qemuPath = await startQemu(t, dir);
  const server = new QmpServer({ path: join(dir, 'shear.sock') });
  await server.listen();
  t.teardown(() => server.close());

  const inputs = [BEFORE_NEGOTIATION, AFTER_NEGOTIATION];
  const qemu = await transcript(qemuPath, inputs);
  const shear = await transcript(server.path as string, inputs);
  const flat = inputs.flat();
  const descDiffs: string[] = [];
  flat.forEach((input, i) => {
    const q = qemu[i] ?? [];
    const s = shear[i] ?? [];
    const shape = (rs: Reply[]): Array<Omit<Reply, 'desc'>> => rs.map(({ desc: _desc, ...rest }) => rest);
    t.same(shape(s), shape(q), `same replies to ${JSON.stringify(input.length > 80 ? `${input.slice(0, 80)}...` : input)}`);
    q.forEach((r, k) => {
      if (r.desc !== s[k]?.desc) descDiffs.push(`${JSON.stringify(input.slice(0, 60))}: qemu ${JSON.stringify(r.desc)} / shear ${JSON.stringify(s[k]?.desc)}`);
    });
  });
  t.ok(qemu.flat().some((r) => r.kind === 'error') && qemu.flat().some((r) => r.kind === 'return'), 'the inputs exercise both outcomes');
  for (const d of descDiffs) t.comment(`desc differs: ${d}`);
});
