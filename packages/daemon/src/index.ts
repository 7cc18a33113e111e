export { ShearDaemon, type DaemonOptions } from './daemon.js';
export type { DaemonContext } from './context.js';
export { describeNode } from './commands/block-nodes.js';
export { bitmapSha256 } from './commands/bitmap-actions.js';
