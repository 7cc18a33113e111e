export {
  BlockCopy,
  DEFAULT_CLUSTER_BYTES,
  DEFAULT_MAX_CHUNK_BYTES,
  DEFAULT_MAX_IN_FLIGHT_BYTES,
  DEFAULT_RETRY_ATTEMPTS,
  DEFAULT_RETRY_BACKOFF_MS,
  DEFAULT_WORKER_CHUNK_BYTES,
  type BlockCopyOptions,
} from './block-copy.js';
export type { CopyProgress, CopyRetry } from './task-lifecycle.js';
export type { Lane } from './task-queue.js';
export { CopyWorkerPool, defaultWorkerCount, type CopyWorkerPoolOptions } from './pool.js';
export { RateLimiter, RATE_SLICE_MS } from './rate-limit.js';
export { executeRange, type CompressTarget, type CopyEndpoint, type ExecuteContext, type RangeOutcome } from './execute-range.js';
export type { CopyTaskMessage, CopyTaskResult, CompressedCluster } from './protocol.js';
