import type { Logger } from '@shear/base';
import type { BlockGraph } from '@shear/block';
import type { CopyWorkerPool } from '@shear/block-copy';
import type { BlockdevContext } from '@shear/blockdev';
import type { JobManager } from '@shear/jobs';

/** What every command handler works on. Coordinator-only; owned by ShearDaemon. */
export interface DaemonContext {
  readonly graph: BlockGraph;
  readonly jobs: JobManager;
  readonly pool: CopyWorkerPool | undefined;
  readonly log: Logger;
  /** Broadcast a QMP event. */
  emit(event: string, data: Record<string, unknown>): void;
  /** Directories `file` nodes may name; undefined = anywhere. */
  readonly allowedDirs: readonly string[] | undefined;
}

/** What blockdev-add (and --blockdev) needs of the daemon. */
export function blockdevContext(ctx: DaemonContext): BlockdevContext {
  return { ...(ctx.allowedDirs ? { allowedDirs: ctx.allowedDirs } : {}), ...(ctx.pool ? { pool: ctx.pool } : {}), emit: (event, data) => ctx.emit(event, data) };
}
