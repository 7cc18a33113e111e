export { CopyBeforeWrite, CBW_INFO, cbwChildPerms, type CopyBeforeWriteOptions, type OnCbwError } from './copy-before-write.js';
export { SnapshotAccess, SNAPSHOT_ACCESS_INFO } from './snapshot-access.js';
export { FleecingCache, FLEECING_CACHE_INFO, CACHE_CHUNK_BYTES, type FleecingCacheOptions, type FleecingCacheStats, type CacheState, type CacheEventSink } from './fleecing-cache.js';
