import { createHash } from 'node:crypto';
import { ArgReader, ShearError, type Transaction } from '@shear/base';
import type { BlockNode } from '@shear/block';
import { requireBitmapStorage } from '@shear/blockdev';
import { CHECK_ALLOW_RO, CHECK_DEFAULT, type DirtyBitmap } from '@shear/dirty-bitmap';
import type { DaemonContext } from '../context.js';

/**
 * The dirty-bitmap actions, each usable on its own (a QMP command) and inside `transaction`.
 * An action checks everything, makes its change, and registers in `tx` how to take the change
 * back, so a failing later action in the same transaction undoes it.
 */
export type Action = (args: Record<string, unknown>, tx: Transaction, ctx: DaemonContext, after: AfterCommit) => Promise<void> | void;

/** Registers I/O to run once the transaction committed (storage updates that cannot be undone). */
export type AfterCommit = (fn: () => Promise<void>) => void;

/** QEMU's bdrv_lookup_bs message for a node that is not there. */
export function lookupNode(ctx: DaemonContext, name: string): BlockNode {
  const node = ctx.graph.find(name);
  if (!node) throw new ShearError('ERR_BLOCK_NODE_NOT_FOUND', `Cannot find device='${name}' nor node-name='${name}'`, { node: name });
  return node;
}

function lookupBitmap(ctx: DaemonContext, node: string, name: string): { node: BlockNode; bm: DirtyBitmap } {
  const n = lookupNode(ctx, node);
  const bm = n.bitmaps.find(name);
  if (!bm) throw new ShearError('ERR_BITMAP_NOT_FOUND', `Dirty bitmap '${name}' not found`, { node, bitmap: name });
  return { node: n, bm };
}

function nodeAndName(args: Record<string, unknown>): { a: ArgReader; node: string; name: string } {
  const a = new ArgReader(args);
  return { a, node: a.string('node'), name: a.string('name') };
}

export const bitmapAdd: Action = (args, tx, ctx, after) => {
  const { a, node, name } = nodeAndName(args);
  const granularity = a.int('granularity', { optional: true });
  const persistent = a.bool('persistent', false)!;
  const disabled = a.bool('disabled', false)!;
  a.done();
  const n = lookupNode(ctx, node);
  // Checked first: a persistent bitmap on a node that cannot keep one is refused (as QEMU does).
  if (persistent) requireBitmapStorage(n);
  n.bitmaps.add({ name, ...(granularity !== undefined ? { granularity } : {}), persistent, disabled });
  tx.add({ abort: () => void n.bitmaps.remove(name) });
  // Stored at once, marked in use: after a crash it comes back inconsistent, never missing
  // (a missing bitmap would look like one that was never created).
  if (persistent) after(() => requireBitmapStorage(n).store({ inUse: true }));
};

export const bitmapRemove: Action = (args, tx, ctx, after) => {
  const { a, node, name } = nodeAndName(args);
  a.done();
  const { node: n, bm } = lookupBitmap(ctx, node, name);
  bm.check({ busy: true, readonly: true });
  // Removed at commit, as QEMU does: until then a later action may still fail.
  tx.add({ commit: () => void n.bitmaps.remove(name) });
  // A stored bitmap leaves the image (or sidecar) too, so it does not come back at the next open.
  if (bm.persistent) after(() => requireBitmapStorage(n).remove([name]));
};

export const bitmapClear: Action = (args, tx, ctx) => {
  const { a, node, name } = nodeAndName(args);
  a.done();
  const { bm } = lookupBitmap(ctx, node, name);
  bm.check(CHECK_DEFAULT);
  const backup = bm.bits.copy();
  bm.bits.clear();
  tx.add({ abort: () => bm.bits.merge(backup) });
};

function toggle(enable: boolean): Action {
  return (args, tx, ctx) => {
    const { a, node, name } = nodeAndName(args);
    a.done();
    const { bm } = lookupBitmap(ctx, node, name);
    bm.check(CHECK_ALLOW_RO);
    const was = bm.recording;
    bm.setEnabled(enable);
    tx.add({ abort: () => bm.setEnabled(was) });
  };
}
export const bitmapEnable = toggle(true);
export const bitmapDisable = toggle(false);

export const bitmapMerge: Action = (args, tx, ctx) => {
  const a = new ArgReader(args);
  const node = a.string('node');
  const target = a.string('target');
  const list = a.array('bitmaps')!;
  a.done();
  const dst = lookupBitmap(ctx, node, target);
  const sources = list.map((item, i) => {
    if (typeof item === 'string') return lookupBitmap(ctx, node, item).bm;
    const r = new ArgReader(item, `bitmaps[${i}]`);
    const src = lookupBitmap(ctx, r.string('node'), r.string('name')).bm;
    r.done();
    return src;
  });
  const backup = dst.bm.bits.copy();
  dst.node.bitmaps.merge(target, sources);
  tx.add({ abort: () => dst.bm.bits.copyFrom(backup) });
};

/**
 * SHA-256 of the bitmap's bits laid out as QEMU's HBitmap keeps its last level: 64-bit words,
 * little-endian here as on x86, bit i of the map = bit i%64 of word i/64. So a bitmap can be
 * compared with QEMU's bit for bit (x-debug-block-dirty-bitmap-sha256).
 */
export function bitmapSha256(bm: DirtyBitmap): string {
  const words = bm.bits.leafWords();
  const longs = Math.ceil(bm.bits.bits / 64);
  const bytes = Buffer.alloc(longs * 8);
  for (let i = 0; i < words.length; i++) bytes.writeInt32LE(words[i]!, i * 4);
  return createHash('sha256').update(bytes).digest('hex');
}

export function sha256Command(args: Record<string, unknown>, ctx: DaemonContext): { sha256: string } {
  const { a, node, name } = nodeAndName(args);
  a.done();
  return { sha256: bitmapSha256(lookupBitmap(ctx, node, name).bm) };
}

export async function storeBitmapsCommand(args: Record<string, unknown>, ctx: DaemonContext): Promise<Record<string, never>> {
  const a = new ArgReader(args);
  const node = a.string('node');
  a.done();
  await requireBitmapStorage(lookupNode(ctx, node)).store({ inUse: false });
  return {};
}
