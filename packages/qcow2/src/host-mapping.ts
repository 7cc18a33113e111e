import { ShearError, assertRange } from '@shear/base';
import { hasHostMappingSource, isHostMappable, type BlockIO, type HostExtent, type HostMappable, type WriteMapping } from '@shear/block';
import type { GrowableIO } from './growable-io.js';
import type { ImageGuard } from './image-guard.js';
import type { Qcow2Metadata } from './metadata.js';
import type { WriteMappings } from './write-mappings.js';

type MapReadFn = (offset: number, bytes: number) => Promise<HostExtent[]>;
type MapWriteFn = (offset: number, bytes: number) => Promise<WriteMapping>;

/** The host mapping a node offers: its own mapRead/mapWrite, or what its hostMapping() returns (graph edges and nodes). */
export function mappingOf(io: unknown): HostMappable | undefined {
  if (isHostMappable(io)) return io;
  return hasHostMappingSource(io) ? (io.hostMapping() ?? undefined) : undefined;
}

/** Appends `x` to `out`, merging it into the last extent when they continue each other. */
export function pushExtent(out: HostExtent[], x: HostExtent): void {
  const last = out[out.length - 1];
  if (last && last.kind === 'zero' && x.kind === 'zero') {
    last.bytes += x.bytes;
    return;
  }
  if (last && last.kind === 'fd' && x.kind === 'fd' && last.fd === x.fd && last.hostOffset + last.bytes === x.hostOffset) {
    last.bytes += x.bytes;
    return;
  }
  out.push({ ...x });
}

/**
 * Direct host access to an image for worker threads (`HostMappable` of @shear/block), built on
 * the protocol file's own mapping and, below unallocated clusters, the backing image's.
 * Coordinator-only calls.
 *
 * - mapRead: normal clusters map to the protocol file's extents, zero and unallocated
 *   clusters to `zero` (or, with a backing image, to the backing image's own mapping). The
 *   answer is valid while no write changes the range (callers serialise, as the request table
 *   does); compressed clusters cannot be mapped and reject with ERR_NOT_IMPLEMENTED.
 * - mapWrite: a write mapping of the image plus the protocol file's own write mapping; commit
 *   links the clusters (after the file's commit), abort gives them back.
 */
export class WorkerMapping {
  readonly #file: GrowableIO;
  /** As Qcow2OpenOptions.fileMapping: undefined means "ask the file". */
  readonly #fileMapping: HostMappable | null | undefined;
  readonly #backing: BlockIO | null;
  readonly #readOnly: boolean;
  readonly #guard: ImageGuard;
  readonly #md: Qcow2Metadata;
  readonly #writes: WriteMappings;
  readonly #length: number;

  constructor(args: {
    file: GrowableIO;
    fileMapping: HostMappable | null | undefined;
    backing: BlockIO | null;
    readOnly: boolean;
    guard: ImageGuard;
    md: Qcow2Metadata;
    writes: WriteMappings;
    diskBytes: number;
  }) {
    this.#file = args.file;
    this.#fileMapping = args.fileMapping;
    this.#backing = args.backing;
    this.#readOnly = args.readOnly;
    this.#guard = args.guard;
    this.#md = args.md;
    this.#writes = args.writes;
    this.#length = args.diskBytes;
  }

  /** The mapping, or undefined when the protocol file, or the backing image, offers none. */
  hostMapping(): HostMappable | undefined {
    const fileMap = this.#fileMapping === undefined ? mappingOf(this.#file) : (this.#fileMapping ?? undefined);
    if (!fileMap) return undefined;
    const out: HostMappable = {};
    const fileRead = fileMap.mapRead?.bind(fileMap);
    const fileWrite = fileMap.mapWrite?.bind(fileMap);
    const backingMap = this.#backing ? mappingOf(this.#backing) : undefined;
    const backingRead = backingMap?.mapRead?.bind(backingMap);
    if (fileRead && (!this.#backing || backingRead)) out.mapRead = (offset, bytes) => this.#mapRead(fileRead, backingRead, offset, bytes);
    if (fileWrite && !this.#readOnly) out.mapWrite = (offset, bytes) => this.#mapWrite(fileWrite, offset, bytes);
    return out.mapRead || out.mapWrite ? out : undefined;
  }

  async #mapRead(fileRead: MapReadFn, backingRead: MapReadFn | undefined, offset: number, bytes: number): Promise<HostExtent[]> {
    this.#guard.checkOpen('map for reading');
    assertRange(offset, bytes, this.#length, 'read mapping');
    if (bytes === 0) return [];
    const C = this.#md.clusterBytes;
    const [first, end] = this.#md.clusterRange(offset, bytes);
    const entries = await this.#md.mutex.run(() => this.#md.lookupRange(first, end - first));
    type Piece = { kind: 'host' | 'backing' | 'zero'; src: number; bytes: number };
    const pieces: Piece[] = [];
    entries.forEach((e, i) => {
      const g = first + i;
      const from = Math.max(offset, g * C);
      const to = Math.min(offset + bytes, (g + 1) * C);
      let p: Piece;
      if (e.kind === 'normal') p = { kind: 'host', src: e.hostOffset + (from - g * C), bytes: to - from };
      else if (e.kind === 'unallocated' && this.#backing) p = { kind: 'backing', src: from, bytes: to - from };
      else if (e.kind === 'compressed') {
        throw new ShearError('ERR_NOT_IMPLEMENTED', `Cannot map qcow2 range (${offset}, ${bytes}) for direct reads: cluster ${g} is compressed`, { offset, bytes });
      } else p = { kind: 'zero', src: 0, bytes: to - from };
      const prev = pieces[pieces.length - 1];
      if (prev && prev.kind === p.kind && (p.kind === 'zero' || prev.src + prev.bytes === p.src)) prev.bytes += p.bytes;
      else pieces.push(p);
    });
    const out: HostExtent[] = [];
    for (const p of pieces) {
      if (p.kind === 'zero') {
        pushExtent(out, { kind: 'zero', bytes: p.bytes });
        continue;
      }
      const limit = p.kind === 'host' ? this.#file.length : this.#backing!.length;
      const inside = Math.max(0, Math.min(p.bytes, limit - p.src));
      const map = p.kind === 'host' ? fileRead : backingRead!;
      if (inside > 0) for (const x of await map(p.src, inside)) pushExtent(out, x);
      if (inside < p.bytes) pushExtent(out, { kind: 'zero', bytes: p.bytes - inside });
    }
    return out;
  }

  async #mapWrite(fileWrite: MapWriteFn, offset: number, bytes: number): Promise<WriteMapping> {
    const m = await this.#writes.map(offset, bytes);
    const children: WriteMapping[] = [];
    const abortAll = async (): Promise<void> => {
      for (const c of children) await c.abort().catch(() => undefined);
      await this.#writes.abort(m);
    };
    try {
      for (const x of m.extents) children.push(await fileWrite(x.hostOffset, x.bytes));
    } catch (err) {
      await abortAll();
      throw err;
    }
    const extents: HostExtent[] = [];
    for (const c of children) for (const x of c.extents) pushExtent(extents, x);
    return {
      extents,
      commit: async () => {
        try {
          for (const c of children) await c.commit();
        } catch (err) {
          await this.#writes.abort(m).catch(() => undefined);
          throw err;
        }
        await this.#writes.commit(m);
      },
      abort: abortAll,
    };
  }
}
