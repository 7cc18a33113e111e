import t from 'tap';
import { existsSync } from 'node:fs';
import { requireTools } from '@shear/testkit';
import { makeDisk, serve } from './setup.fixture.js';
import { PYTHON, run } from './tools.fixture.js';

/**
 * The research prober (research/nbd-tools/probe.py, 55 malformed and edge-case exchanges, run
 * before against qemu-nbd, nbdkit and nbd-server) against our server, each line checked against
 * the "we should" column of the checklist's robustness table.
 */

// shared/ sits beside the repository (on developer machines and in CI).
const PROBE = [new URL('../../../../shared/research/nbd-tools/probe.py', import.meta.url).pathname, '/work/shared/research/nbd-tools/probe.py'].find((p) => existsSync(p)) ?? 'shared/research/nbd-tools/probe.py';

const EXPECT: Record<string, RegExp> = {
  H01: /server closed connection/,
  H02: /server closed connection|ERR_INVALID/,
  H03: /flags=0xd6d \+ 124 zero bytes=True/,
  H04: /server closed connection/,
  H05: /^ERR_UNSUP.*then LIST -> SERVER\(disk\) ACK$/,
  H06: /server closed connection/,
  H07: /^ERR_INVALID/,
  H08: /^ERR_POLICY.*then LIST -> SERVER\(disk\) ACK$/,
  H09: /^ERR_UNKNOWN\("export 'nosuchx' not present"\) \| retry GO ok size=4194304$/,
  H10: /^ERR_INVALID/,
  H11: /^ERR_INVALID/,
  H12: /^ERR_UNKNOWN/,
  H13: /^ACK then (ACK|ERR_INVALID)/,
  H14: /^ERR_INVALID/,
  H15: /^ACK then connection closed$/,
  H16: /server closed connection/,
  H17: /zeroes=True$/,
  H18: /\['base:'\]=>META_CONTEXT\(0:base:allocation\) ACK ; \['qemu:'\]=>ACK ; .*\['x-foo:bar'\]=>ACK ; \['base:nosuch'\]=>ACK ; \['nocolon'\]=>ACK ; \[\]=>META_CONTEXT\(0:base:allocation\) ACK$/,
  H19: /^ACK$/,
  H20: /SERVER\(disk\) ACK$/,
  H21: /^INFO\(BLOCK_SIZE\) INFO\(EXPORT\) ACK$/,
  H22: /^ERR_INVALID/,
  H23: /identical=True$/,
  H24: /size=4194304 flags=0xd6d$/,
  // Bytes after GO are read as a request; an option header is 16 of the 28 bytes, so the server waits.
  H25: /TIMEOUT|server closed/,
  T01: /server closed connection/,
  T02: /ERROR\(EINVAL .*then READ -> chunks OFFSET_DATA\(off=0,len=512\)$/,
  T03: /ERROR\(EINVAL/,
  T04: /ERROR\(EINVAL/,
  T05: /ERROR\(EINVAL/,
  T06: /ERROR\(ENOSPC .*then READ -> chunks OFFSET_DATA/,
  T07: /^simple OK \| then READ -> chunks OFFSET_DATA\(off=0,len=4096\)$/,
  T08: /^simple OK$/,
  T09: /^simple OK \| FAST_ZERO -> simple OK$/,
  T10: /^chunks NONE$/,
  T11: /^simple OK$/,
  T12: /ERROR\(EINVAL/,
  T13: /ERROR\(EINVAL .*then READ -> chunks OFFSET_DATA\(off=0,len=512\)$/,
  T14: /ERROR\(EINVAL|closed/,
  T15: /^chunks OFFSET_DATA\(off=1,len=3\)$/,
  T16: /^simple OK$/,
  T17: /^DF: chunks OFFSET_DATA\(off=3145728,len=262144\) \| no DF: chunks OFFSET_DATA\(off=3145728,len=65536\), OFFSET_HOLE\(off=3211264,len=196608\)$/,
  T18: /^chunks OFFSET_DATA\(off=0,len=512\)$/,
  T19: /ERROR\(EINVAL/,
  T20: /^REQ_ONE: chunks BLOCK_STATUS\(ctx=0 \[\(131072, 0\)\]\) \| beyond end: chunks ERROR\(EINVAL/,
  T21: /new connection READ -> chunks OFFSET_DATA/,
  T22: /^64\/64 answered ok$/,
  T23: /^outstanding READ answered: .*then closed$/,
  T24: /^simple OK$/,
  T25: /ERROR\(EINVAL/,
  T26: /^simple EINVAL \| READ ok -> simple OK$/,
  T27: /ERROR\(EINVAL/,
  T28: /ERROR\(ENOSPC/,
  T29: /cookie echoed=0xffffffffffffffff/,
  T30: /^20\/20 ok$/,
};

t.test('probe.py against our server: every row as the checklist says', async (t) => {
  if (!existsSync(PROBE)) {
    t.pass('probe.py not available', { skip: `${PROBE} is missing` });
    return;
  }
  if (!requireTools(t, PYTHON)) return;
  // Data in chunks 0, 1 and 48 (3 MiB) like the qemu image the prober was written for.
  const disk = await makeDisk(4 * 1024 * 1024, { dataChunks: [0, 1, 48] });
  const s = await serve(t, disk, { writable: true });
  if (s.address.type !== 'unix') return;
  const r = await run(PYTHON, [PROBE, `unix:${s.address.path}`, 'disk'], { timeoutMs: 60_000 });
  t.equal(r.code, 0, r.stderr);
  const lines = new Map<string, string>();
  for (const line of r.stdout.split('\n')) {
    const m = /^([HT]\d\d) .*? \| (.*)$/.exec(line);
    if (m) lines.set(m[1]!, m[2]!);
  }
  for (const [id, want] of Object.entries(EXPECT)) t.match(lines.get(id) ?? '(missing)', want, id);
  t.equal(s.server.listExports()[0]?.name, 'disk', 'the server is still serving');
});
