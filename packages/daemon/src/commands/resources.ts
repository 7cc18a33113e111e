import fs from 'node:fs';
import { ArgReader } from '@shear/base';
import type { CommandRegistry } from '@shear/qmp';
import type { DaemonContext } from '../context.js';

/** What an open descriptor points at, by kind: a regular file is an image (or a sidecar of one). */
function fdKind(target: string): 'file' | 'socket' | 'pipe' | 'anon' | 'device' | 'other' {
  if (target.startsWith('socket:')) return 'socket';
  if (target.startsWith('pipe:')) return 'pipe';
  if (target.startsWith('anon_inode:')) return 'anon';
  if (target.startsWith('/dev/')) return 'device';
  if (target.startsWith('/')) return 'file';
  return 'other';
}

/** This process's descriptors from /proc/self/fd (Linux; empty elsewhere). */
function openFds(): { fd: number; target: string; kind: ReturnType<typeof fdKind> }[] {
  let names: string[];
  try {
    names = fs.readdirSync('/proc/self/fd');
  } catch {
    return [];
  }
  const out = [];
  for (const name of names) {
    try {
      const target = fs.readlinkSync(`/proc/self/fd/${name}`);
      out.push({ fd: Number(name), target, kind: fdKind(target) });
    } catch {
      // the descriptor readdirSync used, closed already
    }
  }
  return out.sort((a, b) => a.fd - b.fd);
}

/**
 * `x-shear-query-resources`: what the daemon holds, for leak checks in tests and for operators
 * (experimental, x- prefix). Returns the open descriptors with their targets, the descriptors
 * on regular files ('files': images and their sidecars; the daemon's own code files are read
 * when loaded and closed), the kinds of active handles and requests with counts (those that
 * keep the process alive), the copy worker pool (threads, tasks in flight and queued), the
 * nodes and jobs that explain the rest, and the process's memory (RSS and V8 heap, for the
 * fuzz campaign's before/after figures).
 */
export function registerResourceQuery(reg: CommandRegistry, ctx: DaemonContext): void {
  reg.register('x-shear-query-resources', (args) => {
    new ArgReader(args).done();
    const fds = openFds();
    const handles: Record<string, number> = {};
    for (const kind of process.getActiveResourcesInfo()) handles[kind] = (handles[kind] ?? 0) + 1;
    return {
      fds: fds.map(({ fd, target }) => ({ fd, target })),
      files: fds.filter((f) => f.kind === 'file' && !/\.(?:[cm]?js|json|map|node)$/.test(f.target)).map((f) => f.target),
      handles,
      pool: ctx.pool ? { workers: ctx.pool.workers, threads: ctx.pool.threads, 'in-flight': ctx.pool.inFlight, queued: ctx.pool.queued } : null,
      nodes: ctx.graph.nodes().map((n) => n.name),
      jobs: ctx.jobs.list().map((j) => j.id),
      memory: process.memoryUsage(),
    };
  });
}
