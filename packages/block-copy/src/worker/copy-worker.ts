// piscina worker entry: one copy task per call. Never throws: failures are encoded results.
import { toWire } from '@shear/base';
import type { CopyTaskMessage, CopyTaskResult } from '../protocol.js';
import { runCopyTask } from './copy-handler.js';

export default function copyWorker(task: CopyTaskMessage): CopyTaskResult {
  try {
    return runCopyTask(task);
  } catch (err) {
    return { ok: false, error: toWire(err), doneBytes: 0 };
  }
}
