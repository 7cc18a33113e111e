// Which copier a VM test uses: `shear pull` (the command under test), or the stand-in when
// SHEAR_VM_COPIER=stand-in asks for it (to tell a harness problem from a shear pull problem).
import { existsSync } from 'node:fs';
import path from 'node:path';
import { SHEAR_BIN, shear } from './cli.js';
import { standInCopier, type Copier } from './vm-pull.js';

/** The built `shear pull` (tests under test/ run the built CLI: npx tsc -b first). */
const PULL_JS = path.join(path.dirname(SHEAR_BIN), 'commands', 'pull.js');

export const shearPullCopier: Copier = {
  name: 'shear pull',
  async pull(req) {
    const args = ['pull', '--source', req.url, '--target', req.target, '--target-format', 'qcow2', '--json'];
    if (req.bitmap) args.push('--bitmap', req.bitmap, '--backing', req.backing ?? '');
    if (req.trim) args.push('--trim');
    if (req.diskId) args.push('--disk-id', req.diskId);
    const r = await shear(args);
    if (r.code !== 0) throw new Error(`shear ${args.join(' ')} exited ${r.code ?? r.signal}: ${r.stderr.trim()}`);
    const summary = JSON.parse(r.stdout) as { copiedBytes: number; trimmedBytes: number };
    return { copiedBytes: summary.copiedBytes, trimmedBytes: summary.trimmedBytes };
  },
};

interface Reporter {
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  comment(...args: any[]): unknown;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  fail(...args: any[]): unknown;
}

/** shear pull, unless SHEAR_VM_COPIER=stand-in; a test fails when the built CLI has no pull. */
export function vmCopier(t: Reporter): Copier {
  if (process.env['SHEAR_VM_COPIER'] === 'stand-in') {
    t.comment('SHEAR_VM_COPIER=stand-in: backups are pulled with qemu-img/python3-libnbd, not shear pull');
    return standInCopier;
  }
  if (!existsSync(PULL_JS)) t.fail(`the built CLI has no pull command (${PULL_JS}); build with: npx tsc -b`);
  return shearPullCopier;
}
