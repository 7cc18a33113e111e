// The copier of the VM tests: pulls a fleecing export into a backup chain of qcow2 files (a full
// backup, then overlays holding only the dirty extents, each backed by the previous backup).
// `shear pull` is the copier under test; the stand-in (qemu-img convert for a full backup, a
// python3-libnbd loop over the exported dirty bitmap for an incremental) is what the harness was
// proven with, and what the tests compare shear pull's chains against.
import { execFile } from 'node:child_process';
import { readFile, rm } from 'node:fs/promises';
import { promisify } from 'node:util';
import path from 'node:path';
import { LIBNBD_PYTHON } from '@shear/testkit';

const run = promisify(execFile);

export interface PullRequest {
  /** nbd+unix:///EXPORT?socket=PATH */
  url: string;
  target: string;
  /** For an incremental: the exported bitmap and the previous backup of the chain. */
  bitmap?: string | undefined;
  backing?: string | undefined;
  /** TRIM what was copied on the export (shear pull --trim; the stand-in does not trim). */
  trim?: boolean | undefined;
  /** The disk's identity across the chain (shear pull --disk-id). */
  diskId?: string | undefined;
}

export interface PullOutcome {
  /** Bytes the copier read from the export and wrote (the dirty extents' total for an incremental). */
  copiedBytes: number;
  /** Bytes the copier trimmed on the export (undefined: it cannot trim). */
  trimmedBytes?: number;
}

export interface Copier {
  readonly name: string;
  pull(req: PullRequest): Promise<PullOutcome>;
}

/** `nbd+unix:///NAME?socket=PATH` */
export function nbdUnixUrl(exportName: string, socket: string): string {
  return `nbd+unix:///${exportName}?socket=${socket}`;
}

/**
 * Copies the extents `qemu:dirty-bitmap:NAME` reports dirty from the export into a qcow2 overlay,
 * which libnbd opens through qemu-nbd started by socket activation (so that the overlay is written
 * by QEMU's own qcow2 driver and the chain stays plain qcow2). Prints {"copied": N}.
 */
const INCREMENTAL = `
import nbd, sys, json
src = nbd.NBD(); src.add_meta_context("qemu:dirty-bitmap:" + sys.argv[2]); src.connect_uri(sys.argv[1])
if not src.can_meta_context("qemu:dirty-bitmap:" + sys.argv[2]):
    sys.exit("the export has no bitmap " + sys.argv[2])
size = src.get_size(); extents = []; state = {"end": 0}
def cb(ctx, offset, entries, err):
    pos = offset
    for i in range(0, len(entries), 2):
        if entries[i + 1] & 1:
            if extents and extents[-1][0] + extents[-1][1] == pos: extents[-1][1] += entries[i]
            else: extents.append([pos, entries[i]])
        pos += entries[i]
    state["end"] = pos
off = 0
while off < size:
    src.block_status(min(size - off, 1 << 30), off, cb)
    off = state["end"]
dst = nbd.NBD(); dst.connect_systemd_socket_activation(["qemu-nbd", "-f", "qcow2", sys.argv[3]])
copied = 0
for (o, n) in extents:
    p = o
    while p < o + n:
        k = min(o + n - p, 4 << 20)
        dst.pwrite(src.pread(k, p), p); p += k; copied += k
dst.flush(); dst.shutdown(); src.shutdown()
print(json.dumps({"copied": copied}))
`;

/** The stand-in copier: QEMU's and libnbd's own tools. */
export const standInCopier: Copier = {
  name: 'stand-in (qemu-img convert / python3-libnbd)',
  async pull(req) {
    if (!req.bitmap) {
      await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', req.url, req.target]);
      const { stdout } = await run('qemu-img', ['map', '--output=json', '-f', 'qcow2', req.target]);
      const map = JSON.parse(stdout) as { length: number; data: boolean }[];
      return { copiedBytes: map.filter((e) => e.data).reduce((a, e) => a + e.length, 0) };
    }
    if (!req.backing) throw new Error('an incremental pull needs the previous backup');
    const backing = path.dirname(req.backing) === path.dirname(req.target) ? path.basename(req.backing) : req.backing;
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', backing, '-F', 'qcow2', req.target], { cwd: path.dirname(req.target) });
    const { stdout } = await run(LIBNBD_PYTHON, ['-c', INCREMENTAL, req.url, req.bitmap, req.target], { maxBuffer: 1 << 20 });
    return { copiedBytes: (JSON.parse(stdout) as { copied: number }).copied };
  },
};

/** The disk as a chain (or a single image) reads, as raw bytes: qemu-img is the reader. */
export async function readImage(image: string, scratch: string, opts: { shareLock?: boolean } = {}): Promise<Buffer> {
  await run('qemu-img', ['convert', ...(opts.shareLock ? ['-U'] : []), '-O', 'raw', image, scratch]);
  try {
    return await readFile(scratch);
  } finally {
    await rm(scratch, { force: true });
  }
}

/** Bytes allocated in this image itself (not its backing chain), from qemu-img map. */
export async function allocatedInTop(image: string): Promise<number> {
  const { stdout } = await run('qemu-img', ['map', '--output=json', image]);
  const map = JSON.parse(stdout) as { length: number; depth: number; data: boolean; zero: boolean }[];
  return map.filter((e) => e.depth === 0 && (e.data || e.zero)).reduce((a, e) => a + e.length, 0);
}
