export type { BlockIO, BlockStatusExtent, WriteOptions, WriteZeroesOptions } from './io.js';
