// The pattern the test guest writes to its disk, and the checks a backup of that disk must pass.
// Every 4 KiB block is either zero (never written) or BLOCK / LINE_BYTES copies of one line
// "SHEARVM b=<block number> g=<generation>\n". A block whose lines differ, or whose number is not
// its own, is torn or misplaced; comparing generations with a copy taken at the backup's point in
// time finds blocks from another point (a mixed backup).

export const BLOCK = 4096;
/** Blocks one guest generation writes, consecutively. */
export const CHUNK_BLOCKS = 64;
/** Prefix of every pattern line and of the guest's console reports. */
export const MARK = 'SHEARVM';
/** "SHEARVM b=0000000000 g=00000000\n" */
export const LINE_BYTES = 32;
const LINE = /^SHEARVM b=(\d{10}) g=(\d{8})\n$/;

/** A block's generation: 0 when it is zero, or null when it is not a whole pattern block for `index`. */
export function blockGeneration(block: Buffer, index: number): number | null {
  if (block.every((b) => b === 0)) return 0;
  const first = block.subarray(0, LINE_BYTES);
  const m = LINE.exec(first.toString('latin1'));
  if (!m || Number(m[1]) !== index) return null;
  for (let off = LINE_BYTES; off < block.length; off += LINE_BYTES) {
    if (!block.subarray(off, off + LINE_BYTES).equals(first)) return null;
  }
  return Number(m[2]);
}

export interface PatternScan {
  /** Generation of each block (0: never written). */
  generations: Uint32Array;
  /** Blocks that are neither zero nor a whole pattern block of their own number. */
  torn: number[];
  /** Highest generation seen. */
  newest: number;
}

export function scanPattern(image: Buffer): PatternScan {
  if (image.length % BLOCK !== 0) throw new Error(`image size ${image.length} is not a multiple of ${BLOCK}`);
  const n = image.length / BLOCK;
  const generations = new Uint32Array(n);
  const torn: number[] = [];
  let newest = 0;
  for (let i = 0; i < n; i++) {
    const g = blockGeneration(image.subarray(i * BLOCK, (i + 1) * BLOCK), i);
    if (g === null) torn.push(i);
    else {
      generations[i] = g;
      if (g > newest) newest = g;
    }
  }
  return { generations, torn, newest };
}

export interface PointInTimeCheck {
  /** Blocks torn or misplaced in the backup. */
  torn: number[];
  /** Blocks whose generation differs from the copy taken at the point in time: "block:backup/copy". */
  mixed: string[];
  /** Blocks written by the guest at all (non-zero) in the copy. */
  written: number;
  newest: number;
}

/**
 * Checks a restored backup against the copy of the disk taken while the VM was paused at the
 * backup's point in time. Byte equality is checked separately; this names what went wrong.
 */
export function checkPointInTime(backup: Buffer, copy: Buffer): PointInTimeCheck {
  if (backup.length !== copy.length) throw new Error(`backup is ${backup.length} bytes, the copy ${copy.length}`);
  const b = scanPattern(backup);
  const c = scanPattern(copy);
  if (c.torn.length) throw new Error(`the paused copy itself has torn blocks (${c.torn.slice(0, 5).join(', ')}...): the guest's pattern is broken`);
  const torn = new Set(b.torn);
  const mixed: string[] = [];
  let written = 0;
  for (let i = 0; i < c.generations.length; i++) {
    if (c.generations[i]) written++;
    if (!torn.has(i) && b.generations[i] !== c.generations[i]) mixed.push(`${i}:${b.generations[i]}/${c.generations[i]}`);
  }
  return { torn: b.torn, mixed, written, newest: c.newest };
}

/** Blocks whose content differs between two images of the same size. */
export function changedBlocks(a: Buffer, b: Buffer): number[] {
  const out: number[] = [];
  for (let i = 0; i * BLOCK < a.length; i++) {
    if (!a.subarray(i * BLOCK, (i + 1) * BLOCK).equals(b.subarray(i * BLOCK, (i + 1) * BLOCK))) out.push(i);
  }
  return out;
}
