import { ShearError, inTransaction } from '@shear/base';
import { PERM_ALL, PERM_CONSISTENT_READ, PERM_WRITE, isBoundedCache, isPointInTimeView, type BlockGraph, type BlockIO, type BlockNode, type ChildEdge } from '@shear/block';
import type { CopyRetry, CopyWorkerPool } from '@shear/block-copy';
import type { BitmapSyncMode } from '@shear/dirty-bitmap';
import { CBW_INFO, CopyBeforeWrite, type OnCbwError } from '@shear/fleecing';
import type { Job, JobDriver } from './job.js';
import { planBackup, type BackupPlan } from './backup-plan.js';

export type MirrorSyncMode = 'full' | 'top' | 'bitmap' | 'incremental' | 'none';
export type BlockdevOnError = 'report' | 'ignore' | 'enospc' | 'stop' | 'auto';

export interface BackupParams {
  source: BlockNode;
  target: BlockNode;
  sync: MirrorSyncMode;
  bitmap?: string | undefined;
  bitmapMode?: BitmapSyncMode | undefined;
  compress?: boolean;
  onSourceError?: BlockdevOnError;
  onTargetError?: BlockdevOnError;
  filterNodeName?: string | undefined;
  maxWorkers?: number | undefined;
  maxChunk?: number | undefined;
  speed?: number;
  discardSource?: boolean;
  onCbwError?: OnCbwError;
  cbwTimeoutSec?: number;
  /**
   * Attempts at a range after an I/O error before the error reaches the error policy. Default
   * 0, as in QEMU: on-source-error / on-target-error see every error (a transient fault that a
   * retry hides would turn a failed backup into a silent success, iotest 257).
   */
  retries?: number;
  /** Called for each retried error, before the retry (the daemon logs it). */
  onRetry?: (r: CopyRetry) => void;
  /** Events of the job's copy-before-write filter (X_SHEAR_CBW_ERROR), with the filter's name added. */
  emit?: (event: string, data: Record<string, unknown>) => void;
}


/** Backoff between retries under on-*-error=ignore, so a dead disk does not spin the CPU. */
const IGNORE_RETRY_DELAY_MS = 100;

/**
 * Checks blockdev-backup's arguments as QEMU does (blockdev.c do_backup_common) and returns the
 * effective sync mode and bitmap mode; `incremental` becomes `bitmap` with `on-success`.
 * @throws ERR_INVALID_ARGUMENT with QEMU's messages
 */
export function checkBackupArgs(p: { sync: MirrorSyncMode; bitmap?: string | undefined; bitmapMode?: BitmapSyncMode | undefined }, bitmapExists?: (name: string) => boolean): { sync: Exclude<MirrorSyncMode, 'incremental'>; bitmapMode: BitmapSyncMode | undefined } {
  let sync = p.sync;
  let bitmapMode = p.bitmapMode;
  const bad = (m: string) => new ShearError('ERR_INVALID_ARGUMENT', m);
  if ((sync === 'bitmap' || sync === 'incremental') && !p.bitmap) throw bad(`must provide a valid bitmap name for '${sync}' sync mode`);
  if (sync === 'incremental') {
    if (bitmapMode !== undefined && bitmapMode !== 'on-success') throw bad("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'");
    sync = 'bitmap';
    bitmapMode = 'on-success';
  }
  if (p.bitmap) {
    // QEMU looks the bitmap up before judging the mode (iotest 257's API cases).
    if (bitmapExists && !bitmapExists(p.bitmap)) throw new ShearError('ERR_BITMAP_NOT_FOUND', `Bitmap '${p.bitmap}' could not be found`, { bitmap: p.bitmap });
    if (bitmapMode === undefined) throw bad('Bitmap sync mode must be given when providing a bitmap');
    if (sync === 'none') throw bad("sync mode 'none' does not produce meaningful bitmap outputs");
    if (bitmapMode === 'never' && sync !== 'bitmap') throw bad(`Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '${sync}'`);
  } else if (bitmapMode !== undefined) {
    throw bad('Cannot specify bitmap sync mode without a bitmap');
  }
  return { sync, bitmapMode };
}

/**
 * Which side of the copy failed. The copy engine wraps I/O errors as ERR_COPY_READ_FAILED or
 * ERR_COPY_WRITE_FAILED but passes other kinds (a full disk, a refused request) through as the
 * driver raised them, so for those the driver's context.op says it: a source that runs out of
 * space on a read must still be judged by on-source-error.
 */
export function failedOperation(e: ShearError): 'read' | 'write' {
  if (e.code === 'ERR_COPY_READ_FAILED') return 'read';
  if (e.code === 'ERR_COPY_WRITE_FAILED') return 'write';
  const op = e.context?.['op'];
  return op === 'read' || op === 'map' || op === 'block-status' ? 'read' : 'write';
}

/** QEMU's block_job_error_action: for block jobs `auto` means what `enospc` means. */
export function errorAction(policy: BlockdevOnError, e: ShearError): 'report' | 'ignore' | 'stop' {
  if (policy === 'enospc' || policy === 'auto') return e.kind === 'no-space' ? 'stop' : 'report';
  return policy;
}

/** Where a point-in-time view keeps the data it preserved; undefined for other drivers. */
function preservedDataOf(io: BlockIO): BlockNode | undefined {
  return isPointInTimeView(io) ? io.preservedDataNode() : undefined;
}

/**
 * QEMU's backup job: a copy-before-write filter goes above the source (every parent of the
 * source now writes through it), its block-copy engine copies what the sync mode asks for in
 * the background, and the filter preserves old data of clusters the guest writes meanwhile.
 * So the target ends up holding the source exactly as it was when the job was created.
 *
 * The job's bitmap (sync=bitmap, or any sync with a bitmap) is frozen with a successor in the
 * same synchronous step that fills the copy bitmap and inserts the filter: that step is the
 * backup's point in time. At the end the bitmap sync mode decides what the bitmap holds.
 */
export class BackupJob implements JobDriver {
  readonly type = 'backup';
  readonly blockJob = true;
  readonly device: string;
  readonly #graph: BlockGraph;
  readonly #edge: ChildEdge;
  readonly #source: BlockNode;
  readonly #target: BlockNode;
  readonly #filter: BlockNode;
  readonly #cbw: CopyBeforeWrite;
  readonly #sync: Exclude<MirrorSyncMode, 'incremental'>;
  readonly #plan: BackupPlan;
  readonly #undoPointInTime: () => void;
  readonly #onSourceError: BlockdevOnError;
  readonly #onTargetError: BlockdevOnError;
  #resumeWaiters: (() => void)[] = [];
  #job: Job | undefined;
  #cleaned = false;
  /** Copy errors retried instead of reaching the error policy (query-jobs' x-shear-retried). */
  #retried = 0;

  private constructor(init: {
    graph: BlockGraph;
    edge: ChildEdge;
    source: BlockNode;
    target: BlockNode;
    filter: BlockNode;
    cbw: CopyBeforeWrite;
    sync: Exclude<MirrorSyncMode, 'incremental'>;
    plan: BackupPlan;
    undoPointInTime: () => void;
    onSourceError: BlockdevOnError;
    onTargetError: BlockdevOnError;
  }) {
    this.#graph = init.graph;
    this.#edge = init.edge;
    this.#source = init.source;
    this.#target = init.target;
    this.#filter = init.filter;
    this.#cbw = init.cbw;
    this.#sync = init.sync;
    this.#plan = init.plan;
    this.#undoPointInTime = init.undoPointInTime;
    this.#onSourceError = init.onSourceError;
    this.#onTargetError = init.onTargetError;
    this.device = init.source.name;
  }

  /**
   * Validates, opens the filter and takes the point in time. On any failure nothing is left:
   * no filter, no successor.
   * @throws ERR_INVALID_ARGUMENT, ERR_BITMAP_NOT_FOUND, ERR_BITMAP_BUSY, ERR_BITMAP_INCONSISTENT, ERR_NOT_IMPLEMENTED, ERR_BLOCK_PERMISSION_CONFLICT
   */
  static async create(graph: BlockGraph, pool: CopyWorkerPool | undefined, p: BackupParams): Promise<BackupJob> {
    const { sync, bitmapMode } = checkBackupArgs(p, (name) => p.source.bitmaps.find(name) !== undefined);
    if (p.source === p.target) throw new ShearError('ERR_INVALID_ARGUMENT', 'Cannot start backup: source and target are the same node');
    if (p.source.length !== p.target.length) throw new ShearError('ERR_INVALID_ARGUMENT', 'Source and target image have different sizes');
    const bitmap = p.bitmap ? p.source.bitmaps.get(p.bitmap) : undefined;
    if (bitmap) bitmap.check({ busy: true, inconsistent: true });
    const retries = p.retries ?? 0;
    if (!Number.isSafeInteger(retries) || retries < 0) throw new ShearError('ERR_INVALID_ARGUMENT', `Invalid parameter 'x-shear-retries': ${retries} is not an integer of at least 0`);
    const plan = planBackup({
      source: p.source,
      target: p.target,
      sync,
      bitmap,
      bitmapMode,
      compress: p.compress,
      maxChunk: p.maxChunk,
      maxTasks: p.maxWorkers,
      speed: p.speed,
      retries,
      // What reached the target stays there: bitmap mode `always` may leave only the rest.
      partialTargetKept: true,
    });
    // Backing up a point-in-time view whose preserved data sits in a fleecing cache: copy the
    // cached clusters first, so the cache drains (with discard-source) before it can fill.
    const held = preservedDataOf(p.source.driver);
    const cache = held?.isOpen ? held.driver : undefined;
    const prefer = isBoundedCache(cache) ? () => cache.heldRanges() : undefined;
    // Set by `open`, which addNode awaits.
    let cbw!: CopyBeforeWrite;
    let edge: ChildEdge | undefined;
    let undoPointInTime: (() => void) | undefined;
    const filter = await graph.addNode({
      ...(p.filterNodeName !== undefined ? { name: p.filterNodeName } : {}),
      info: CBW_INFO,
      children: [{ role: 'file', node: p.source }, { role: 'target', node: p.target }],
      open: async (c) =>
        (cbw = new CopyBeforeWrite({
          file: c.get('file')!,
          target: c.get('target')!,
          startEmpty: true,
          ...(p.onCbwError ? { onCbwError: p.onCbwError } : {}),
          ...(p.cbwTimeoutSec ? { cbwTimeoutSec: p.cbwTimeoutSec } : {}),
          ...(pool ? { pool } : {}),
          ...(p.emit ? { onEvent: (event: string, data: Record<string, unknown>) => p.emit!(event, { node: filter.name, ...data }) } : {}),
          copy: { ...plan.copyOptions, ...(prefer ? { prefer } : {}) },
        })),
    });
    let release: (() => void) | undefined;
    try {
      // The point in time: with the source drained (no write in flight, new ones held back),
      // freeze, fill the copy bitmap and insert the filter with no await between them, so no
      // write can fall between the three or straddle them.
      release = await p.source.drain();
      inTransaction((tx) => {
        undoPointInTime = plan.takePointInTime(cbw.copy.copyBitmap);
        tx.add({ abort: undoPointInTime });
        graph.insertFilter(filter, p.source);
        // The job is a parent of the filter too, so the source stays protected even when no one
        // else uses it (QEMU's backup job holds its own parent on the filter likewise).
        // With discard-source the job also discards what it copied, so it needs write.
        const user = graph.attachUser({ kind: 'user', name: `backup job on "${p.source.name}"` }, filter, p.discardSource ? PERM_CONSISTENT_READ | PERM_WRITE : PERM_CONSISTENT_READ, PERM_ALL);
        tx.add({ abort: () => graph.detachUser(user) });
        edge = user;
      });
      release();
      release = undefined;
    } catch (err) {
      release?.();
      await graph.removeNode(filter.name).catch(() => {});
      throw err;
    }
    const job = new BackupJob({
      graph,
      edge: edge!,
      source: p.source,
      target: p.target,
      filter,
      cbw,
      sync,
      plan,
      undoPointInTime: undoPointInTime!,
      onSourceError: p.onSourceError ?? 'report',
      onTargetError: p.onTargetError ?? 'report',
    });
    if (p.discardSource) job.#discardCopied();
    job.#cbw.copy.on('retry', (r: CopyRetry) => {
      job.#retried++;
      p.onRetry?.(r);
    });
    return job;
  }

  /**
   * QEMU's discard-source: every range that reached the target is discarded on the source,
   * through the filter. On a point-in-time view (snapshot-access) that frees the space the
   * preserved data took (a fleecing cache drains as the backup proceeds).
   */
  #discardCopied(): void {
    this.#cbw.copy.on('range-done', (offset: number, bytes: number) => {
      this.#discards.add(
        this.#edge.discard(offset, bytes).catch(() => {
          // A failed discard only means the space is freed later; the backup is unaffected.
        }),
      );
    });
  }

  readonly #discards = new Set<Promise<void>>();

  /**
   * Undoes create() for a job that never started (a transaction that failed after this
   * action): the bitmap gets its successor's bits back and the filter comes out.
   */
  async discardUnstarted(): Promise<void> {
    this.#undoPointInTime();
    await this.clean();
  }

  /**
   * Shear's fields for query-jobs: the copy errors retried (x-shear-retries) and the fleecing
   * cache this job fills (its copy-before-write target) or drains (its source is a point-in-time
   * view kept in one): occupancy, spills and drains.
   */
  extraInfo(): Record<string, unknown> {
    let cache: Record<string, unknown> | undefined;
    for (const node of [this.#target, this.#source.isOpen ? preservedDataOf(this.#source.driver) : undefined]) {
      if (node?.isOpen && isBoundedCache(node.driver)) {
        cache = { node: node.name, ...node.driver.info() };
        break;
      }
    }
    return { 'x-shear-retried': this.#retried, ...(cache ? { 'x-shear-cache': cache } : {}) };
  }

  get filterNode(): BlockNode {
    return this.#filter;
  }

  get copyBeforeWrite(): CopyBeforeWrite {
    return this.#cbw;
  }

  async run(signal: AbortSignal, job: Job): Promise<void> {
    this.#job = job;
    this.#cbw.copy.setSpeed(job.speed);
    if (this.#sync === 'none') {
      // Only copy-before-write: the job lives until it is cancelled (fleecing).
      await new Promise<void>((resolve) => (signal.aborted ? resolve() : signal.addEventListener('abort', () => resolve(), { once: true })));
      signal.throwIfAborted();
      return;
    }
    await this.#plan.leaveOutUnallocated(this.#cbw.copy.copyBitmap, signal);
    for (;;) {
      try {
        await this.#cbw.copy.run({ signal });
        break;
      } catch (err) {
        if (signal.aborted) throw err;
        const e = err as ShearError;
        const operation = failedOperation(e);
        const action = errorAction(operation === 'read' ? this.#onSourceError : this.#onTargetError, e);
        job.emit('BLOCK_JOB_ERROR', { device: job.id, operation, action });
        if (action === 'report') throw err;
        if (action === 'stop') {
          job.pauseForError();
          await new Promise<void>((resolve) => this.#resumeWaiters.push(resolve));
          // The stop action already dealt with the error: cancelling the paused job is a
          // cancellation (BLOCK_JOB_CANCELLED, as in QEMU), not the old error reported late.
          signal.throwIfAborted();
        } else {
          await new Promise((r) => setTimeout(r, IGNORE_RETRY_DELAY_MS));
        }
      }
    }
    await this.#target.flush();
  }

  pause(): void {
    this.#cbw.copy.pause();
  }

  resume(): void {
    this.#cbw.copy.resume();
    for (const w of this.#resumeWaiters.splice(0)) w();
  }

  setSpeed(bytesPerSec: number): void {
    this.#cbw.copy.setSpeed(bytesPerSec);
  }

  progress(): { offset: number; len: number } {
    const p = this.#cbw.copy.progress;
    return { offset: p.doneBytes, len: p.totalBytes };
  }

  commit(): void {
    this.#settleBitmap('success');
  }

  async abort(): Promise<void> {
    // A guest write still inside the filter may hold clusters in a copy-before-write task,
    // and those are missing from the copy bitmap until the task settles: with `always` they
    // would be lost from the bitmap. Drained, no write is inside and none can start a copy.
    const release = await this.#filter.drain();
    try {
      this.#settleBitmap(this.#job?.cancelled ? 'cancel' : 'failure');
    } finally {
      release();
    }
  }

  /** Takes the filter out again; the parents of the source go back to it. */
  async clean(): Promise<void> {
    if (this.#cleaned) return;
    this.#cleaned = true;
    await Promise.all(this.#discards);
    this.#graph.detachUser(this.#edge);
    await this.#graph.removeFilter(this.#filter);
  }

  #settleBitmap(outcome: 'success' | 'failure' | 'cancel'): void {
    this.#plan.settle(outcome, this.#cbw.copy.copyBitmap);
  }
}
