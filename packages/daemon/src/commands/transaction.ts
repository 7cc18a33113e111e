import { ArgReader, ShearError, Transaction } from '@shear/base';
import { JobTxn } from '@shear/jobs';
import type { CommandRegistry } from '@shear/qmp';
import type { DaemonContext } from '../context.js';
import {
  bitmapAdd,
  bitmapClear,
  bitmapDisable,
  bitmapEnable,
  bitmapMerge,
  bitmapRemove,
  sha256Command,
  storeBitmapsCommand,
  type Action,
  type AfterCommit,
} from './bitmap-actions.js';
import { backupAction } from './job-commands.js';

/** Runs `fn` as one all-or-nothing step: on failure every change it registered is undone. */
export async function atomically(fn: (tx: Transaction, after: AfterCommit) => Promise<void> | void): Promise<void> {
  const tx = new Transaction();
  const later: (() => Promise<void>)[] = [];
  try {
    await fn(tx, (f) => later.push(f));
  } catch (err) {
    tx.abort();
    throw err;
  }
  tx.commit();
  for (const f of later) await f();
}

const BITMAP_ACTIONS: Record<string, Action> = {
  'block-dirty-bitmap-add': bitmapAdd,
  'block-dirty-bitmap-remove': bitmapRemove,
  'block-dirty-bitmap-clear': bitmapClear,
  'block-dirty-bitmap-enable': bitmapEnable,
  'block-dirty-bitmap-disable': bitmapDisable,
  'block-dirty-bitmap-merge': bitmapMerge,
};

const TRANSACTION_TYPES = [...Object.keys(BITMAP_ACTIONS), 'blockdev-backup', 'abort'];

export function registerBitmapAndTransactionCommands(reg: CommandRegistry, ctx: DaemonContext): void {
  for (const [name, action] of Object.entries(BITMAP_ACTIONS)) {
    reg.register(name, async (args) => {
      await atomically((tx, after) => action(args, tx, ctx, after));
      return {};
    });
  }
  reg.register('x-debug-block-dirty-bitmap-sha256', (args) => sha256Command(args, ctx));
  reg.register('x-shear-store-bitmaps', (args) => storeBitmapsCommand(args, ctx));
  reg.register('blockdev-backup', async (args) => {
    await atomically((tx) => backupAction(args, tx, ctx));
    return {};
  });

  reg.register('transaction', async (args) => {
    const a = new ArgReader(args);
    const actions = a.array('actions')!;
    const props = a.object('properties', true);
    const mode = props?.enumOf('completion-mode', ['individual', 'grouped'] as const, 'individual') ?? 'individual';
    props?.done();
    a.done();
    // Every action is checked for shape before any of them runs.
    const parsed = actions.map((item, i) => {
      const r = new ArgReader(item, `actions[${i}]`);
      const type = r.string('type');
      const data = r.object('data', true);
      r.done();
      if (!TRANSACTION_TYPES.includes(type)) {
        throw new ShearError('ERR_INVALID_ARGUMENT', `Parameter 'actions[${i}].type' does not accept value '${type}'`);
      }
      return { type, data: (item as { data?: Record<string, unknown> }).data ?? {}, hasData: data !== undefined };
    });
    const jobTxn = mode === 'grouped' ? new JobTxn() : undefined;
    await atomically(async (tx, after) => {
      for (const { type, data } of parsed) {
        if (type === 'abort') throw new ShearError('ERR_INVALID_ARGUMENT', 'Transaction aborted using Abort action');
        if (type === 'blockdev-backup') await backupAction(data, tx, ctx, jobTxn);
        else await BITMAP_ACTIONS[type]!(data, tx, ctx, after);
      }
    });
    return {};
  });
}
