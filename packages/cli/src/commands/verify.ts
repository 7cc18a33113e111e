import { Usage } from '../command-args.js';
import { performance } from 'node:perf_hooks';
import { ShearError } from '@shear/base';
import type { Logger } from '../logger.js';
import { BlockGraph, PERM_ALL, PERM_CONSISTENT_READ, PERM_WRITE, type BlockNode, type ChildEdge } from '@shear/block';
import { EXIT } from '../exit-codes.js';
import { ProgressBar } from '../progress-bar.js';
import { CHUNK_BYTES, computeChunkDigests, diffChunks, type ChunkDiff } from '../backup-manifest.js';
import { closeAll, openImage } from './backup.js';
import { chainProblems, loadManifests, walkChain, type Chain } from './restore-chain.js';
import { describeChunk, describeChunks } from './verify-report.js';

export const VERIFY_USAGE = `usage: shear verify BACKUP [--json]

Recomputes the manifest digests of BACKUP and of every older backup of its chain (each point of
the chain as it reads with its backing files), checks that each manifest names its parent's, and
names every MiB whose bytes differ from what the manifest recorded.

exit status: 0 the whole chain matches its manifests; 7 some chunk differs (each is named);
             3 a link or a manifest is missing; 6 the chain is broken (a manifest does not fit
             its image or its parent) or a link is unfinished

options:
  --json                      print one JSON report on stdout (also when something differs)
  --log-level LEVEL           pino log level on stderr (default: warn)`;

export interface VerifiedLink {
  image: string;
  kind: 'full' | 'incremental';
  chunks: number;
  /** Chunks read through the chain for this link (the others are its parent's, unchanged). */
  hashedChunks: number;
  mismatches: (ChunkDiff & { mib: number })[];
}

export interface VerifyReport {
  backup: string;
  ok: boolean;
  links: VerifiedLink[];
  /** Manifests that do not fit their image or their parent (ERR_CHAIN_BROKEN messages). */
  problems: string[];
  seconds: number;
}

const usage: Usage = new Usage(VERIFY_USAGE);

function parseVerifyArgs(argv: string[]): { backup: string; json: boolean } {
  const parsed = usage.parse({ args: argv, options: { json: { type: 'boolean' }, 'log-level': { type: 'string' } }, strict: true, allowPositionals: true });
  if (parsed.positionals.length !== 1) usage.fail(parsed.positionals.length === 0 ? 'Missing BACKUP' : `One BACKUP at a time (got ${parsed.positionals.length})`);
  return { backup: parsed.positionals[0]!, json: parsed.values.json ?? false };
}

/** The chunks a link's own layer decides (allocates); the rest read as its parent's chain does. */
async function ownChunks(node: BlockNode, signal: AbortSignal): Promise<number[]> {
  const out = new Set<number>();
  for (let at = 0; at < node.length; ) {
    signal.throwIfAborted();
    const extents = await node.blockStatus(at, node.length - at);
    for (const e of extents) {
      if (e.allocated && e.bytes > 0) {
        for (let i = Math.floor(e.offset / CHUNK_BYTES); i <= Math.floor((e.offset + e.bytes - 1) / CHUNK_BYTES); i++) out.add(i);
      }
      at = e.offset + e.bytes;
    }
  }
  return [...out];
}

/** The node of each link, top first, as the qcow2 driver opened the backing chain. */
function linkNodes(top: BlockNode, chain: Chain): BlockNode[] {
  const nodes: BlockNode[] = [];
  for (let n: BlockNode | undefined = top; n; n = n.child('backing')?.child) nodes.push(n);
  if (nodes.length !== chain.length) {
    throw new ShearError('ERR_CHAIN_BROKEN', `Cannot verify "${chain[0]!.path}": its headers name ${chain.length} links but ${nodes.length} opened`, { path: chain[0]!.path });
  }
  return nodes;
}

/**
 * `shear verify`: the digests of every point of the chain, bottom up. The full is hashed whole;
 * an incremental only where its own layer allocates anything, taking its parent's recomputed
 * digest elsewhere (those bytes read through to the parent), so a chain costs about one read of
 * the disk plus its increments, and a corrupt byte in an older link shows in every later one.
 */
export async function runVerify(argv: string[], log: Logger, signal: AbortSignal): Promise<number> {
  const args = parseVerifyArgs(argv);
  const t0 = performance.now();
  const chain = await walkChain(args.backup);
  await loadManifests(chain);
  const problems = chainProblems(chain);
  for (const p of problems) log.warn({ evt: 'verify.broken', path: p.context.path }, p.message);

  const graph = new BlockGraph();
  const progress = new ProgressBar();
  const edges: ChildEdge[] = [];
  const links: VerifiedLink[] = [];
  try {
    const top = await openImage(graph, chain[0]!.path, chain[0]!.format, true, signal);
    const nodes = linkNodes(top, chain);
    const user = { kind: 'user' as const, name: 'verify' };
    for (const n of nodes) edges.push(graph.attachUser(user, n, PERM_CONSISTENT_READ, PERM_ALL & ~PERM_WRITE));
    let below: string[] | undefined;
    const plans: { node: ChildEdge; only: number[] | undefined }[] = [];
    for (let i = chain.length - 1; i >= 0; i--) {
      plans.push({ node: edges[i]!, only: i === chain.length - 1 ? undefined : await ownChunks(nodes[i]!, signal) });
    }
    const total = plans.reduce((s, p) => s + (p.only?.length ?? Math.ceil(p.node.length / CHUNK_BYTES)), 0);
    let done = 0;
    const started = performance.now();
    for (const [k, plan] of plans.entries()) {
      const link = chain[chain.length - 1 - k]!;
      const m = link.manifest!;
      const actual = await computeChunkDigests(plan.node, {
        signal,
        ...(plan.only && below ? { only: plan.only, reuse: below } : {}),
        onChunk: () => {
          done++;
          progress.update(done * CHUNK_BYTES, total * CHUNK_BYTES, (done * CHUNK_BYTES) / Math.max(0.001, (performance.now() - started) / 1000));
        },
      });
      const diffs = diffChunks(m.chunks, actual, m.disk.size);
      links.unshift({
        image: link.path,
        kind: m.kind,
        chunks: actual.length,
        hashedChunks: plan.only?.length ?? actual.length,
        mismatches: diffs.map((d) => ({ ...d, mib: d.offset / CHUNK_BYTES })),
      });
      log.info({ evt: 'verify.link', path: link.path, mismatches: diffs.length }, 'link verified');
      below = actual;
    }
    progress.finish();
  } finally {
    progress.finish();
    for (const e of edges) graph.detachUser(e);
    await closeAll(graph).catch(() => {});
  }
  const mismatched = links.filter((l) => l.mismatches.length > 0);
  const report: VerifyReport = {
    backup: args.backup,
    ok: problems.length === 0 && mismatched.length === 0,
    links,
    problems: problems.map((p) => p.message),
    seconds: Number(((performance.now() - t0) / 1000).toFixed(3)),
  };
  if (args.json) process.stdout.write(JSON.stringify(report) + '\n');
  else process.stdout.write(reportText(report) + '\n');
  for (const p of problems) process.stderr.write(`shear: ${p.message}\n`);
  if (mismatched.length > 0) {
    const named = mismatched.map((l) => `${l.image}: ${describeChunks(l.mismatches)}`).join('; ');
    process.stderr.write(`shear: Verification failed: ${named}\n`);
  }
  if (problems.length > 0) return EXIT.CORRUPT;
  if (mismatched.length > 0) return EXIT.VERIFY_MISMATCH;
  return EXIT.OK;
}

function reportText(r: VerifyReport): string {
  const lines = r.links.map((l) =>
    l.mismatches.length === 0
      ? `ok        ${l.image} (${l.kind}, ${l.chunks} MiB chunks, ${l.hashedChunks} read)`
      : `MISMATCH  ${l.image} (${l.kind}): ${l.mismatches.length} chunk(s) differ:\n` + l.mismatches.map((d) => `            ${describeChunk(d)} (offset ${d.offset}, ${d.bytes} bytes)`).join('\n'),
  );
  const verdict = r.ok ? `verified ${r.backup}: ${r.links.length} link(s) match their manifests` : `verify ${r.backup}: FAILED`;
  return [...lines, `${verdict} (${r.seconds.toFixed(2)} s)`].join('\n');
}
