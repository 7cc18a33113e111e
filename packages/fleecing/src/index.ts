export { CopyBeforeWrite, CBW_INFO, cbwChildPerms, type CopyBeforeWriteOptions, type OnCbwError } from './copy-before-write.js';
export { SnapshotAccess, SNAPSHOT_ACCESS_INFO } from './snapshot-access.js';
