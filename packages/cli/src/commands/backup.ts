import { Usage } from '../command-args.js';
import { rmSync } from 'node:fs';
import { rename, rm, stat, open as openFile } from 'node:fs/promises';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { ShearError } from '@shear/base';
import type { Logger } from '../logger.js';
import { BlockGraph, PERM_ALL, PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, compareContent, hasHostFile, type BlockNode } from '@shear/block';
import { addBlockdev, createImage } from '@shear/blockdev';
import { BlockCopy, CopyWorkerPool, DEFAULT_MAX_CHUNK_BYTES, defaultWorkerCount } from '@shear/block-copy';
import { parseBitmapSyncMode, type BitmapSyncMode, type DirtyBitmap } from '@shear/dirty-bitmap';
import { planBackup, type BackupPlan } from '@shear/jobs';
import { EXIT } from '../exit-codes.js';
import { ProgressBar, formatBytes } from '../progress-bar.js';
import { pausePoint, pauseRequested, stallUnwind, type Interruption } from '../interrupt.js';
import { explainFailure, freeBytes, summaryLine } from './backup-report.js';

export const BACKUP_USAGE = `usage: shear backup --source PATH --target PATH [options]

Copies a disk image to a new image, in parallel on worker threads.

options:
  --source-format raw|qcow2   format of the source (default: probed)
  --target-format raw|qcow2   format of the target (default: raw)
  --sync full|top|bitmap      full: everything; top: only what the source's top layer
                              allocates (qcow2 source; the target gets the same backing file);
                              bitmap: only the clusters of a persistent dirty bitmap the source
                              carries (qcow2 bitmaps extension or Shear's sidecar file), for
                              incrementals of a disk whose VM is shut down
  --bitmap NAME               the bitmap for --sync bitmap
  --bitmap-mode MODE          what the bitmap holds afterwards: on-success (default; alias
                              conditional), never, always (a failed backup leaves only what
                              was not copied, so a retry copies the remainder)
  --backing FILE              qcow2 target: its backing file (the previous backup of the chain)
  --workers N                 worker threads (default: ${defaultWorkerCount()}, the machine's parallelism, at least 4)
  --max-chunk BYTES           largest copy task (default ${DEFAULT_MAX_CHUNK_BYTES / 2 ** 20}M; suffixes k, M, G)
  --speed BYTES_PER_SEC       rate limit (default: none; suffixes k, M, G)
  --retries N                 retry a range whose read or write failed with an I/O error up to N
                              times, with a back-off (default 3; 0 = fail at the first error);
                              each retry is logged and counted in the summary
  --compress                  write compressed clusters (qcow2 target)
  --verify                    compare the target with the source afterwards; fail on any difference
  --single-task               one task at a time on one worker (the single-coroutine baseline)
  --force                     replace an existing target
  --json                      print one JSON summary on stdout
  --log-level LEVEL           pino log level on stderr (default: warn): JSON lines, or one
                              readable line a record when stderr is a terminal`;

export interface BackupSummary {
  source: string;
  target: string;
  sync: 'full' | 'top' | 'bitmap';
  bytes: number;
  copiedBytes: number;
  skippedBytes: number;
  seconds: number;
  mibPerSec: number;
  workers: number;
  singleTask: boolean;
  compressed: boolean;
  verified: boolean;
  /** Ranges copied again after an I/O error (see --retries). */
  retries: number;
}

interface BackupArgs {
  source: string;
  target: string;
  bitmap: string | undefined;
  bitmapMode: BitmapSyncMode;
  backing: string | undefined;
  sourceFormat: 'raw' | 'qcow2' | undefined;
  targetFormat: 'raw' | 'qcow2';
  sync: 'full' | 'top' | 'bitmap';
  workers: number;
  maxChunk: number;
  speed: number;
  retries: number;
  compress: boolean;
  verify: boolean;
  singleTask: boolean;
  force: boolean;
  json: boolean;
}

const usage: Usage = new Usage(BACKUP_USAGE);

/** Retries of a failed range in a one-shot backup (QMP jobs have their own default). */
const DEFAULT_CLI_RETRIES = 3;

/**
 * TEST-ONLY FAULT HOOK. SHEAR_KILL_WORKERS=<tasks>:<bytes>: the worker threads running the first
 * <tasks> copy tasks die after writing <bytes> (a real thread exit, an I/O error to block-copy),
 * so tests see --retries at work. Read once at module load; unset, it does nothing.
 */
const KILL_WORKERS = /^(\d+):(\d+)$/.exec(process.env['SHEAR_KILL_WORKERS'] ?? '');

export function parseBackupArgs(argv: string[]): BackupArgs {
  const { values } = usage.parse({
    args: argv,
    options: {
      source: { type: 'string' },
      target: { type: 'string' },
      'source-format': { type: 'string' },
      'target-format': { type: 'string' },
      sync: { type: 'string' },
      bitmap: { type: 'string' },
      'bitmap-mode': { type: 'string' },
      backing: { type: 'string' },
      workers: { type: 'string' },
      'max-chunk': { type: 'string' },
      speed: { type: 'string' },
      retries: { type: 'string' },
      compress: { type: 'boolean' },
      verify: { type: 'boolean' },
      'single-task': { type: 'boolean' },
      force: { type: 'boolean' },
      json: { type: 'boolean' },
      'log-level': { type: 'string' },
    },
    strict: true,
    allowPositionals: false,
  });
  if (!values.source) usage.fail('Missing --source');
  if (!values.target) usage.fail('Missing --target');
  const workers = usage.integer(values.workers, '--workers', 1, 256, defaultWorkerCount());
  const maxChunk = values['max-chunk'] === undefined ? DEFAULT_MAX_CHUNK_BYTES : usage.size(values['max-chunk'], '--max-chunk');
  const retries = values.retries === undefined ? DEFAULT_CLI_RETRIES : Number(values.retries);
  if (!/^\d+$/.test(values.retries ?? '0') || !Number.isInteger(retries) || retries > 100) usage.fail(`Invalid --retries "${values.retries}": expected an integer from 0 to 100`);
  if (maxChunk < 65536 || maxChunk > 1 << 30) usage.fail(`Invalid --max-chunk ${maxChunk}: expected 64k to 1G`);
  const targetFormat = usage.oneOf(values['target-format'], ['raw', 'qcow2'] as const, '--target-format') ?? 'raw';
  if (values.compress && targetFormat !== 'qcow2') usage.fail('--compress needs --target-format qcow2');
  const sync = usage.oneOf(values.sync, ['full', 'top', 'bitmap'] as const, '--sync') ?? 'full';
  if (sync === 'bitmap' && !values.bitmap) usage.fail('--sync bitmap needs --bitmap NAME');
  if (sync !== 'bitmap' && (values.bitmap || values['bitmap-mode'])) usage.fail('--bitmap and --bitmap-mode go with --sync bitmap');
  if (values.backing && targetFormat !== 'qcow2') usage.fail('--backing needs --target-format qcow2');
  return {
    source: values.source,
    target: values.target,
    sourceFormat: usage.oneOf(values['source-format'], ['raw', 'qcow2'] as const, '--source-format'),
    targetFormat,
    sync,
    bitmap: values.bitmap,
    bitmapMode: parseBitmapSyncMode(values['bitmap-mode'] ?? 'on-success'),
    backing: values.backing,
    workers: values['single-task'] ? 1 : workers,
    maxChunk,
    speed: values.speed === undefined ? 0 : usage.size(values.speed, '--speed'),
    retries,
    compress: values.compress ?? false,
    verify: values.verify ?? false,
    singleTask: values['single-task'] ?? false,
    force: values.force ?? false,
    json: values.json ?? false,
  };
}

export async function probeFormat(file: string): Promise<'raw' | 'qcow2'> {
  const fh = await openFile(file, 'r');
  try {
    const head = Buffer.alloc(4);
    const { bytesRead } = await fh.read(head, 0, 4, 0);
    return bytesRead === 4 && head.readUInt32BE(0) === 0x514649fb ? 'qcow2' : 'raw';
  } finally {
    await fh.close();
  }
}

/** Opens an image read-only as a node: raw images as a plain file node (mappable by workers). */
export async function openImage(graph: BlockGraph, file: string, format: 'raw' | 'qcow2', readOnly: boolean, signal: AbortSignal): Promise<BlockNode> {
  signal.throwIfAborted();
  const fileNode = { driver: 'file', filename: file, 'read-only': readOnly };
  return addBlockdev(graph, format === 'raw' ? fileNode : { driver: 'qcow2', 'read-only': readOnly, file: fileNode });
}

/** The bytes the source file holds (its allocated blocks): about what a copy writes. */
export async function dataBytes(file: string, size: number): Promise<number> {
  const st = await stat(file).catch(() => undefined);
  return st ? Math.min(size, st.blocks * 512) : size;
}

/**
 * One-shot backup. Writes into a hidden temporary file beside the target and renames it into
 * place only after the copy (and the verification, if asked) succeeded and the data is on disk,
 * so a failed or interrupted backup never leaves a file that looks finished.
 */
export async function runBackup(argv: string[], log: Logger, signal: AbortSignal, intr?: Interruption): Promise<number> {
  const args = parseBackupArgs(argv);
  const t0 = performance.now();
  const srcStat = await stat(args.source).catch((err) => {
    throw new ShearError('ERR_FILE_NOT_FOUND', `Cannot read source "${args.source}": ${err.code === 'ENOENT' ? 'no such file' : err.message}`, { path: args.source }, { cause: err });
  });
  if (!srcStat.isFile()) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot back up "${args.source}": not a regular file`, { path: args.source });
  const targetExists = await stat(args.target).then(() => true, () => false);
  if (targetExists && !args.force) {
    throw new ShearError('ERR_PERMISSION_DENIED', `Cannot write target "${args.target}": it already exists (use --force to replace it)`, { path: args.target });
  }
  const sourceFormat = args.sourceFormat ?? (await probeFormat(args.source));
  const partial = path.join(path.dirname(args.target), `.${path.basename(args.target)}.shear-partial-${process.pid}`);
  const targetFree = await freeBytes(path.dirname(args.target));

  const graph = new BlockGraph();
  let pool: CopyWorkerPool | undefined;
  const progress = new ProgressBar();
  let renamed = false;
  let copy: BlockCopy | undefined;
  let retries = 0;
  intr?.describe(() => (renamed ? `${args.target} is complete` : `nothing was written to ${args.target}`));
  const forgetPartial = intr?.onForcedExit(() => rmSync(partial, { force: true }));
  let plan: BackupPlan | undefined;
  try {
    // An offline incremental updates the bitmap stored with the source (qcow2 extension or
    // sidecar), so the source opens read-write; the backup itself only reads it.
    const src = await openImage(graph, args.source, sourceFormat, args.sync !== 'bitmap', signal);
    const length = src.length;
    let bitmap: DirtyBitmap | undefined;
    if (args.sync === 'bitmap') {
      bitmap = src.bitmaps.find(args.bitmap!);
      if (!bitmap || !bitmap.persistent) {
        throw new ShearError('ERR_BITMAP_NOT_FOUND', `Cannot back up "${args.source}": it carries no persistent bitmap "${args.bitmap}" (have: ${src.bitmaps.list().map((b) => b.name).join(', ') || 'none'})`, { bitmap: args.bitmap! });
      }
      bitmap.check({ busy: true, inconsistent: true });
    }
    let backingFile: string | undefined;
    let backingFormat: string | undefined;
    if (args.backing) {
      backingFile = path.resolve(args.backing);
      backingFormat = await probeFormat(backingFile);
    } else if (args.sync === 'top') {
      if (sourceFormat !== 'qcow2' || args.targetFormat !== 'qcow2') usage.fail('--sync top needs a qcow2 source and --target-format qcow2');
      const backing = src.child('backing')?.child;
      const fileOf = backing?.info.name === 'file' ? backing : backing?.child('file')?.child;
      const backingDriver = fileOf?.isOpen ? fileOf.driver : undefined;
      if (backing && hasHostFile(backingDriver) && backingDriver.path) {
        backingFile = backingDriver.path;
        backingFormat = backing.info.name === 'qcow2' ? 'qcow2' : 'raw';
      }
    }
    await createImage({
      path: partial,
      format: args.targetFormat,
      size: src.length,
      ...(backingFile ? { backingFile, backingFormat: backingFormat! } : {}),
    }).catch((err: ShearError) => {
      throw new ShearError(err.code, `Cannot create target "${args.target}": ${err.message}`, { ...err.context, path: args.target }, { cause: err });
    });
    const tgt = await openImage(graph, partial, args.targetFormat, false, signal);
    await pausePoint('open', signal);
    const user = { kind: 'user' as const, name: 'backup' };
    // An offline backup: nobody may write the source while it is read.
    const srcEdge = graph.attachUser(user, src, PERM_CONSISTENT_READ, PERM_ALL & ~PERM_WRITE);
    const tgtEdge = graph.attachUser(user, tgt, PERM_WRITE | PERM_CONSISTENT_READ, PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED);
    plan = planBackup({
      source: src,
      target: tgt,
      sync: args.sync,
      bitmap,
      bitmapMode: bitmap ? args.bitmapMode : undefined,
      compress: args.compress,
      maxChunk: args.maxChunk,
      singleTask: args.singleTask,
      speed: args.speed,
      retries: args.retries,
      targetIsZero: true,
      // A failed one-shot backup deletes its partial file, so nothing it copied is kept.
      partialTargetKept: false,
    });
    const clusterBytes = plan.clusterBytes;
    pool = new CopyWorkerPool({ workers: args.workers });
    copy = new BlockCopy({
      ...plan.copyOptions,
      source: { io: srcEdge, mapping: srcEdge.hostMapping() },
      target: { io: tgtEdge, mapping: tgtEdge.hostMapping() },
      length: src.length,
      pool,
      ...(KILL_WORKERS ? { faultInjection: { tasks: Number(KILL_WORKERS[1]), killWorkerAfterBytes: Number(KILL_WORKERS[2]) } } : {}),
    });
    // The point in time of an offline disk: the bitmap (if any) freezes, the copy takes what it
    // holds; with sync=top, what the top layer does not allocate is left out (and reported as
    // skipped, as a copy that skips it would).
    plan.takePointInTime(copy.copyBitmap);
    const leftOut = await plan.leaveOutUnallocated(copy.copyBitmap, signal);
    log.info({ evt: 'backup.start', node: src.name, bytes: src.length, workers: args.workers, clusterBytes, mapped: Boolean(srcEdge.hostMapping()?.mapRead && tgtEdge.hostMapping()?.mapWrite) }, 'backup started');
    copy.on('progress', (p) => progress.update(p.doneBytes, p.totalBytes, p.bytesPerSec));
    copy.on('retry', (r) => {
      retries++;
      log.warn({ evt: 'copy.retry', offset: r.offset, bytes: r.bytes, attempt: r.attempt, of: args.retries, err: r.error }, 'retrying a failed range');
    });
    const running = copy;
    if (pauseRequested('copy')) running.once('progress', () => void pausePoint('copy', signal, () => running.pause()).catch(() => {}));
    await copy.run({ signal });
    const p = copy.progress;
    progress.update(p.doneBytes, p.totalBytes, p.bytesPerSec, true);
    progress.finish();
    let verified = false;
    if (args.verify) {
      await pausePoint('verify', signal);
      const diff = await compareContent(srcEdge, tgtEdge, { signal });
      if (diff >= 0) {
        const err = new ShearError('ERR_INTERNAL', `Verification failed: target differs from source at offset ${diff}`, { offset: diff });
        (err as ShearError & { exitCode?: number }).exitCode = EXIT.VERIFY_MISMATCH;
        throw err;
      }
      verified = true;
    }
    graph.detachUser(srcEdge);
    graph.detachUser(tgtEdge);
    // The target is closed and in place before the bitmap forgets what it copied; the source
    // closes last, storing its bitmap.
    await removeTree(graph, tgt);
    await pausePoint('fsync', signal);
    await syncFile(partial);
    await pausePoint('rename', signal);
    await rename(partial, args.target);
    renamed = true;
    await syncFile(path.dirname(args.target));
    plan.settle('success', copy.copyBitmap);
    await closeAll(graph);
    const seconds = (performance.now() - t0) / 1000;
    const summary: BackupSummary = {
      source: args.source,
      target: args.target,
      sync: args.sync,
      bytes: length,
      copiedBytes: p.copiedBytes,
      skippedBytes: p.skippedBytes + leftOut,
      seconds: Number(seconds.toFixed(3)),
      mibPerSec: Number((length / 2 ** 20 / seconds).toFixed(1)),
      workers: args.workers,
      singleTask: args.singleTask,
      compressed: args.compress,
      verified,
      retries,
    };
    log.info({ evt: 'backup.done', ...summary }, 'backup finished');
    if (args.json) {
      process.stdout.write(JSON.stringify(summary) + '\n');
    } else {
      process.stdout.write(summaryLine(summary) + '\n');
    }
    return EXIT.OK;
  } catch (err) {
    // A failed or cancelled incremental keeps every bit it was to copy.
    if (copy) plan?.settle(signal.aborted ? 'cancel' : 'failure', copy.copyBitmap);
    throw explainFailure(err, { source: args.source, target: args.target, written: copy?.progress.copiedBytes ?? 0, needs: await dataBytes(args.source, srcStat.size), free: targetFree });
  } finally {
    progress.finish();
    await pool?.destroy();
    await closeAll(graph).catch(() => {});
    await stallUnwind(signal, intr);
    if (!renamed) await rm(partial, { force: true });
    // Only now: stopping the workers and closing the nodes can outlast the unwind limit on a
    // busy machine, and a forced exit meanwhile must still delete the partial file.
    forgetPartial?.();
  }
}

/** Removes `node` and the children created with it (its file, its backing chain). */
export async function removeTree(graph: BlockGraph, node: BlockNode): Promise<void> {
  const children = node.childEdges.map((e) => e.child);
  await graph.removeNode(node.name);
  for (const c of children) if (c.parentEdges.size === 0) await removeTree(graph, c);
}

export async function closeAll(graph: BlockGraph): Promise<void> {
  // Parents first: a node can only go once nothing uses it.
  for (let left = graph.nodes(); left.length > 0; left = graph.nodes()) {
    const free = left.filter((n) => n.parentEdges.size === 0);
    if (free.length === 0) break;
    for (const n of free) await graph.removeNode(n.name);
  }
}

export async function syncFile(p: string): Promise<void> {
  const fh = await openFile(p, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}
