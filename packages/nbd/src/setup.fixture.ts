import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import type { Test } from 'tap';
import {
  BlockGraph,
  MemoryDriver,
  PERM_ALL,
  PERM_CONSISTENT_READ,
  PERM_WRITE,
  filterChildPerms,
  type BlockNode,
  type ChildEdge,
} from '@shear/block';
import type { DirtyBitmap } from '@shear/dirty-bitmap';
import { NbdServer, type NbdServerOptions } from './server/server.js';
import type { NbdExportInfo } from './server/export.js';
import type { NbdBoundAddress } from './address.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;
const MEMORY_INFO = { name: 'memory', childPerms: filterChildPerms };

export interface Disk {
  graph: BlockGraph;
  node: BlockNode;
  memory: MemoryDriver;
  /** What the disk holds; tests keep it in step with their writes. */
  content: Buffer;
}

/**
 * A memory node of `size` bytes: data in the given 64 KiB chunks (random bytes), holes
 * elsewhere, so block status has both kinds.
 */
export async function makeDisk(size: number, opts: { dataChunks?: number[]; name?: string; graph?: BlockGraph } = {}): Promise<Disk> {
  const graph = opts.graph ?? new BlockGraph();
  const memory = new MemoryDriver({ length: size });
  const content = Buffer.alloc(size);
  for (const c of opts.dataChunks ?? []) {
    const piece = randomBytes(Math.min(64 * KiB, size - c * 64 * KiB));
    piece.copy(content, c * 64 * KiB);
    await memory.write(c * 64 * KiB, piece);
  }
  const node = await graph.addNode({ name: opts.name ?? 'disk', info: MEMORY_INFO, open: async () => memory });
  return { graph, node, memory, content };
}

export function attach(disk: Disk, name: string, writable: boolean): ChildEdge {
  return disk.graph.attachUser({ kind: 'user', name }, disk.node, writable ? PERM_CONSISTENT_READ | PERM_WRITE : PERM_CONSISTENT_READ, PERM_ALL);
}

export interface Served {
  server: NbdServer;
  address: NbdBoundAddress;
  disk: Disk;
  edge: ChildEdge;
  deleted: NbdExportInfo[];
}

/**
 * A server on a UNIX socket in the test's directory (or TCP on 127.0.0.1 with `tcp`), exporting
 * `disk` as `name`. Teardown closes the server and checks nothing is left open.
 */
export async function serve(
  t: Test,
  disk: Disk,
  opts: { name?: string; writable?: boolean; bitmaps?: DirtyBitmap[]; allocationDepth?: boolean; description?: string; tcp?: boolean; server?: NbdServerOptions; fleecing?: boolean; edge?: ChildEdge } = {},
): Promise<Served> {
  const deleted: NbdExportInfo[] = [];
  const server = new NbdServer({ ...opts.server, onExportDeleted: (i) => deleted.push(i) });
  const dir = shortDir(t);
  const address = await server.listen(opts.tcp ? { type: 'inet', host: '127.0.0.1', port: 0 } : { type: 'unix', path: join(dir, 'nbd.sock') });
  const writable = opts.writable ?? true;
  const edge = opts.edge ?? attach(disk, `nbd-${opts.name ?? 'disk'}`, writable || opts.fleecing === true);
  const exportOpts: Parameters<NbdServer['addExport']>[0] = { name: opts.name ?? 'disk', edge, writable, bitmaps: opts.bitmaps ?? [] };
  if (opts.allocationDepth !== undefined) exportOpts.allocationDepth = opts.allocationDepth;
  if (opts.description !== undefined) exportOpts.description = opts.description;
  if (opts.fleecing !== undefined) exportOpts.fleecing = opts.fleecing;
  server.addExport(exportOpts);
  t.teardown(async () => {
    await server.close();
    if (server.connectionCount !== 0) t.fail(`connections left open: ${server.connectionCount}`);
  });
  return { server, address, disk, edge, deleted };
}

/**
 * A fresh directory with a short path, removed at teardown: UNIX socket paths must fit in 108
 * bytes, which tap's fixture directories (named after the test) do not.
 */
export function shortDir(t: Test): string {
  const dir = mkdtempSync(join(tmpdir(), 'shear-nbd-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Handles of kinds a server could leak (sockets, servers, timers), for before/after counts. */
export function openHandles(): number {
  return process.getActiveResourcesInfo().filter((r) => /TCP|Pipe|Timeout/.test(r)).length;
}

/** Waits until `cond` holds, polling the event loop; fails after `ms` (never decides an outcome by sleeping). */
export async function until(cond: () => boolean, what: string, ms = 5000): Promise<void> {
  const start = Date.now();
  while (!cond()) {
    if (Date.now() - start > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}
