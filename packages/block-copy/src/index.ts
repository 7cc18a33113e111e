export {
  BlockCopy,
  DEFAULT_CLUSTER_BYTES,
  DEFAULT_MAX_CHUNK_BYTES,
  DEFAULT_MAX_IN_FLIGHT_BYTES,
  DEFAULT_RETRY_ATTEMPTS,
  DEFAULT_RETRY_BACKOFF_MS,
  DEFAULT_WORKER_CHUNK_BYTES,
  type BlockCopyOptions,
  type CopyProgress,
  type Lane,
} from './block-copy.js';
export { CopyWorkerPool, defaultWorkerCount, type CopyWorkerPoolOptions } from './pool.js';
export { RateLimiter, RATE_SLICE_MS } from './rate-limit.js';
export { executeRange, type CompressTarget, type CopyEndpoint, type ExecuteContext, type RangeOutcome } from './execute-range.js';
export type { CopyTaskMessage, CopyTaskResult, CompressedCluster } from './protocol.js';
