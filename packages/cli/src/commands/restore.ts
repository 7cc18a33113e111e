import { Usage } from '../command-args.js';
import { rmSync } from 'node:fs';
import { rename, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { ShearError } from '@shear/base';
import { isNbdUri, parseNbdUri, type NbdBoundAddress, type NbdExportRef } from '@shear/nbd';
import type { Logger } from '../logger.js';
import { BlockGraph, PERM_ALL, PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, type BlockNode, type ChildEdge } from '@shear/block';
import { addBlockdev, createImage } from '@shear/blockdev';
import { BlockCopy, CopyWorkerPool, defaultWorkerCount } from '@shear/block-copy';
import { planBackup } from '@shear/jobs';
import { EXIT } from '../exit-codes.js';
import { ProgressBar, formatBytes } from '../progress-bar.js';
import { pausePoint, pauseRequested, stallUnwind, type Interruption } from '../interrupt.js';
import { computeChunkDigests, diffChunks, type BackupManifest } from '../backup-manifest.js';
import { closeAll, openImage, removeTree, syncFile, dataBytes } from './backup.js';
import { explainFailure, freeBytes } from './backup-report.js';
import { chainProblems, loadManifests, walkChain, type Chain } from './restore-chain.js';
import { mismatchError } from './verify-report.js';

export const RESTORE_USAGE = `usage: shear restore --chain LAST --target PATH|URL [options]

Turns a point of a backup chain (a raw or qcow2 full plus qcow2 incrementals, each backed by the
previous backup) into one disk image, or writes it into an NBD export. LAST is the backup to
restore; its backing files are found from its header, as qemu-img finds them. Every link must
have its manifest (LAST.shear-manifest.json): a link without one is an unfinished backup and is
refused. A file target is written to a hidden file beside it and renamed into place at the end.

options:
  --chain LAST                the backup to restore (its older links are found from it)
  --target PATH|URL           a new image file, or an NBD export to overwrite:
                              nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT]/EXPORT
                              (the export must be as large as the disk and writable)
  --format raw|qcow2          format of a file target (default: raw)
  --verify                    read the restored disk back and compare every MiB with the
                              manifest's digests; fail (exit 7) naming each MiB that differs
  --no-manifests              restore a chain that has no Shear manifests (made by qemu-img or
                              shear backup); nothing is checked against digests (not with --verify)
  --workers N                 worker threads (default: ${defaultWorkerCount()})
  --force                     replace an existing target file
  --json                      print one JSON summary on stdout
  --log-level LEVEL           pino log level on stderr (default: warn)`;

export interface RestoreSummary {
  /** The chain's files, the restored backup first. */
  chain: string[];
  target: string;
  format: 'raw' | 'qcow2' | 'nbd';
  bytes: number;
  copiedBytes: number;
  /** Zero or unallocated: left as holes in a new file, written as zeroes into an export. */
  zeroBytes: number;
  seconds: number;
  mibPerSec: number;
  workers: number;
  verified: boolean;
  retries: number;
}

interface RestoreArgs {
  chain: string;
  target: string;
  nbd: NbdExportRef | undefined;
  format: 'raw' | 'qcow2';
  verify: boolean;
  manifests: boolean;
  workers: number;
  force: boolean;
  json: boolean;
}

const usage: Usage = new Usage(RESTORE_USAGE);

const RESTORE_RETRIES = 3;

export function parseRestoreArgs(argv: string[]): RestoreArgs {
  const { values } = usage.parse({
    args: argv,
    options: {
      chain: { type: 'string' },
      target: { type: 'string' },
      format: { type: 'string' },
      verify: { type: 'boolean' },
      'no-manifests': { type: 'boolean' },
      workers: { type: 'string' },
      force: { type: 'boolean' },
      json: { type: 'boolean' },
      'log-level': { type: 'string' },
    },
    strict: true,
    allowPositionals: false,
  });
  if (!values.chain) usage.fail('Missing --chain');
  if (!values.target) usage.fail('Missing --target');
  const format = usage.oneOf(values.format, ['raw', 'qcow2'] as const, '--format') ?? 'raw';
  const nbd = isNbdUri(values.target) ? parseNbdUri(values.target, '--target') : undefined;
  if (nbd && values.format) usage.fail('--format is for a file target; an NBD export takes the disk as it is');
  if (nbd && values.force) usage.fail('--force is for a file target; an NBD export is always overwritten');
  if (values.verify && values['no-manifests']) usage.fail('--verify needs the manifests: not with --no-manifests');
  const workers = usage.integer(values.workers, '--workers', 1, 256, defaultWorkerCount());
  return {
    chain: values.chain,
    target: values.target,
    nbd,
    format,
    verify: values.verify ?? false,
    manifests: !values['no-manifests'],
    workers,
    force: values.force ?? false,
    json: values.json ?? false,
  };
}

/** The chain, checked: every link there, and (unless --no-manifests) finished and consistent. */
async function checkedChain(args: RestoreArgs): Promise<Chain> {
  const chain = await walkChain(args.chain);
  if (!args.manifests) return chain;
  await loadManifests(chain);
  const problems = chainProblems(chain);
  if (problems.length > 0) throw problems[0];
  return chain;
}

/** Opens the restored backup with its backing chain, read-only (as QEMU opens it from the header). */
async function openChain(graph: BlockGraph, chain: Chain, signal: AbortSignal): Promise<BlockNode> {
  return openImage(graph, chain[0]!.path, chain[0]!.format, true, signal);
}

/**
 * `shear restore`: one copy from the chain's top node (reads fall through its backing chain) to
 * a new file or an NBD export, on the worker pool like `shear backup`. A new file starts as
 * zeroes, so zero ranges stay holes; an export is overwritten everywhere.
 */
export async function runRestore(argv: string[], log: Logger, signal: AbortSignal, intr?: Interruption): Promise<number> {
  const args = parseRestoreArgs(argv);
  const t0 = performance.now();
  const chain = await checkedChain(args);
  const top = chain[0]!;
  const manifest: BackupManifest | undefined = top.manifest;
  const toFile = !args.nbd;
  if (toFile) {
    const resolved = path.resolve(args.target);
    if (chain.some((l) => path.resolve(l.path) === resolved)) usage.fail(`Cannot restore onto "${args.target}": it is a link of the chain being restored`);
    const targetExists = await stat(args.target).then(() => true, () => false);
    if (targetExists && !args.force) {
      throw new ShearError('ERR_PERMISSION_DENIED', `Cannot write target "${args.target}": it already exists (use --force to replace it)`, { path: args.target });
    }
  }
  const partial = path.join(path.dirname(args.target), `.${path.basename(args.target)}.shear-partial-${process.pid}`);
  const targetFree = toFile ? await freeBytes(path.dirname(args.target)) : undefined;

  const graph = new BlockGraph();
  const progress = new ProgressBar();
  let pool: CopyWorkerPool | undefined;
  let copy: BlockCopy | undefined;
  let renamed = false;
  let retries = 0;
  intr?.describe(() =>
    !toFile
      ? `the export ${args.target} was partly overwritten: restore again before using it`
      : renamed
        ? `${args.target} is complete`
        : `nothing was written to ${args.target}`,
  );
  const forgetPartial = toFile ? intr?.onForcedExit(() => rmSync(partial, { force: true })) : undefined;
  const edges: ChildEdge[] = [];
  try {
    const src = await openChain(graph, chain, signal);
    const length = src.length;
    let tgt: BlockNode;
    if (args.nbd) {
      tgt = await addBlockdev(graph, { driver: 'nbd', server: qapiServer(args.nbd.address), export: args.nbd.exportName }).catch((err: ShearError) => {
        throw new ShearError(err.code, `Cannot open target "${args.target}": ${err.message}`, { ...err.context }, { cause: err });
      });
      if (tgt.length !== src.length) {
        throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot restore into "${args.target}": the export is ${tgt.length} bytes, the disk ${src.length}`, { path: args.target });
      }
    } else {
      await createImage({ path: partial, format: args.format, size: src.length }).catch((err: ShearError) => {
        throw new ShearError(err.code, `Cannot create target "${args.target}": ${err.message}`, { ...err.context, path: args.target }, { cause: err });
      });
      tgt = await openImage(graph, partial, args.format, false, signal);
    }
    await pausePoint('open', signal);
    const user = { kind: 'user' as const, name: 'restore' };
    const srcEdge = graph.attachUser(user, src, PERM_CONSISTENT_READ, PERM_ALL & ~PERM_WRITE);
    edges.push(srcEdge);
    const tgtEdge = graph.attachUser(user, tgt, PERM_WRITE | PERM_CONSISTENT_READ, PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED);
    edges.push(tgtEdge);
    const plan = planBackup({ source: src, target: tgt, sync: 'full', retries: RESTORE_RETRIES, targetIsZero: toFile, partialTargetKept: false });
    pool = new CopyWorkerPool({ workers: args.workers });
    copy = new BlockCopy({
      ...plan.copyOptions,
      source: { io: srcEdge, mapping: srcEdge.hostMapping() },
      target: { io: tgtEdge, mapping: tgtEdge.hostMapping() },
      length: src.length,
      pool,
    });
    plan.takePointInTime(copy.copyBitmap);
    log.info({ evt: 'restore.start', chain: chain.map((l) => l.path), target: args.target, bytes: src.length, workers: args.workers }, 'restore started');
    copy.on('progress', (p) => progress.update(p.doneBytes, p.totalBytes, p.bytesPerSec));
    copy.on('retry', (r) => {
      retries++;
      log.warn({ evt: 'copy.retry', offset: r.offset, bytes: r.bytes, attempt: r.attempt, err: r.error }, 'retrying a failed range');
    });
    const running = copy;
    if (pauseRequested('copy')) running.once('progress', () => void pausePoint('copy', signal, () => running.pause()).catch(() => {}));
    await copy.run({ signal });
    const p = copy.progress;
    progress.update(p.doneBytes, p.totalBytes, p.bytesPerSec, true);
    progress.finish();
    await tgtEdge.flush();
    let verified = false;
    if (args.verify && manifest) {
      await pausePoint('verify', signal);
      const actual = await computeChunkDigests(tgtEdge, { signal });
      const diffs = diffChunks(manifest.chunks, actual, manifest.disk.size);
      if (diffs.length > 0) throw mismatchError(`the restored disk ${args.target}`, diffs, toFile ? 'nothing was left behind' : 'the export holds the restored bytes as read');
      verified = true;
    }
    for (const e of edges.splice(0)) graph.detachUser(e);
    if (toFile) {
      await removeTree(graph, tgt);
      await pausePoint('fsync', signal);
      await syncFile(partial);
      await pausePoint('rename', signal);
      await rename(partial, args.target);
      renamed = true;
      await syncFile(path.dirname(args.target));
    }
    await closeAll(graph);
    const seconds = (performance.now() - t0) / 1000;
    const summary: RestoreSummary = {
      chain: chain.map((l) => l.path),
      target: args.target,
      format: toFile ? args.format : 'nbd',
      bytes: length,
      copiedBytes: p.copiedBytes,
      zeroBytes: p.skippedBytes,
      seconds: Number(seconds.toFixed(3)),
      mibPerSec: Number((length / 2 ** 20 / seconds).toFixed(1)),
      workers: args.workers,
      verified,
      retries,
    };
    log.info({ evt: 'restore.done', ...summary }, 'restore finished');
    process.stdout.write((args.json ? JSON.stringify(summary) : summaryLine(summary)) + '\n');
    return EXIT.OK;
  } catch (err) {
    // A full target is said in the user's terms; everything else (a corrupt link names itself) as it is.
    if (!(err instanceof ShearError) || err.kind !== 'no-space') throw err;
    let needs = 0;
    for (const l of chain) needs += await dataBytes(l.path, l.size);
    throw explainFailure(err, { source: top.path, target: args.target, written: copy?.progress.copiedBytes ?? 0, needs: Math.min(needs, top.size), free: targetFree });
  } finally {
    progress.finish();
    for (const e of edges) graph.detachUser(e);
    await pool?.destroy();
    await closeAll(graph).catch(() => {});
    await stallUnwind(signal, intr);
    if (toFile && !renamed) await rm(partial, { force: true });
    forgetPartial?.();
  }
}

/** The export's server as QEMU's nbd blockdev options take it (`port` is a string there). */
function qapiServer(a: NbdBoundAddress): Record<string, string> {
  return a.type === 'unix' ? { type: 'unix', path: a.path } : { type: 'inet', host: a.host, port: String(a.port) };
}

function summaryLine(s: RestoreSummary): string {
  const links = s.chain.length === 1 ? '1 link' : `${s.chain.length} links`;
  return (
    `restored ${s.chain[0]} (${links}) -> ${s.target}: ${formatBytes(s.bytes)} in ${s.seconds.toFixed(2)} s (${s.mibPerSec} MiB/s), ` +
    `${formatBytes(s.copiedBytes)} copied, ${formatBytes(s.zeroBytes)} zero, ${s.workers} worker(s)` +
    `${s.retries > 0 ? `, ${s.retries} range(s) retried after I/O errors` : ''}${s.verified ? ', verified' : ''}`
  );
}
