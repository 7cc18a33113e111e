/**
 * The backup chain behind `shear restore` and `shear verify` (docs/plans/pull-client.md): the
 * links from the last backup down to its full, read from the image headers before anything is
 * opened, and their manifests checked against each other. One walk serves both commands, so a
 * chain restore accepts is exactly a chain verify can check.
 */
import { access, open as openFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { ShearError } from '@shear/base';
import { peekQcow2Backing } from '@shear/blockdev';
import { manifestPathFor, readManifest, type BackupManifest } from '../backup-manifest.js';
import { statePathFor } from './pull-state.js';

const QCOW2_MAGIC = 0x514649fb;
/** The header cluster of any qcow2 image Shear or QEMU writes fits in this (the name is < 1 KiB). */
const HEAD_BYTES = 65536;

export interface ChainLink {
  /** The file, as opened (resolved against the referencing image's directory). */
  path: string;
  format: 'raw' | 'qcow2';
  /** Virtual size: the qcow2 header's, or a raw file's length. */
  size: number;
  /** The backing file name as stored in the header (null for a full). */
  backingName: string | null;
  backingFormat: string | null;
  /** Set by `loadManifests`. */
  manifest?: BackupManifest;
}

/** A chain, last backup first, its full last. */
export type Chain = ChainLink[];

async function readHead(file: string): Promise<Uint8Array> {
  const fh = await openFile(file, 'r');
  try {
    const head = new Uint8Array(HEAD_BYTES);
    const { bytesRead } = await fh.read(head, 0, HEAD_BYTES, 0);
    return head.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

async function describeLink(file: string): Promise<ChainLink> {
  const st = await stat(file);
  if (!st.isFile()) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot read backup "${file}": not a regular file`, { path: file });
  const head = await readHead(file);
  const isQcow2 = head.length >= 4 && new DataView(head.buffer, head.byteOffset, head.byteLength).getUint32(0) === QCOW2_MAGIC;
  if (!isQcow2) return { path: file, format: 'raw', size: st.size, backingName: null, backingFormat: null };
  if (head.length < 72) throw new ShearError('ERR_QCOW2_CORRUPT', `Cannot read backup "${file}": its qcow2 header is truncated`, { path: file });
  const { backingFile, backingFormat } = peekQcow2Backing(head);
  const size = Number(new DataView(head.buffer, head.byteOffset, head.byteLength).getBigUint64(24));
  return { path: file, format: 'qcow2', size, backingName: backingFile, backingFormat };
}

/**
 * Follows the backing file names from `last` down to the image without one. A file that is not
 * there is named, with the link that refers to it.
 * @throws ERR_FILE_NOT_FOUND (`last` itself), ERR_CHAIN_LINK_MISSING, ERR_CHAIN_BROKEN (a loop)
 */
export async function walkChain(last: string): Promise<Chain> {
  const chain: Chain = [];
  const seen = new Set<string>();
  let file = last;
  let referrer: ChainLink | undefined;
  for (;;) {
    let link: ChainLink;
    try {
      link = await describeLink(file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      if (!referrer) throw new ShearError('ERR_FILE_NOT_FOUND', `Cannot read backup "${file}": no such file`, { path: file }, { cause: err });
      throw new ShearError(
        'ERR_CHAIN_LINK_MISSING',
        `Cannot read the chain of "${last}": link "${file}" is missing (the backing file "${referrer.backingName}" of "${referrer.path}")`,
        { path: file },
        { cause: err },
      );
    }
    const key = path.resolve(file);
    if (seen.has(key)) throw new ShearError('ERR_CHAIN_BROKEN', `Cannot read the chain of "${last}": "${file}" is its own backing file (a loop)`, { path: file });
    seen.add(key);
    if (referrer && referrer.size !== link.size) {
      throw new ShearError('ERR_CHAIN_BROKEN', `Cannot read the chain of "${last}": "${referrer.path}" is ${referrer.size} bytes but its backing file "${file}" is ${link.size}`, { path: file });
    }
    chain.push(link);
    if (link.backingName === null) return chain;
    file = path.isAbsolute(link.backingName) ? link.backingName : path.join(path.dirname(file), link.backingName);
    referrer = link;
  }
}

async function exists(p: string): Promise<boolean> {
  return access(p).then(() => true, () => false);
}

/**
 * Reads every link's manifest. A link whose finalise was interrupted (the manifest's `.tmp` or a
 * pull state file beside it) is named as unfinished; a link without any is ERR_MANIFEST_NOT_FOUND.
 */
export async function loadManifests(chain: Chain): Promise<void> {
  for (const link of chain) {
    const file = manifestPathFor(link.path);
    if (!(await exists(file))) {
      const tmp = await exists(file + '.tmp');
      const state = await exists(statePathFor(link.path));
      if (tmp || state) {
        throw new ShearError(
          'ERR_CHAIN_UNFINISHED',
          `Cannot use backup "${link.path}": it is unfinished (${tmp ? `"${file}.tmp" is there but not "${file}": its finalise was interrupted` : `the pull state file "${statePathFor(link.path)}" is there: finish it with shear pull --resume`})`,
          { path: link.path },
        );
      }
    }
    link.manifest = await readManifest(link.path);
  }
}

/**
 * Every way the links' manifests disagree with the images and with each other (nothing is read
 * beyond the headers): each an ERR_CHAIN_BROKEN naming the link. Empty for a sound chain.
 */
export function chainProblems(chain: Chain): ShearError[] {
  const out: ShearError[] = [];
  const broken = (link: ChainLink, why: string): void => {
    out.push(new ShearError('ERR_CHAIN_BROKEN', `Broken chain at "${link.path}": ${why}`, { path: link.path }));
  };
  chain.forEach((link, i) => {
    const m = link.manifest;
    if (!m) return;
    const parent = chain[i + 1];
    if (m.image !== path.basename(link.path)) broken(link, `its manifest is for "${m.image}"`);
    if (m.imageFormat !== link.format) broken(link, `its manifest says ${m.imageFormat}, the file is ${link.format}`);
    if (m.disk.size !== link.size) broken(link, `its manifest says ${m.disk.size} bytes, the image is ${link.size}`);
    if (!parent) {
      if (m.parent) broken(link, `its manifest names parent "${m.parent.image}" but the image has no backing file`);
      return;
    }
    if (!m.parent) {
      broken(link, `its manifest is a full backup's but the image has backing file "${link.backingName}"`);
      return;
    }
    if (m.parent.image !== link.backingName) broken(link, `its manifest names parent "${m.parent.image}", the image's backing file is "${link.backingName}"`);
    const pm = parent.manifest;
    if (!pm) return;
    if (m.parent.sha256 !== pm.sha256) broken(link, `its parent "${parent.path}" is not the backup it was taken on (parent digest ${m.parent.sha256.slice(0, 12)}…, the parent's manifest has ${pm.sha256.slice(0, 12)}…)`);
    if (m.disk.identity !== pm.disk.identity) broken(link, `its disk "${m.disk.identity}" is not its parent's "${pm.disk.identity}"`);
  });
  return out;
}
