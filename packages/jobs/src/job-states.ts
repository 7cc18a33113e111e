import { ShearError } from '@shear/base';

/** QEMU's JobStatus. */
export type JobStatus =
  | 'undefined'
  | 'created'
  | 'running'
  | 'paused'
  | 'ready'
  | 'standby'
  | 'waiting'
  | 'pending'
  | 'aborting'
  | 'concluded'
  | 'null';

/** QEMU's JobVerb (the ones Shear's jobs accept). */
export type JobVerb = 'cancel' | 'pause' | 'resume' | 'set-speed' | 'complete' | 'finalize' | 'dismiss';

/** Allowed transitions, QEMU's JobSTT as a table: from -> to. */
export const JOB_TRANSITIONS: Readonly<Record<JobStatus, readonly JobStatus[]>> = {
  undefined: ['created'],
  created: ['running', 'aborting', 'null'],
  running: ['paused', 'ready', 'waiting', 'aborting'],
  paused: ['running'],
  ready: ['standby', 'waiting', 'aborting'],
  standby: ['ready'],
  waiting: ['pending', 'aborting'],
  pending: ['aborting', 'concluded'],
  aborting: ['aborting', 'concluded'],
  concluded: ['null'],
  null: [],
};

/** The states in which each verb is accepted, QEMU's JobVerbTable. */
export const JOB_VERBS: Readonly<Record<JobVerb, readonly JobStatus[]>> = {
  cancel: ['created', 'running', 'paused', 'ready', 'standby', 'waiting', 'pending'],
  pause: ['created', 'running', 'paused', 'ready', 'standby'],
  resume: ['created', 'running', 'paused', 'ready', 'standby'],
  'set-speed': ['created', 'running', 'paused', 'ready', 'standby'],
  complete: ['ready'],
  finalize: ['pending'],
  dismiss: ['concluded'],
};

/** @throws ERR_JOB_VERB_NOT_ALLOWED with QEMU's message */
export function checkVerb(id: string, status: JobStatus, verb: JobVerb): void {
  if (!JOB_VERBS[verb].includes(status)) {
    throw new ShearError('ERR_JOB_VERB_NOT_ALLOWED', `Job '${id}' in state '${status}' cannot accept command verb '${verb}'`, { job: id, op: verb });
  }
}

export function checkTransition(id: string, from: JobStatus, to: JobStatus): void {
  if (!JOB_TRANSITIONS[from].includes(to)) {
    throw new ShearError('ERR_INTERNAL', `Job '${id}' cannot go from state '${from}' to '${to}'`, { job: id });
  }
}

/** QEMU's id_wellformed, as job_create checks it. */
export function checkJobId(id: string): void {
  if (typeof id !== 'string' || !/^[A-Za-z][A-Za-z0-9._-]*$/.test(id)) {
    throw new ShearError('ERR_JOB_ID', `Invalid job ID '${id}'`, { job: String(id) });
  }
}
