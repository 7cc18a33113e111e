export { ShearDaemon, type DaemonOptions } from './daemon.js';
export type { DaemonContext, DaemonLogger } from './context.js';
export { describeNode } from './commands/block-nodes.js';
export { bitmapSha256 } from './commands/bitmap-actions.js';
