import { ShearError } from '@shear/base';
import { NbdClientDriver, protocol, type NbdExportRef } from '@shear/nbd';
import { CHUNK_BYTES } from '../backup-manifest.js';

/** Where `shear pull` reads: an export at an NBD address. */
export type PullUrl = NbdExportRef;

export const dirtyBitmapContext = (name: string): string => `qemu:dirty-bitmap:${name}`;

/** One extent of a pull plan: what the copy does with a byte range. */
export interface PlannedExtent {
  offset: number;
  bytes: number;
  /** copy: read and write; zero: write zeroes (an incremental's dirty range that reads as zero). */
  action: 'copy' | 'zero';
}

/** Splits planned extents at chunk boundaries: the pieces of each chunk that has work. */
export function piecesByChunk(plan: PlannedExtent[]): Map<number, PlannedExtent[]> {
  const m = new Map<number, PlannedExtent[]>();
  for (const e of plan) {
    for (let at = e.offset; at < e.offset + e.bytes; ) {
      const i = Math.floor(at / CHUNK_BYTES);
      const to = Math.min(e.offset + e.bytes, (i + 1) * CHUNK_BYTES);
      let list = m.get(i);
      if (!list) m.set(i, (list = []));
      list.push({ offset: at, bytes: to - at, action: e.action });
      at = to;
    }
  }
  return m;
}

/**
 * The connections of one pull, all to the same export: one when the server does not advertise
 * multi-conn, else up to `want`. Owns them; close() closes all.
 */
export class PullSource {
  private constructor(
    readonly url: PullUrl,
    readonly connections: NbdClientDriver[],
  ) {}

  static async open(url: PullUrl, want: number, bitmap: string | undefined, signal: AbortSignal): Promise<PullSource> {
    const metaContexts = bitmap ? [dirtyBitmapContext(bitmap)] : [];
    const connect = (): Promise<NbdClientDriver> => NbdClientDriver.connect({ address: url.address, exportName: url.exportName, metaContexts, maxInflight: 16 });
    const first = await connect();
    const conns = [first];
    try {
      if (bitmap && !first.hasContext(dirtyBitmapContext(bitmap))) {
        throw new ShearError('ERR_BITMAP_NOT_FOUND', `Cannot pull an incremental from NBD export "${url.exportName}": it does not offer dirty bitmap "${bitmap}" (export it with the bitmap, e.g. block-export-add ... bitmaps=["${bitmap}"], or libvirt's <incremental>)`, { bitmap });
      }
      if (first.canMultiConn) {
        while (conns.length < want) {
          signal.throwIfAborted();
          conns.push(await connect());
        }
      }
      return new PullSource(url, conns);
    } catch (err) {
      await Promise.allSettled(conns.map((c) => c.close()));
      throw err;
    }
  }

  get length(): number {
    return this.connections[0]!.length;
  }

  get canTrim(): boolean {
    const c = this.connections[0]!;
    return !c.readOnly && (c.transmissionFlags & protocol.NBD_FLAG_SEND_TRIM) !== 0;
  }

  /**
   * The plan of a full pull (bitmap undefined): every range base:allocation reports as data; or
   * of an incremental: every dirty range, as copy where it holds data and zero where it reads as
   * zeroes (the backing file below may hold data there).
   */
  async plan(bitmap: string | undefined, signal: AbortSignal): Promise<PlannedExtent[]> {
    const c = this.connections[0]!;
    const out: PlannedExtent[] = [];
    const push = (offset: number, bytes: number, action: PlannedExtent['action']): void => {
      const last = out[out.length - 1];
      if (last && last.action === action && last.offset + last.bytes === offset) last.bytes += bytes;
      else out.push({ offset, bytes, action });
    };
    const allocation = async (offset: number, end: number, onZero: 'skip' | 'zero'): Promise<void> => {
      for (let at = offset; at < end; ) {
        signal.throwIfAborted();
        const ext = await c.blockStatus(at, Math.min(end - at, 0x40000000));
        for (const e of ext) {
          const to = Math.min(e.offset + e.bytes, end);
          if (!e.zero) push(e.offset, to - e.offset, 'copy');
          else if (onZero === 'zero') push(e.offset, to - e.offset, 'zero');
          at = to;
        }
      }
    };
    if (!bitmap) {
      await allocation(0, c.length, 'skip');
      return out;
    }
    const ctx = dirtyBitmapContext(bitmap);
    for (let at = 0; at < c.length; ) {
      signal.throwIfAborted();
      const ext = await c.contextStatus(ctx, at, Math.min(c.length - at, 0x40000000));
      for (const e of ext) {
        // qemu:dirty-bitmap: flag bit 0 set = dirty.
        if ((e.flags & 1) !== 0) await allocation(e.offset, e.offset + e.bytes, 'zero');
        at = e.offset + e.bytes;
      }
    }
    return out;
  }

  close(): Promise<void> {
    return Promise.allSettled(this.connections.map((c) => c.close())).then(() => {});
  }
}
