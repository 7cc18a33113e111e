import { Usage } from '../command-args.js';
import { createHash } from 'node:crypto';
import { rmSync } from 'node:fs';
import { rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { ShearError, isShearError } from '@shear/base';
import { parseNbdUri } from '@shear/nbd';
import { BlockGraph, PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, type BlockNode, type ChildEdge } from '@shear/block';
import { addBlockdev, createImage } from '@shear/blockdev';
import type { Logger } from '../logger.js';
import { EXIT } from '../exit-codes.js';
import { ProgressBar, formatBytes } from '../progress-bar.js';
import { pausePoint, pauseRequested, type Interruption } from '../interrupt.js';
import { CHUNK_BYTES, buildManifest, chunkCount, computeChunkDigests, zeroChunkDigest, finaliseBackup, manifestPathFor, readManifest, type BackupManifest } from '../backup-manifest.js';
import { PullSource, piecesByChunk, type PullUrl } from './pull-source.js';
import { checkResumable, chunksOf, partialPathFor, readPullState, removePullState, runsOf, statePathFor, writePullState, type PullState } from './pull-state.js';

export const PULL_USAGE = `usage: shear pull --source URL --target PATH [options]

Copies a point-in-time NBD export of a running VM's disk (libvirt's virsh backup-begin in pull
mode, or a QEMU fleecing export) into a backup image, with its manifest PATH.shear-manifest.json.

URL: nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT]/EXPORT

options:
  --target-format raw|qcow2   format of the target (default: raw; qcow2 for an incremental)
  --bitmap NAME               incremental: copy only what the export's dirty bitmap NAME
                              (qemu:dirty-bitmap:NAME) marks, into a qcow2 overlay of --backing
  --backing PREVIOUS          the previous backup of this disk (needs its manifest; refused when
                              its size or disk identity differ from this export's)
  --disk-id ID                the disk identity recorded in the manifest and checked against
                              --backing (default: nbd:EXPORT; recommended: the domain and disk)
  --connections N             NBD connections when the server allows multi-conn (default 4)
  --max-inflight BYTES        bytes in flight at once (default 16M, at most 128M)
  --trim                      TRIM each range on the export once it is durably in the target,
                              so a fleecing export stops preserving it (needs a writable export)
  --resume                    continue an interrupted pull into PATH (its state file
                              PATH.shear-pull-state records what is done)
  --json                      print one JSON summary on stdout
  --log-level LEVEL           pino log level on stderr (default: warn)`;

export interface PullSummary {
  source: string;
  target: string;
  kind: 'full' | 'incremental';
  bytes: number;
  /** Data bytes written to the target, over all runs of a resumed pull. */
  copiedBytes: number;
  skippedBytes: number;
  /** Bytes read from the export by this run (a resumed run reads only what was missing). */
  pulledBytes: number;
  trimmedBytes: number;
  seconds: number;
  mibPerSec: number;
  connections: number;
  resumed: boolean;
  manifest: string;
  sha256: string;
}

interface PullArgs {
  source: string;
  url: PullUrl;
  target: string;
  targetFormat: 'raw' | 'qcow2';
  bitmap: string | undefined;
  backing: string | undefined;
  diskId: string | undefined;
  connections: number;
  maxInflight: number;
  trim: boolean;
  resume: boolean;
  json: boolean;
}

const usage: Usage = new Usage(PULL_USAGE);

export function parsePullArgs(argv: string[]): PullArgs {
  const { values } = usage.parse({
    args: argv,
    options: {
      source: { type: 'string' },
      target: { type: 'string' },
      'target-format': { type: 'string' },
      bitmap: { type: 'string' },
      backing: { type: 'string' },
      'disk-id': { type: 'string' },
      connections: { type: 'string' },
      'max-inflight': { type: 'string' },
      trim: { type: 'boolean' },
      resume: { type: 'boolean' },
      json: { type: 'boolean' },
      'log-level': { type: 'string' },
    },
    strict: true,
    allowPositionals: false,
  });
  if (!values.source) usage.fail('Missing --source');
  if (!values.target) usage.fail('Missing --target');
  if (Boolean(values.bitmap) !== Boolean(values.backing)) usage.fail('--bitmap and --backing go together (an incremental needs both)');
  const targetFormat = usage.oneOf(values['target-format'], ['raw', 'qcow2'] as const, '--target-format') ?? (values.backing ? 'qcow2' : 'raw');
  if (values.backing && targetFormat !== 'qcow2') usage.fail('An incremental (--backing) needs --target-format qcow2');
  const connections = usage.integer(values.connections, '--connections', 1, 16, 4);
  // 16 MiB: with more in flight the client's reads got slower, not faster (measured against nbdkit).
  const maxInflight = values['max-inflight'] === undefined ? 16 * 2 ** 20 : usage.size(values['max-inflight'], '--max-inflight');
  if (maxInflight < CHUNK_BYTES || maxInflight > 128 * 2 ** 20) usage.fail(`Invalid --max-inflight ${maxInflight}: expected 1M to 128M`);
  let url: PullUrl;
  try {
    url = parseNbdUri(values.source, '--source');
  } catch (err) {
    usage.fail((err as Error).message);
  }
  return {
    source: values.source,
    url,
    target: values.target,
    targetFormat,
    bitmap: values.bitmap,
    backing: values.backing,
    diskId: values['disk-id'],
    connections,
    maxInflight,
    trim: values.trim ?? false,
    resume: values.resume ?? false,
    json: values.json ?? false,
  };
}

const ZERO_BLOCK = 64 * 1024;
const ZERO = new Uint8Array(ZERO_BLOCK);

/**
 * Writes the non-zero 64 KiB blocks of `b` (runs of them at once) to a fresh target: zeroes a
 * full pull reads as data stay holes. Returns the bytes left out.
 */
async function writeNonZero(out: ChildEdge, offset: number, b: Uint8Array): Promise<number> {
  let left = 0;
  let runStart = -1;
  for (let at = 0; at <= b.length; at += ZERO_BLOCK) {
    const blk = b.subarray(at, Math.min(b.length, at + ZERO_BLOCK));
    const zero = blk.length === 0 || Buffer.compare(blk, ZERO.subarray(0, blk.length)) === 0;
    if (!zero && runStart < 0) runStart = at;
    if ((zero || at + ZERO_BLOCK >= b.length) && runStart >= 0) {
      const end = zero ? at : b.length;
      await out.write(offset + runStart, b.subarray(runStart, end));
      runStart = -1;
    }
    if (zero) left += blk.length;
  }
  return left;
}

/** Bytes between checkpoints (flush of the target, state file, TRIM of what became durable). */
const CHECKPOINT_BYTES = 64 * 2 ** 20;

/**
 * One pull: an NBD export (full, or the dirty extents of a bitmap) into a hidden partial image
 * beside the target, which becomes the target only after it is flushed and its manifest written
 * (finalise order of backup-manifest.ts). While unfinished, a state file beside the target
 * records the chunks durably copied, so any failure or signal leaves a pull `--resume` finishes.
 */
export async function runPull(argv: string[], log: Logger, signal: AbortSignal, intr?: Interruption): Promise<number> {
  const args = parsePullArgs(argv);
  const t0 = performance.now();
  const target = path.resolve(args.target);
  const partial = partialPathFor(target);
  if (await stat(target).then(() => true, () => false)) {
    throw new ShearError('ERR_PERMISSION_DENIED', `Cannot write target "${args.target}": it already exists`, { path: args.target });
  }
  const prior = await readPullState(target);
  if (prior && !args.resume) {
    throw new ShearError('ERR_PERMISSION_DENIED', `Cannot write target "${args.target}": an unfinished pull into it exists (${statePathFor(args.target)}); add --resume to finish it, or delete that file and ${partial} to start over`, { path: args.target });
  }
  const kind = args.bitmap ? 'incremental' : 'full';
  const identity = args.diskId ?? `nbd:${args.url.exportName}`;

  // The previous backup: its manifest must say it is this disk.
  let parent: BackupManifest | undefined;
  let backingName: string | null = null;
  if (args.backing) {
    const backingPath = path.resolve(args.backing);
    parent = await readManifest(backingPath).catch((err: unknown) => {
      if (isShearError(err, 'ERR_MANIFEST_NOT_FOUND')) {
        throw new ShearError('ERR_BACKING_MISMATCH', `Cannot use --backing "${args.backing}": it has no manifest (${manifestPathFor(args.backing!)}), so it is not a finished Shear backup`, { path: args.backing! }, { cause: err });
      }
      throw err;
    });
    backingName = path.dirname(backingPath) === path.dirname(target) ? path.basename(backingPath) : backingPath;
  }

  const progress = new ProgressBar();
  let source: PullSource | undefined;
  const graph = new BlockGraph();
  let edge: ChildEdge | undefined;
  let stateWritten = false;
  let finished = false;
  intr?.describe(() =>
    finished ? `${args.target} is complete` : stateWritten ? `${args.target} was not written; run the same command with --resume to copy the rest` : `nothing was written to ${args.target}`,
  );
  const forgetPartial = intr?.onForcedExit(() => {
    if (!stateWritten) rmSync(partial, { force: true });
  });
  try {
    source = await PullSource.open(args.url, args.connections, args.bitmap, signal);
    const size = source.length;
    if (parent && (parent.disk.size !== size || parent.disk.identity !== identity)) {
      throw new ShearError(
        'ERR_BACKING_MISMATCH',
        `Cannot use --backing "${args.backing}": it is a backup of disk "${parent.disk.identity}" of ${parent.disk.size} bytes, but this export is disk "${identity}" of ${size} bytes (give the previous backup of this disk, or --disk-id if the identity changed)`,
        { path: args.backing! },
      );
    }
    if (args.trim && !source.canTrim) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot --trim export "${args.url.exportName}": the server does not accept TRIM on it (it is read-only; export it writable, or leave out --trim)`);
    }
    const want = { exportName: args.url.exportName, size, identity, kind, bitmap: args.bitmap ?? null, targetFormat: args.targetFormat, backing: backingName } as const;
    const state: PullState = prior ?? { format: 'shear-pull-state', version: 1, source: args.source, ...want, partial: path.basename(partial), done: [], copiedBytes: 0, trimmedBytes: 0 };
    if (prior) {
      checkResumable(prior, want, args.target);
      if (!(await stat(partial).then((s) => s.isFile(), () => false))) {
        throw new ShearError('ERR_PULL_STATE_MISMATCH', `Cannot resume the pull into "${args.target}": its partial file ${partial} is gone; delete ${statePathFor(args.target)} to start over`, { path: partial });
      }
    } else {
      await rm(partial, { force: true });
      await createImage({
        path: partial,
        format: args.targetFormat,
        size,
        ...(backingName && parent ? { backingFile: backingName, backingFormat: parent.imageFormat } : {}),
      });
      await writePullState(target, state);
      stateWritten = true;
    }
    stateWritten = true;
    const fileNode = { driver: 'file', filename: partial, 'read-only': false };
    const node: BlockNode = await addBlockdev(graph, args.targetFormat === 'raw' ? fileNode : { driver: 'qcow2', 'read-only': false, file: fileNode });
    edge = graph.attachUser({ kind: 'user', name: 'pull' }, node, PERM_WRITE | PERM_CONSISTENT_READ, PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED);
    const out = edge;

    const plan = await source.plan(args.bitmap, signal);
    const byChunk = piecesByChunk(plan);
    const done = chunksOf(state.done);
    const todo = [...byChunk.keys()].filter((i) => !done.has(i)).sort((a, b) => a - b);
    const totalBytes = todo.reduce((s, i) => s + byChunk.get(i)!.reduce((a, p) => a + p.bytes, 0), 0);
    log.info({ evt: 'pull.start', source: args.source, bytes: size, kind, chunks: todo.length, connections: source.connections.length, resumed: Boolean(prior) }, 'pull started');
    await pausePoint('open', signal);

    let copied = 0;
    let handled = 0;
    let sinceCheckpoint = 0;
    /** Chunks copied since the last checkpoint, with the data bytes written for each. */
    const completed: { i: number; written: number }[] = [];
    /** SHA-256 of each chunk a full pull copied in this run. */
    const digests = new Map<number, string>();
    let checkpointing: Promise<void> = Promise.resolve();
    const conns = source.connections;
    const src = source;

    const checkpoint = async (): Promise<void> => {
      const batch = completed.splice(0);
      if (batch.length === 0) return;
      await out.flush();
      for (const { i } of batch) done.add(i);
      state.done = runsOf(done);
      state.copiedBytes += batch.reduce((s, c) => s + c.written, 0);
      await writePullState(target, state);
      if (args.trim) {
        // Only now, with the copies flushed: the export may drop its preserved data.
        await Promise.all(
          batch.flatMap(({ i }) =>
            byChunk.get(i)!.map(async (p) => {
              await conns[i % conns.length]!.discard(p.offset, p.bytes);
              state.trimmedBytes += p.bytes;
            }),
          ),
        );
      }
    };

    // Lanes share the chunk list; each holds at most one chunk (CHUNK_BYTES) in flight, so the
    // lane count bounds the bytes in flight.
    const lanes = Math.max(1, Math.min(todo.length, Math.floor(args.maxInflight / CHUNK_BYTES)));
    const laneAbort = new AbortController();
    const stop = (): void => laneAbort.abort(signal.reason);
    signal.addEventListener('abort', stop, { once: true });
    let next = 0;
    let paused: Promise<void> | undefined;
    const lane = async (): Promise<void> => {
      const buf = new Uint8Array(CHUNK_BYTES);
      while (next < todo.length) {
        laneAbort.signal.throwIfAborted();
        if (paused) await paused;
        const i = todo[next++]!;
        const conn = conns[i % conns.length]!;
        const base = i * CHUNK_BYTES;
        const chunkLen = Math.min(CHUNK_BYTES, size - base);
        // A full pull's chunk is what it reads plus zeroes elsewhere: its digest needs no re-read.
        if (kind === 'full') buf.fill(0, 0, chunkLen);
        let written = 0;
        for (const p of byChunk.get(i)!) {
          if (p.action === 'zero') {
            await out.writeZeroes(p.offset, p.bytes);
          } else {
            const b = buf.subarray(p.offset - base, p.offset - base + p.bytes);
            await conn.read(p.offset, b);
            const left = kind === 'full' ? await writeNonZero(out, p.offset, b) : (await out.write(p.offset, b), 0);
            written += p.bytes - left;
            copied += p.bytes;
          }
          handled += p.bytes;
        }
        if (kind === 'full') digests.set(i, createHash('sha256').update(buf.subarray(0, chunkLen)).digest('hex'));
        completed.push({ i, written });
        sinceCheckpoint += CHUNK_BYTES;
        progress.update(handled, totalBytes, handled / Math.max(0.001, (performance.now() - t0) / 1000));
        if (handled > 0 && pauseRequested('copy') && !paused) {
          paused = pausePoint('copy', signal);
          // Lanes await it; the rejection on a signal is theirs to see, not an unhandled one.
          paused.catch(() => {});
        }
        if (sinceCheckpoint >= CHECKPOINT_BYTES) {
          sinceCheckpoint = 0;
          checkpointing = checkpointing.then(checkpoint);
          await checkpointing;
        }
      }
    };
    try {
      let first: { err: unknown } | undefined;
      const guarded = (): Promise<void> =>
        lane().catch((err: unknown) => {
          // The first failure stops the other lanes at their next chunk.
          first ??= { err };
          laneAbort.abort(err);
        });
      await Promise.all(Array.from({ length: lanes }, guarded));
      if (first) throw first.err;
      checkpointing = checkpointing.then(checkpoint);
      await checkpointing;
    } catch (err) {
      // What was copied before the failure is made durable and recorded, so --resume skips it.
      await checkpointing.catch(() => {});
      await checkpoint().catch((e: unknown) => log.warn({ evt: 'pull.checkpoint_failed', err: e }, 'could not record the last copied chunks'));
      throw err;
    } finally {
      signal.removeEventListener('abort', stop);
    }
    progress.update(handled, totalBytes, 0, true);
    progress.finish();

    log.info({ evt: 'pull.copied', bytes: copied, seconds: Number(((performance.now() - t0) / 1000).toFixed(3)) }, 'copy done; computing the manifest');
    // The manifest: chunk digests as the chain up to the target reads them.
    await pausePoint('digest', signal);
    const view = {
      length: size,
      read: (o: number, b: Uint8Array) => out.read(o, b),
      ...(kind === 'full' ? { blockStatus: (o: number, n: number) => out.blockStatus(o, n) } : {}),
    };
    let chunks: string[];
    if (parent) {
      chunks = await computeChunkDigests(view, { only: byChunk.keys(), reuse: parent.chunks, signal });
    } else {
      // Digests of this run's chunks are known; chunks without data are zeroes; only chunks an
      // earlier run (before a --resume) copied are read back.
      const known = Array.from({ length: chunkCount(size) }, (_, i) => digests.get(i) ?? (byChunk.has(i) ? '' : zeroChunkDigest(Math.min(CHUNK_BYTES, size - i * CHUNK_BYTES))));
      chunks = await computeChunkDigests(view, { only: known.flatMap((d, i) => (d === '' ? [i] : [])), reuse: known, signal });
    }
    const manifest = buildManifest({
      kind,
      image: path.basename(target),
      imageFormat: args.targetFormat,
      disk: { size, identity, source: args.source },
      parent: parent ? { image: backingName!, sha256: parent.sha256 } : null,
      bitmap: args.bitmap ?? null,
      chunks,
      copiedBytes: state.copiedBytes,
      trimmedBytes: state.trimmedBytes,
    });
    graph.detachUser(out);
    edge = undefined;
    await closeAll(graph);
    await pausePoint('rename', signal);
    await finaliseBackup(partial, target, manifest);
    finished = true;
    await removePullState(target);
    const seconds = (performance.now() - t0) / 1000;
    const summary: PullSummary = {
      source: args.source,
      target: args.target,
      kind,
      bytes: size,
      copiedBytes: state.copiedBytes,
      skippedBytes: size - state.copiedBytes,
      pulledBytes: copied,
      trimmedBytes: state.trimmedBytes,
      seconds: Number(seconds.toFixed(3)),
      mibPerSec: Number((copied / 2 ** 20 / seconds).toFixed(1)),
      connections: conns.length,
      resumed: Boolean(prior),
      manifest: manifestPathFor(args.target),
      sha256: manifest.sha256,
    };
    log.info({ evt: 'pull.done', ...summary }, 'pull finished');
    process.stdout.write(
      args.json
        ? JSON.stringify(summary) + '\n'
        : `pulled ${args.source} -> ${args.target} (${kind}): ${formatBytes(size)} disk, ${formatBytes(summary.copiedBytes)} copied, ` +
            `${formatBytes(summary.trimmedBytes)} trimmed, in ${summary.seconds.toFixed(2)} s over ${conns.length} connection(s)${prior ? ', resumed' : ''}\n`,
    );
    return EXIT.OK;
  } catch (err) {
    throw explainPullFailure(err, args.target, stateWritten && !finished);
  } finally {
    progress.finish();
    if (edge) graph.detachUser(edge);
    await closeAll(graph).catch(() => {});
    await source?.close();
    forgetPartial?.();
  }
}

/** Adds what the user can do next to a failure after the pull started writing. */
function explainPullFailure(err: unknown, target: string, resumable: boolean): unknown {
  if (!(err instanceof ShearError) || !resumable || err.kind === 'cancelled') return err;
  const hint = `; ${target} was not written, and the same command with --resume copies what is missing (state: ${statePathFor(target)})`;
  const msg = err.kind === 'no-space' ? `Cannot write target "${target}": no space left on its file system (${err.message})${hint}` : err.message + hint;
  return new ShearError(err.code, msg, { ...err.context, path: target }, { cause: err });
}

async function closeAll(graph: BlockGraph): Promise<void> {
  for (let left = graph.nodes(); left.length > 0; left = graph.nodes()) {
    const free = left.filter((n) => n.parentEdges.size === 0);
    if (free.length === 0) break;
    for (const n of free) await graph.removeNode(n.name);
  }
}

