import { ShearError, crashPoint, isPowerOfTwo } from '@shear/base';
import { SharedBitmap } from '@shear/bitmap';
import type { Allocator } from './allocator.js';
import { clusterImage, wordsFromData } from './bitmaps-data.js';
import { bitmapsConsistent, bitmapsExtension, readHeader, switchBitmapsExt } from './bitmaps-ext.js';
import {
  BITMAP_AUTO,
  BITMAP_EXTRA_DATA_COMPATIBLE,
  BITMAP_IN_USE,
  ENTRY_FLAGS_AT,
  MAX_BITMAP_DATA_BYTES,
  MAX_BITMAPS,
  MAX_DIRECTORY_BYTES,
  MAX_GRANULARITY_BITS,
  MAX_NAME_BYTES,
  MAX_TABLE_ENTRIES,
  MIN_GRANULARITY_BITS,
  bitmapDataBytes,
  checkBitmapsExt,
  decodeTableEntry,
  encodeEntry,
  encodeTableEntry,
  parseBitmapsExt,
  parseDirectory,
  tableEntriesFor,
  type BitmapsExt,
  type DirEntry,
} from './bitmaps-format.js';
import { ensureLength, readPadded } from './file-util.js';
import type { GrowableIO } from './growable-io.js';
import type { ParsedHeader } from './header.js';
import type { Refcounts } from './refcounts.js';

/** A bitmap stored in a qcow2 image, as loadBitmaps reports it. */
export interface StoredBitmap {
  name: string;
  /** Bytes per bit. */
  granularity: number;
  flags: {
    /** Not saved cleanly (a crash while in use): the content is not trusted, and not loaded. */
    inUse: boolean;
    /** Enabled: must record every write to the disk. */
    auto: boolean;
  };
  /**
   * The bits, for consistent bitmaps; null for bitmaps in use, for bitmaps whose extra data
   * Shear does not know and that do not allow use without it, and when bits were not asked for.
   */
  bits: SharedBitmap | null;
}

/** A bitmap to write into the image. */
export interface BitmapToStore {
  name: string;
  /** Must equal bits.granularity (a power of two, 512 B to 2 GiB as QEMU requires). */
  granularity: number;
  /** Covers exactly the image's virtual size. */
  bits: SharedBitmap;
  /** Stored with the auto flag: tracks every write (QEMU enables it when it opens the image). */
  enabled: boolean;
}

/**
 * What the bitmap operations need of an open image. They run under the image's metadata
 * mutex (no allocation or flush interleaves), reading the header and directory from disk each
 * time rather than trusting a cached copy.
 */
export interface BitmapContext {
  file: GrowableIO;
  clusterBytes: number;
  diskBytes: number;
  /** Present when the image is writable. */
  rc: Refcounts | null;
  alloc: Allocator | null;
}

interface BitmapState {
  header: ParsedHeader;
  /** The extension in force, when consistent. */
  ext: BitmapsExt | null;
  entries: DirEntry[];
}

function label(name: string): string {
  return `'${name}'`;
}

async function readState(ctx: BitmapContext): Promise<BitmapState> {
  const header = await readHeader(ctx.file, ctx.clusterBytes);
  const raw = bitmapsExtension(header);
  // An extension without autoclear bit 0 was left by a writer that did not maintain it: ignored, as QEMU does.
  if (!raw || !bitmapsConsistent(header)) return { header, ext: null, entries: [] };
  const ext = parseBitmapsExt(raw.data);
  checkBitmapsExt(ext, ctx.clusterBytes);
  const dir = new Uint8Array(ext.directoryBytes);
  await readPadded(ctx.file, ext.directoryOffset, dir);
  return { header, ext, entries: parseDirectory(dir, ext.count, ctx.clusterBytes, ctx.diskBytes) };
}

function usable(e: DirEntry): boolean {
  if (e.flags & BITMAP_IN_USE) return false;
  return e.extraDataBytes === 0 || (e.flags & BITMAP_EXTRA_DATA_COMPATIBLE) !== 0;
}

async function readTable(ctx: BitmapContext, e: DirEntry): Promise<DataView> {
  const raw = new Uint8Array(e.tableSize * 8);
  await readPadded(ctx.file, e.tableOffset, raw);
  return new DataView(raw.buffer);
}

async function loadBits(ctx: BitmapContext, e: DirEntry): Promise<SharedBitmap> {
  const C = ctx.clusterBytes;
  const granularity = 2 ** e.granularityBits;
  const expected = tableEntriesFor(ctx.diskBytes, e.granularityBits, C);
  const name = `bitmap ${label(e.name)}`;
  if (e.tableSize !== expected) {
    throw new ShearError('ERR_QCOW2_CORRUPT', `Cannot read qcow2 ${name}: its table has ${e.tableSize} entries, the disk needs ${expected}`);
  }
  const bits = Math.ceil(ctx.diskBytes / granularity);
  const dataBytes = bitmapDataBytes(bits);
  const data = new Uint8Array(Math.ceil(bits / 32) * 4);
  const table = await readTable(ctx, e);
  const cluster = new Uint8Array(C);
  for (let i = 0; i < e.tableSize; i++) {
    const te = decodeTableEntry(table, i, C, name);
    const from = i * C;
    const to = Math.min(dataBytes, from + C);
    if (te.kind === 'ones') data.fill(0xff, from, to);
    else if (te.kind === 'data') {
      if (te.offset >= ctx.file.length) {
        throw new ShearError('ERR_QCOW2_CORRUPT', `Cannot read qcow2 ${name}: data cluster ${i} at ${te.offset} lies past the end of the file`);
      }
      await readPadded(ctx.file, te.offset, cluster);
      data.set(cluster.subarray(0, to - from), from);
    }
  }
  return SharedBitmap.fromLeafWords(ctx.diskBytes, granularity, wordsFromData(data, bits));
}

/** Every bitmap in the image, in directory order; bits loaded for the usable ones when `withBits`. */
export async function loadStoredBitmaps(ctx: BitmapContext, withBits = true): Promise<StoredBitmap[]> {
  const { entries } = await readState(ctx);
  const out: StoredBitmap[] = [];
  for (const e of entries) {
    out.push({
      name: e.name,
      granularity: 2 ** e.granularityBits,
      flags: { inUse: (e.flags & BITMAP_IN_USE) !== 0, auto: (e.flags & BITMAP_AUTO) !== 0 },
      bits: withBits && usable(e) ? await loadBits(ctx, e) : null,
    });
  }
  return out;
}

function writable(ctx: BitmapContext, op: string): { rc: Refcounts; alloc: Allocator } {
  if (!ctx.rc || !ctx.alloc) throw new ShearError('ERR_QCOW2_READ_ONLY', `Cannot ${op} qcow2 image: it is open read-only`);
  return { rc: ctx.rc, alloc: ctx.alloc };
}

/**
 * `count` contiguous free clusters (tables and directories must be contiguous), referenced
 * once each in memory. Returns the host offset of the first.
 */
async function allocateRun(ctx: BitmapContext, rc: Refcounts, count: number): Promise<number> {
  for (;;) {
    const start = await rc.findFreeRun(count);
    for (let c = start; c < start + count; c++) await rc.ensureBlockFor(c);
    // Creating refcount blocks, or moving the refcount table, may have used part of the run.
    let free = true;
    for (let c = start; c < start + count && free; c++) free = await rc.isFree(c);
    if (!free) continue;
    for (let c = start; c < start + count; c++) await rc.add(c, 1);
    await ensureLength(ctx.file, (start + count) * ctx.clusterBytes);
    return start * ctx.clusterBytes;
  }
}

function clusterOffsets(offset: number, bytes: number, clusterBytes: number): number[] {
  const out: number[] = [];
  for (let at = offset; at < offset + bytes; at += clusterBytes) out.push(at);
  return out;
}

/** The clusters an entry owns: its table and the data clusters the table points at (unreadable tables: the table only). */
async function ownedClusters(ctx: BitmapContext, e: DirEntry): Promise<number[]> {
  const out = clusterOffsets(e.tableOffset, e.tableSize * 8, ctx.clusterBytes);
  try {
    const table = await readTable(ctx, e);
    for (let i = 0; i < e.tableSize; i++) {
      const te = decodeTableEntry(table, i, ctx.clusterBytes, label(e.name));
      if (te.kind === 'data') out.push(te.offset);
    }
  } catch {
    // A damaged table of a bitmap being dropped: its data clusters leak rather than risk freeing others.
  }
  return out;
}

/**
 * Drops one reference from each cluster (after the header stopped pointing at them, durably),
 * writes the refcounts and flushes. Clusters already at refcount 0 are skipped: leaking is
 * always preferred to a wrong decrement.
 */
async function release(ctx: BitmapContext, rc: Refcounts, offsets: readonly number[]): Promise<void> {
  const freed: number[] = [];
  for (const off of offsets) {
    const c = off / ctx.clusterBytes;
    if ((await rc.get(c)) === 0) continue;
    if ((await rc.add(c, -1)) === 0) freed.push(off);
  }
  for (const off of freed) await ctx.file.discard(off, ctx.clusterBytes).catch(() => undefined);
  if (await rc.writeBack()) await ctx.file.flush();
}

function checkToStore(ctx: BitmapContext, items: readonly BitmapToStore[]): void {
  const names = new Set<string>();
  for (const b of items) {
    const nameBytes = typeof b.name === 'string' ? Buffer.byteLength(b.name, 'utf8') : 0;
    if (nameBytes === 0 || nameBytes > MAX_NAME_BYTES) {
      throw new ShearError('ERR_BITMAP_NAME', `Cannot store bitmap ${label(String(b.name).slice(0, 32))} in qcow2 image: its name must be 1 to ${MAX_NAME_BYTES} bytes`);
    }
    if (names.has(b.name)) throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot store bitmaps in qcow2 image: ${label(b.name)} is given twice`);
    names.add(b.name);
    const g = b.granularity;
    if (!isPowerOfTwo(g) || g < 2 ** MIN_GRANULARITY_BITS || g > 2 ** MAX_GRANULARITY_BITS || g !== b.bits.granularity) {
      throw new ShearError(
        'ERR_BITMAP_GRANULARITY',
        `Cannot store bitmap ${label(b.name)} in qcow2 image: granularity ${g} must be a power of two from 512 to 2^31 and match its bits (${b.bits.granularity})`,
      );
    }
    if (b.bits.size !== ctx.diskBytes) {
      throw new ShearError('ERR_BITMAP_SIZE_MISMATCH', `Cannot store bitmap ${label(b.name)} in qcow2 image: it covers ${b.bits.size} bytes, the disk ${ctx.diskBytes}`);
    }
    const entries = tableEntriesFor(ctx.diskBytes, Math.log2(g), ctx.clusterBytes);
    if (entries > MAX_TABLE_ENTRIES || entries * ctx.clusterBytes > MAX_BITMAP_DATA_BYTES) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot store bitmap ${label(b.name)} in qcow2 image: it needs too much space (use a larger granularity)`);
    }
  }
}

/** Writes one bitmap's data clusters and table; returns its directory entry fields. Allocations are appended to `fresh`. */
async function writeBitmap(ctx: BitmapContext, rc: Refcounts, alloc: Allocator, b: BitmapToStore, flags: number, fresh: number[]): Promise<Uint8Array> {
  const C = ctx.clusterBytes;
  const granularityBits = Math.log2(b.granularity);
  const n = tableEntriesFor(ctx.diskBytes, granularityBits, C);
  const table = new Uint8Array(n * 8);
  const tv = new DataView(table.buffer);
  const words = b.bits.leafWords();
  for (let k = 0; k < n; k++) {
    const img = clusterImage(words, k, C, b.bits.bits);
    if (img.kind !== 'data') {
      encodeTableEntry(tv, k, img);
      continue;
    }
    const [off] = await alloc.allocate(1);
    fresh.push(off!);
    await ctx.file.write(off!, img.bytes);
    encodeTableEntry(tv, k, { kind: 'data', offset: off! });
  }
  const tableOffset = await allocateRun(ctx, rc, Math.ceil(table.length / C));
  fresh.push(...clusterOffsets(tableOffset, table.length, C));
  await ctx.file.write(tableOffset, table);
  return encodeEntry({ tableOffset, tableSize: n, flags, granularityBits, name: b.name });
}

/**
 * Writes `entries` as a new directory, makes it and everything it references durable, then
 * switches the header to it; finally frees `drop` (clusters nothing references any more).
 * On a failure before the switch the new clusters are given back; after it, at worst leaked.
 */
async function commitDirectory(
  ctx: BitmapContext,
  state: BitmapState,
  entries: readonly Uint8Array[],
  fresh: number[],
  drop: readonly number[],
  step: (name: string) => void = () => {},
): Promise<void> {
  const { rc, alloc } = writable(ctx, 'store bitmaps in');
  let next: BitmapsExt | null = null;
  try {
    if (entries.length > 0) {
      const bytes = entries.reduce((s, e) => s + e.length, 0);
      if (entries.length > MAX_BITMAPS || bytes > MAX_DIRECTORY_BYTES) {
        throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot store bitmaps in qcow2 image: ${entries.length} bitmaps exceed QEMU's limits (${MAX_BITMAPS}, ${MAX_DIRECTORY_BYTES}-byte directory)`);
      }
      const dir = new Uint8Array(bytes);
      let at = 0;
      for (const e of entries) {
        dir.set(e, at);
        at += e.length;
      }
      const offset = await allocateRun(ctx, rc, Math.ceil(bytes / ctx.clusterBytes));
      fresh.push(...clusterOffsets(offset, bytes, ctx.clusterBytes));
      await ctx.file.write(offset, dir);
      next = { count: entries.length, directoryBytes: bytes, directoryOffset: offset };
    }
    step('directory');
    // Refcounts of everything new, and its content, durable before the header points at it.
    await rc.writeBack();
    await ctx.file.flush();
    step('refcounts');
  } catch (err) {
    await alloc.releaseNow(fresh).catch(() => undefined);
    throw err;
  }
  await switchBitmapsExt(ctx.file, ctx.clusterBytes, state.header, next);
  step('header');
  const old = state.ext ? clusterOffsets(state.ext.directoryOffset, state.ext.directoryBytes, ctx.clusterBytes) : [];
  await release(ctx, rc, [...old, ...drop]);
  step('freed');
}

/**
 * Stores `items` (new names are added after the existing bitmaps, existing names replaced in
 * place); other bitmaps in the image stay as they are. With `inUse` the entries carry the
 * in_use flag (readers treat them as inconsistent).
 */
export async function storeBitmapsIn(ctx: BitmapContext, items: readonly BitmapToStore[], inUse: boolean): Promise<ParsedHeader> {
  const { rc, alloc } = writable(ctx, 'store bitmaps in');
  checkToStore(ctx, items);
  const state = await readState(ctx);
  const byName = new Map(items.map((b) => [b.name, b]));
  const drop: number[] = [];
  for (const e of state.entries) if (byName.has(e.name)) drop.push(...(await ownedClusters(ctx, e)));
  const fresh: number[] = [];
  const written = new Map<string, Uint8Array>();
  try {
    for (const b of items) {
      const flags = (inUse ? BITMAP_IN_USE : 0) | (b.enabled ? BITMAP_AUTO : 0);
      written.set(b.name, await writeBitmap(ctx, rc, alloc, b, flags, fresh));
    }
  } catch (err) {
    await alloc.releaseNow(fresh).catch(() => undefined);
    throw err;
  }
  // Test-only crash points (SHEAR_CRASH_AT=bitmap-store:<step>) of a consistent store.
  const step = (name: string) => {
    if (!inUse) crashPoint('bitmap-store', name);
  };
  step('data');
  const entries = state.entries.map((e) => written.get(e.name) ?? e.raw);
  const existing = new Set(state.entries.map((e) => e.name));
  for (const b of items) if (!existing.has(b.name)) entries.push(written.get(b.name)!);
  await commitDirectory(ctx, state, entries, fresh, drop, step);
  return state.header;
}

/** Removes the named bitmaps and frees their clusters; names not in the image are ignored (QEMU does the same). */
export async function removeBitmapsFrom(ctx: BitmapContext, names: readonly string[]): Promise<ParsedHeader> {
  writable(ctx, 'remove bitmaps from');
  const state = await readState(ctx);
  const gone = new Set(names);
  const removed = state.entries.filter((e) => gone.has(e.name));
  if (removed.length === 0) return state.header;
  const drop: number[] = [];
  for (const e of removed) drop.push(...(await ownedClusters(ctx, e)));
  const kept = state.entries.filter((e) => !gone.has(e.name)).map((e) => e.raw);
  await commitDirectory(ctx, state, kept, [], drop);
  return state.header;
}

/**
 * Sets the in_use flag of the named bitmaps in place (4 aligned bytes each, then a flush): from
 * then on a crash leaves them inconsistent, as QEMU does for bitmaps it takes over.
 * The caller checks that the image is writable (open() calls this before refcounts exist).
 * @throws ERR_BITMAP_NOT_FOUND for a name the image does not hold
 */
export async function markInUse(ctx: BitmapContext, names: readonly string[]): Promise<void> {
  const state = await readState(ctx);
  const targets: DirEntry[] = [];
  for (const name of names) {
    const e = state.entries.find((x) => x.name === name);
    if (!e) throw new ShearError('ERR_BITMAP_NOT_FOUND', `Cannot mark bitmap ${label(name)} in use: the qcow2 image does not hold it`, { bitmap: name });
    if (!(e.flags & BITMAP_IN_USE)) targets.push(e);
  }
  if (targets.length === 0) return;
  for (const e of targets) {
    const raw = new Uint8Array(4);
    new DataView(raw.buffer).setUint32(0, e.flags | BITMAP_IN_USE);
    await ctx.file.write(state.ext!.directoryOffset + e.at + ENTRY_FLAGS_AT, raw);
  }
  await ctx.file.flush();
}
