import { ShearError } from '@shear/base';
import {
  loadStoredBitmaps,
  markInUse,
  removeBitmapsFrom,
  storeBitmapsIn,
  type BitmapContext,
  type BitmapToStore,
  type StoredBitmap,
} from './bitmaps-store.js';
import type { GrowableIO } from './growable-io.js';
import type { ParsedHeader } from './header.js';
import type { ImageGuard } from './image-guard.js';
import type { Qcow2Metadata } from './metadata.js';

/** What opening an image for writing does with enabled, consistent persistent bitmaps (see Qcow2OpenOptions). */
export type EnabledBitmapsPolicy = 'refuse' | 'mark-inconsistent' | 'take';

/**
 * Applies the open policy for persistent bitmaps of an image opened for writing: which bitmaps
 * the caller takes over, and which must get their in_use flag once nothing else can make the
 * open fail. Refuses (ERR_NOT_IMPLEMENTED) enabled bitmaps the image alone cannot keep up to date.
 */
export async function bitmapsAtOpen(ctx: BitmapContext, policy: EnabledBitmapsPolicy | undefined): Promise<{ taken: StoredBitmap[]; toMark: string[] }> {
  if (policy === 'take') {
    const taken = await loadStoredBitmaps(ctx);
    return { taken, toMark: taken.filter((b) => !b.flags.inUse).map((b) => b.name) };
  }
  const live = (await loadStoredBitmaps(ctx, false)).filter((b) => b.flags.auto && !b.flags.inUse);
  if (live.length > 0 && policy !== 'mark-inconsistent') {
    throw new ShearError(
      'ERR_NOT_IMPLEMENTED',
      `Cannot open qcow2 image for writing: it has enabled persistent bitmap(s) ${live.map((b) => `'${b.name}'`).join(', ')}, which the image alone cannot keep up to date (open with enabledBitmaps 'take' or 'mark-inconsistent')`,
    );
  }
  return { taken: [], toMark: live.map((b) => b.name) };
}

/**
 * The persistent bitmaps of an open image: loading, storing and removing them, and the guard
 * that keeps enabled bitmaps stored consistent honest. Every change to the disk (write, zeroes,
 * discard, outstanding write mapping) enters through `enterChange`, so a store of consistent
 * bitmaps can wait for the changes under way and the next change can first set in_use again.
 */
export class BitmapLifecycle {
  readonly #guard: ImageGuard;
  readonly #md: Qcow2Metadata;
  readonly #file: GrowableIO;
  readonly #diskBytes: number;
  /** The image's cached header, kept in step with the header changes of bitmap operations. */
  readonly #parsed: ParsedHeader;
  readonly #taken: readonly StoredBitmap[];
  /**
   * Enabled bitmaps this image stored consistent (in_use clear): the next change to the disk
   * must set their in_use flag, durably, before it can reach the disk.
   */
  readonly #cleanEnabled = new Set<string>();
  #markingInUse: Promise<void> | null = null;
  /** Changes to the disk under way (writes, zeroes, discards, outstanding write mappings). */
  #changes = 0;
  #whenNoChanges: (() => void)[] = [];
  /** Set while enabled bitmaps are being stored consistent: new changes wait for it. */
  #cleanStore: Promise<void> | null = null;

  constructor(args: { guard: ImageGuard; md: Qcow2Metadata; file: GrowableIO; diskBytes: number; parsed: ParsedHeader; taken: readonly StoredBitmap[] }) {
    this.#guard = args.guard;
    this.#md = args.md;
    this.#file = args.file;
    this.#diskBytes = args.diskBytes;
    this.#parsed = args.parsed;
    this.#taken = args.taken;
  }

  get taken(): readonly StoredBitmap[] {
    return this.#taken;
  }

  #context(): BitmapContext {
    return { file: this.#file, clusterBytes: this.#md.clusterBytes, diskBytes: this.#diskBytes, rc: this.#md.rc, alloc: this.#md.alloc };
  }

  #syncHeader(p: ParsedHeader): void {
    this.#parsed.extensions = p.extensions;
    this.#parsed.header.autoclearFeatures = p.header.autoclearFeatures;
    this.#parsed.header.backingFileOffset = p.header.backingFileOffset;
  }

  async load(opts: { withBits?: boolean }): Promise<StoredBitmap[]> {
    this.#guard.checkOpen('load bitmaps of');
    return this.#md.mutex.run(() => loadStoredBitmaps(this.#context(), opts.withBits ?? true));
  }

  /** See Qcow2Image.storeBitmaps: a consistent store of enabled bitmaps waits for the changes under way and holds new ones back. */
  async store(bitmaps: readonly BitmapToStore[], opts: { inUse: boolean }): Promise<void> {
    this.#guard.checkWritable('store bitmaps in');
    const store = (): Promise<void> =>
      this.#md.mutex.run(async () => {
        this.#syncHeader(await storeBitmapsIn(this.#context(), bitmaps, opts.inUse));
        for (const b of bitmaps) {
          if (b.enabled && !opts.inUse) this.#cleanEnabled.add(b.name);
          else this.#cleanEnabled.delete(b.name);
        }
      });
    if (opts.inUse || !bitmaps.some((b) => b.enabled)) return store();
    while (this.#cleanStore) await this.#cleanStore.catch(() => undefined);
    const done = this.#quiesceThen(store);
    this.#cleanStore = done;
    try {
      await done;
    } finally {
      if (this.#cleanStore === done) this.#cleanStore = null;
    }
  }

  /** Waits until no change to the disk is under way, then runs `fn` (new changes wait for #cleanStore). */
  async #quiesceThen(fn: () => Promise<void>): Promise<void> {
    if (this.#changes > 0) await new Promise<void>((resolve) => this.#whenNoChanges.push(resolve));
    await fn();
  }

  /**
   * Registers a change to the disk (returns the function that ends it). Before the first change
   * after enabled bitmaps were stored consistent, their in_use flag is set and flushed.
   */
  async enterChange(): Promise<() => void> {
    while (this.#cleanStore) await this.#cleanStore.catch(() => undefined);
    this.#changes++;
    let left = false;
    const leave = (): void => {
      if (left) return;
      left = true;
      if (--this.#changes === 0) for (const resolve of this.#whenNoChanges.splice(0)) resolve();
    };
    try {
      if (this.#cleanEnabled.size > 0) await this.#markCleanInUse();
    } catch (err) {
      leave();
      throw err;
    }
    return leave;
  }

  #markCleanInUse(): Promise<void> {
    this.#markingInUse ??= this.#md.mutex
      .run(async () => {
        const names = [...this.#cleanEnabled];
        await markInUse(this.#context(), names);
        for (const n of names) this.#cleanEnabled.delete(n);
      })
      .finally(() => {
        this.#markingInUse = null;
      });
    return this.#markingInUse;
  }

  async remove(names: readonly string[]): Promise<void> {
    this.#guard.checkWritable('remove bitmaps from');
    await this.#md.mutex.run(async () => {
      this.#syncHeader(await removeBitmapsFrom(this.#context(), names));
      for (const n of names) this.#cleanEnabled.delete(n);
    });
  }

  async markInUse(names: readonly string[]): Promise<void> {
    this.#guard.checkWritable('mark bitmaps in use in');
    await this.#md.mutex.run(async () => {
      await markInUse(this.#context(), names);
      for (const n of names) this.#cleanEnabled.delete(n);
    });
  }
}
