export { JOB_TRANSITIONS, JOB_VERBS, checkVerb, checkJobId, type JobStatus, type JobVerb } from './job-states.js';
export { Job, type JobDriver, type JobOptions, type JobEventSink } from './job.js';
export { JobTxn } from './job-txn.js';
export { JobManager, type JobInfo, type BlockJobInfo } from './job-manager.js';
export { BackupJob, checkBackupArgs, type BackupParams, type MirrorSyncMode, type BlockdevOnError } from './backup-job.js';
export { planBackup, type BackupPlan, type BackupPlanParams, type BackupCopyOptions, type BackupSync } from './backup-plan.js';
