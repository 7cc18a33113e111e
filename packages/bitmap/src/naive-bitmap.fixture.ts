/**
 * The model the shared bitmap is tested against: one byte per granule, every operation written
 * the obvious way. Test-only (not exported from the package index).
 */
export class NaiveBitmap {
  readonly bits: Uint8Array;
  constructor(
    readonly size: number,
    readonly granularity: number,
  ) {
    this.bits = new Uint8Array(Math.ceil(size / granularity));
  }
  set(offset: number, bytes: number): void {
    if (bytes === 0) return;
    const first = Math.floor(offset / this.granularity);
    const last = Math.floor((offset + bytes - 1) / this.granularity);
    this.bits.fill(1, first, last + 1);
  }
  reset(offset: number, bytes: number): void {
    if (bytes === 0) return;
    this.bits.fill(0, offset / this.granularity, Math.ceil((offset + bytes) / this.granularity));
  }
  get(offset: number): boolean {
    return this.bits[Math.floor(offset / this.granularity)] === 1;
  }
  count(): number {
    return this.bits.reduce((a, b) => a + b, 0);
  }
  nextDirty(offset: number, bytes: number): number {
    for (let o = offset; o < offset + bytes; o = (Math.floor(o / this.granularity) + 1) * this.granularity) {
      if (this.get(o)) return o;
    }
    return -1;
  }
  nextClear(offset: number, bytes: number): number {
    for (let o = offset; o < offset + bytes; o = (Math.floor(o / this.granularity) + 1) * this.granularity) {
      if (!this.get(o)) return o;
    }
    return -1;
  }
  nextDirtyArea(offset: number, end: number, maxBytes: number): { offset: number; bytes: number } | null {
    const start = this.nextDirty(offset, end - offset);
    if (start < 0) return null;
    const limit = Math.min(end, start + maxBytes);
    const clean = this.nextClear(start, limit - start);
    return { offset: start, bytes: (clean < 0 ? limit : clean) - start };
  }
  merge(src: NaiveBitmap): void {
    for (let i = 0; i < src.bits.length; i++) {
      if (src.bits[i]) this.set(i * src.granularity, Math.min(src.granularity, src.size - i * src.granularity));
    }
  }
}
