import type { BlockGraph } from '@shear/block';
import type { CopyWorkerPool } from '@shear/block-copy';
import type { BlockdevContext } from '@shear/blockdev';
import type { JobManager } from '@shear/jobs';

/** A pino-compatible logger, as much of it as the daemon uses. */
export interface DaemonLogger {
  info(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
  error(obj: object, msg?: string): void;
  debug(obj: object, msg?: string): void;
  child(bindings: Record<string, unknown>): DaemonLogger;
}

/** What every command handler works on. Coordinator-only; owned by ShearDaemon. */
export interface DaemonContext {
  readonly graph: BlockGraph;
  readonly jobs: JobManager;
  readonly pool: CopyWorkerPool | undefined;
  readonly log: DaemonLogger;
  /** Broadcast a QMP event. */
  emit(event: string, data: Record<string, unknown>): void;
  /** Directories `file` nodes may name; undefined = anywhere. */
  readonly allowedDirs: readonly string[] | undefined;
}

/** What blockdev-add (and --blockdev) needs of the daemon. */
export function blockdevContext(ctx: DaemonContext): BlockdevContext {
  return { ...(ctx.allowedDirs ? { allowedDirs: ctx.allowedDirs } : {}), ...(ctx.pool ? { pool: ctx.pool } : {}), emit: (event, data) => ctx.emit(event, data) };
}
