import { ArgReader, ShearError } from '@shear/base';
import { PERM_ALL, PERM_CONSISTENT_READ, PERM_WRITE, type ChildEdge } from '@shear/block';
import type { CommandRegistry } from '@shear/qmp';
import type { DaemonContext } from '../context.js';
import { lookupNode } from './bitmap-actions.js';

/**
 * `x-shear-io`: qemu-io-style I/O on a node from the control socket, the way QEMU users drive a
 * guest disk with `human-monitor-command` "qemu-io drive0 ...". Experimental (x- prefix).
 *
 * The first call for a node attaches a writer to it, as a guest device would be: it holds write
 * permission and, like every parent, moves onto a filter inserted above the node, so its writes
 * go through copy-before-write during a backup. Commands (sizes take k/M/G suffixes):
 *   write [-P PATTERN] [-z] OFFSET LENGTH    (pattern byte, default 0xcd; -z writes zeroes)
 *   discard OFFSET LENGTH
 *   read [-P PATTERN] OFFSET LENGTH          (with -P: fails unless every byte matches)
 *   flush
 */
export function registerIoCommand(reg: CommandRegistry, ctx: DaemonContext): void {
  const writers = new Map<string, ChildEdge>();
  const edgeFor = (node: string): ChildEdge => {
    const existing = writers.get(node);
    if (existing && existing.child.isOpen) return existing;
    const edge = ctx.graph.attachUser({ kind: 'user', name: `x-shear-io:${node}` }, lookupNode(ctx, node), PERM_WRITE | PERM_CONSISTENT_READ, PERM_ALL);
    writers.set(node, edge);
    return edge;
  };
  reg.register('x-shear-io', async (args) => {
    const a = new ArgReader(args);
    const node = a.string('node');
    const command = a.string('command');
    a.done();
    const words = command.trim().split(/\s+/);
    const op = words.shift();
    let pattern: number | undefined;
    let zero = false;
    while (words[0]?.startsWith('-')) {
      const flag = words.shift();
      if (flag === '-P') pattern = parseIntStrict(words.shift(), 'pattern');
      else if (flag === '-z') zero = true;
      else throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot run x-shear-io: unknown flag '${flag}'`);
    }
    const edge = edgeFor(node);
    if (op === 'flush') {
      await edge.flush();
      return {};
    }
    if (words.length !== 2) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot run x-shear-io '${command}': expected OFFSET LENGTH`);
    const offset = parseSize(words[0]!);
    const bytes = parseSize(words[1]!);
    if (op === 'write') {
      if (zero) await edge.writeZeroes(offset, bytes);
      else await edge.write(offset, Buffer.alloc(bytes, pattern ?? 0xcd));
      return {};
    }
    if (op === 'discard') {
      await edge.discard(offset, bytes);
      return {};
    }
    if (op === 'read') {
      const buf = Buffer.alloc(bytes);
      await edge.read(offset, buf);
      if (pattern !== undefined) {
        const bad = buf.findIndex((b) => b !== pattern);
        if (bad >= 0) throw new ShearError('ERR_INVALID_ARGUMENT', `Pattern verification failed at offset ${offset + bad}: 0x${buf[bad]!.toString(16)} != 0x${pattern.toString(16)}`);
      }
      return {};
    }
    throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot run x-shear-io: unknown command '${op}' (write, read, discard, flush)`);
  });
}

function parseIntStrict(v: string | undefined, what: string): number {
  const n = Number(v);
  if (v === undefined || !Number.isInteger(n) || n < 0 || n > 255) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot run x-shear-io: bad ${what} '${v}'`);
  return n;
}

function parseSize(v: string): number {
  const m = /^(\d+)([kKmMgG]?)$/.exec(v);
  if (!m) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot run x-shear-io: bad size '${v}'`);
  const mult = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3 }[m[2]!.toLowerCase() as '' | 'k' | 'm' | 'g'];
  return Number(m[1]) * mult;
}
