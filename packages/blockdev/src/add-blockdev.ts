import { open } from 'node:fs/promises';
import path from 'node:path';
import { ArgReader, ShearError } from '@shear/base';
import {
  BlkdebugDriver,
  BlockGraph,
  BlockNode,
  FileDriver,
  NullDriver,
  RawFormatDriver,
  PERM_RESIZE,
  filterChildPerms,
  formatChildPerms,
  hasHostFile,
  type BlockIO,
  type ChildEdge,
  type ChildPermsFn,
  type DriverInfo,
} from '@shear/block';
import { Qcow2Image } from '@shear/qcow2';
import type { CopyWorkerPool } from '@shear/block-copy';
import { CBW_INFO, CopyBeforeWrite, FLEECING_CACHE_INFO, FleecingCache, SNAPSHOT_ACCESS_INFO, SnapshotAccess } from '@shear/fleecing';
import { NbdClientDriver, type NbdAddress } from '@shear/nbd';
import { qcow2Driver } from './qcow2-node.js';
import { attachBitmapStorage } from './persistent-bitmaps.js';

export interface BlockdevContext {
  /** When set, `file` nodes may only name files inside these directories. */
  allowedDirs?: readonly string[];
  /** Worker threads for the copy engine of copy-before-write nodes. */
  pool?: CopyWorkerPool;
  /** Events of nodes (fleecing cache state, copy-before-write failures), with the node's name added. */
  emit?: (event: string, data: Record<string, unknown>) => void;
}

/** QEMU's `raw` keeps others from resizing its file; otherwise a filter (role DATA|FILTERED). */
const rawChildPerms: ChildPermsFn = (role, parent, readOnly, parentCount) => {
  const p = filterChildPerms(role, parent, readOnly, parentCount);
  return { perm: p.perm, shared: p.shared & ~PERM_RESIZE };
};

const FILE_INFO: DriverInfo = { name: 'file', childPerms: filterChildPerms };
const NULL_INFO: DriverInfo = { name: 'null-co', childPerms: filterChildPerms };
const RAW_INFO: DriverInfo = { name: 'raw', childPerms: rawChildPerms, isFilter: true };
const BLKDEBUG_INFO: DriverInfo = { name: 'blkdebug', childPerms: filterChildPerms, isFilter: true };
const NBD_INFO: DriverInfo = { name: 'nbd', childPerms: filterChildPerms };

const QCOW2_MAGIC = 0x514649fb;
const NULL_DEFAULT_SIZE = 2 ** 30;

/**
 * Adds a node described by QEMU blockdev options (`blockdev-add`, `--blockdev`): children are
 * given inline as nested objects (they become nodes of their own, with generated names) or by
 * node-name. Supported drivers: file, null-co, raw, qcow2, blkdebug. All options are checked
 * before anything opens; if anything fails, every node this call created is removed again.
 * @throws ERR_INVALID_ARGUMENT for bad options, ERR_NOT_IMPLEMENTED for unknown drivers, and the drivers' own errors
 */
export async function addBlockdev(graph: BlockGraph, options: unknown, ctx: BlockdevContext = {}): Promise<BlockNode> {
  const created: BlockNode[] = [];
  try {
    return await add(graph, options, ctx, created, 'options');
  } catch (err) {
    for (const n of created.reverse()) await graph.removeNode(n.name).catch(() => {});
    throw err;
  }
}

async function add(graph: BlockGraph, options: unknown, ctx: BlockdevContext, created: BlockNode[], where: string): Promise<BlockNode> {
  const a = new ArgReader(options, where === 'options' ? '' : where);
  const driver = a.string('driver');
  const name = a.string('node-name', undefined);
  const readOnly = a.bool('read-only', false)!;
  // Accepted for compatibility; Shear's behaviour does not depend on them.
  a.ignore('discard', 'detect-zeroes', 'auto-read-only', 'force-share');
  const cache = a.object('cache', true);
  const direct = cache?.bool('direct', false) ?? false;
  cache?.ignore('no-flush');
  cache?.done();
  let added: BlockNode | undefined;
  const base = async (info: DriverInfo, open: (children: Map<string, ChildEdge>) => Promise<BlockIO>, children: { role: string; node: BlockNode }[] = []) => {
    a.done();
    return (added = await graph.addNode({ ...(name !== undefined ? { name } : {}), info, readOnly, children, open }));
  };
  // The driver opens before its node has a (generated) name; events name it when they happen.
  const emit = ctx.emit;
  const onEvent = emit ? { onEvent: (event: string, data: Record<string, unknown>) => emit(event, { node: added?.name ?? name, ...data }) } : {};
  const child = async (key: string, optional = false): Promise<BlockNode | undefined> => {
    const v = a.raw(key);
    if (v === undefined) {
      if (optional) return undefined;
      throw new ShearError('ERR_INVALID_ARGUMENT', `Parameter '${key}' is missing`);
    }
    if (typeof v === 'string') return graph.get(v);
    const n = await add(graph, v, ctx, created, key);
    created.push(n);
    return n;
  };

  let node: BlockNode;
  switch (driver) {
    case 'file': {
      const filename = a.string('filename');
      a.ignore('aio', 'locking', 'aio-max-batch', 'x-check-cache-dropped', 'drop-cache');
      const resolved = confine(filename, ctx);
      node = await base(FILE_INFO, () => FileDriver.open(resolved, { readOnly, direct }));
      break;
    }
    case 'null-co': {
      const size = a.int('size', { min: 0, fallback: NULL_DEFAULT_SIZE })!;
      // QEMU's default is not to zero the buffers; reads then still return zeroes here, but
      // block status reports no data and no zero flag (see NullDriver).
      const readZeroes = a.bool('read-zeroes', false)!;
      a.ignore('latency-ns');
      node = await base(NULL_INFO, async () => new NullDriver({ length: size, readZeroes }));
      break;
    }
    case 'raw': {
      const offset = a.int('offset', { min: 0, optional: true });
      const size = a.int('size', { min: 0, optional: true });
      const file = (await child('file'))!;
      node = await base(RAW_INFO, async (c) => new RawFormatDriver({ file: c.get('file')!, ...(offset !== undefined ? { offset } : {}), ...(size !== undefined ? { size } : {}) }), [{ role: 'file', node: file }]);
      break;
    }
    case 'blkdebug': {
      const rules = {
        'inject-error': a.array('inject-error', true),
        'set-state': a.array('set-state', true),
        align: a.int('align', { min: 1, optional: true }),
        'max-transfer': a.int('max-transfer', { min: 0, optional: true }),
        'max-write-zero': a.int('max-write-zero', { min: 0, optional: true }),
        'max-discard': a.int('max-discard', { min: 0, optional: true }),
      };
      const image = (await child('image'))!;
      const opts = Object.fromEntries(Object.entries(rules).filter(([, v]) => v !== undefined));
      node = await base(BLKDEBUG_INFO, async (c) => new BlkdebugDriver({ image: c.get('image')!, ...opts } as ConstructorParameters<typeof BlkdebugDriver>[0]), [{ role: 'image', node: image }]);
      break;
    }
    case 'qcow2': {
      a.ignore('cache-size', 'l2-cache-size', 'l2-cache-entry-size', 'refcount-cache-size', 'cache-clean-interval', 'lazy-refcounts', 'pass-discard-request', 'pass-discard-snapshot', 'pass-discard-other', 'overlap-check', 'data-file');
      const file = (await child('file'))!;
      const backingOpt = a.raw('backing');
      let backing: BlockNode | null | undefined;
      if (backingOpt === null) backing = null;
      else if (backingOpt !== undefined) backing = (await child('backing'))!;
      else backing = await openBackingFromHeader(graph, file, ctx, created);
      const children = [{ role: 'file', node: file }, ...(backing ? [{ role: 'backing', node: backing }] : [])];
      const info: DriverInfo = { name: 'qcow2', childPerms: formatChildPerms };
      node = await base(info, async (c) => {
        const img = await Qcow2Image.open(c.get('file')!, { readOnly, backing: c.get('backing') ?? null, ...(readOnly ? {} : { enabledBitmaps: 'take' as const }) });
        return qcow2Driver(img);
      }, children);
      break;
    }
    case 'copy-before-write': {
      const onCbwError = a.enumOf('on-cbw-error', ['break-guest-write', 'break-snapshot'] as const, 'break-guest-write')!;
      const cbwTimeoutSec = a.int('cbw-timeout', { min: 0, fallback: 0 })!;
      const bitmapRef = a.object('bitmap', true);
      const bitmapNode = bitmapRef?.string('node');
      const bitmapName = bitmapRef?.string('name');
      bitmapRef?.done();
      const file = (await child('file'))!;
      const target = (await child('target'))!;
      const bitmap = bitmapRef ? graph.get(bitmapNode!).bitmaps.get(bitmapName!).bits : undefined;
      node = await base(CBW_INFO, async (c) => new CopyBeforeWrite({
        file: c.get('file')!,
        target: c.get('target')!,
        onCbwError,
        cbwTimeoutSec,
        ...onEvent,
        ...(bitmap ? { bitmap } : {}),
        ...(ctx.pool ? { pool: ctx.pool } : {}),
      }), [{ role: 'file', node: file }, { role: 'target', node: target }]);
      break;
    }
    case 'nbd': {
      // QEMU's nbd driver: server (flat SocketAddress, or the legacy {type, data}), export.
      const server = a.object('server')!;
      const type = server.enumOf('type', ['unix', 'inet'] as const)!;
      const data = server.has('data') ? server.object('data')! : server;
      const address: NbdAddress = type === 'unix' ? { type: 'unix', path: data.string('path') } : { type: 'inet', host: data.string('host'), port: data.string('port') };
      data.ignore('abstract', 'tight', 'numeric', 'to', 'ipv4', 'ipv6', 'keep-alive');
      if (data !== server) data.done();
      server.done();
      const exportName = a.string('export', '');
      a.ignore('tls-creds', 'tls-hostname', 'x-dirty-bitmap', 'reconnect-delay', 'open-timer');
      node = await base(NBD_INFO, () => NbdClientDriver.connect({ address, exportName }));
      break;
    }
    case 'fleecing-cache': {
      // Shear's own: RAM first, then an optional local spill file (seed 000).
      const ramBytes = a.int('ram-bytes', { min: 0 })!;
      const fileBytes = a.int('file-bytes', { min: 0, optional: true });
      const size = a.int('size', { min: 0, optional: true });
      const file = await child('file', true);
      const length = size ?? file?.length;
      if (length === undefined) throw new ShearError('ERR_INVALID_ARGUMENT', "Parameter 'size' is missing (a fleecing cache without a spill file needs it)");
      node = await base(FLEECING_CACHE_INFO, async (c) => new FleecingCache({ length, ramBytes, ...onEvent, ...(c.get('file') ? { file: c.get('file')! } : {}), ...(fileBytes !== undefined ? { fileBytes } : {}) }), file ? [{ role: 'file', node: file }] : []);
      break;
    }
    case 'snapshot-access': {
      const file = (await child('file'))!;
      node = await base(SNAPSHOT_ACCESS_INFO, async (c) => new SnapshotAccess(c.get('file')!), [{ role: 'file', node: file }]);
      break;
    }
    default:
      a.ignore(...Object.keys(options as object));
      throw new ShearError('ERR_NOT_IMPLEMENTED', `Cannot add block node: driver '${driver}' is not supported (supported: file, null-co, raw, qcow2, blkdebug, nbd, copy-before-write, snapshot-access, fleecing-cache)`);
  }
  // Persistent bitmaps are loaded (and taken) before anyone can write through the node.
  try {
    await attachBitmapStorage(node);
  } catch (err) {
    await graph.removeNode(node.name).catch(() => {});
    throw err;
  }
  return node;
}

/**
 * QEMU opens the backing file a qcow2 header names when `backing` is not given: relative names
 * are relative to the image's directory, and the format is the one recorded in the header or
 * probed from the file's first bytes. The backing chain is opened read-only.
 */
async function openBackingFromHeader(graph: BlockGraph, file: BlockNode, ctx: BlockdevContext, created: BlockNode[]): Promise<BlockNode | null> {
  const head = new Uint8Array(Math.min(65536, file.length));
  await file.read(0, head);
  const { backingFile, backingFormat } = peekQcow2Backing(head);
  if (backingFile === null) return null;
  const imagePath = hasHostFile(file.driver) ? file.driver.path : undefined;
  const resolved = path.isAbsolute(backingFile) || !imagePath ? backingFile : path.join(path.dirname(imagePath), backingFile);
  const format = backingFormat ?? (await probeFormat(resolved));
  const n = await add(graph, { driver: format, 'read-only': true, file: { driver: 'file', filename: resolved, 'read-only': true } }, ctx, created, 'backing');
  created.push(n);
  return n;
}

/** The backing file name and format in a qcow2 header (just enough parsing to find them). */
export function peekQcow2Backing(head: Uint8Array): { backingFile: string | null; backingFormat: string | null } {
  const v = new DataView(head.buffer, head.byteOffset, head.byteLength);
  if (head.length < 72 || v.getUint32(0) !== QCOW2_MAGIC) {
    throw new ShearError('ERR_INVALID_ARGUMENT', 'Cannot open qcow2 node: the file is not a qcow2 image');
  }
  const nameOffset = Number(v.getBigUint64(8));
  const nameBytes = v.getUint32(16);
  if (nameOffset === 0) return { backingFile: null, backingFormat: null };
  if (nameOffset + nameBytes > head.length) throw new ShearError('ERR_QCOW2_CORRUPT', 'Cannot open qcow2 node: the backing file name lies outside the header');
  const backingFile = new TextDecoder().decode(head.subarray(nameOffset, nameOffset + nameBytes));
  let backingFormat: string | null = null;
  const version = v.getUint32(4);
  let at = version >= 3 ? v.getUint32(100) : 72;
  while (at + 8 <= head.length) {
    const type = v.getUint32(at);
    const len = v.getUint32(at + 4);
    if (type === 0) break;
    if (type === 0xe2792aca && at + 8 + len <= head.length) backingFormat = new TextDecoder().decode(head.subarray(at + 8, at + 8 + len));
    at += 8 + Math.ceil(len / 8) * 8;
  }
  return { backingFile, backingFormat };
}

async function probeFormat(file: string): Promise<string> {
  const head = Buffer.alloc(4);
  const fh = await open(file, 'r').catch(() => undefined);
  if (!fh) return 'raw';
  try {
    const { bytesRead } = await fh.read(head, 0, 4, 0);
    return bytesRead === 4 && head.readUInt32BE(0) === QCOW2_MAGIC ? 'qcow2' : 'raw';
  } finally {
    await fh.close();
  }
}

function confine(filename: string, ctx: BlockdevContext): string {
  return confinePath(filename, ctx.allowedDirs);
}

/**
 * The absolute path of a file name a client gave, when it lies inside the allowed directories
 * (every name goes when there are none). Serves blockdev-add and blockdev-create alike.
 * @throws ERR_PERMISSION_DENIED when the daemon confines file names and this one is outside
 */
export function confinePath(filename: string, allowedDirs: readonly string[] | undefined): string {
  const resolved = path.resolve(filename);
  if (allowedDirs && !allowedDirs.some((d) => resolved === path.resolve(d) || resolved.startsWith(path.resolve(d) + path.sep))) {
    throw new ShearError('ERR_PERMISSION_DENIED', `Cannot open '${filename}': it is outside the directories this daemon may use`, { path: filename });
  }
  return resolved;
}
