import type { ErrorKind } from '@shear/base';

/**
 * Exit statuses of the shear command, by error kind. Scripts branch on these; they never change.
 *
 * | status | meaning |
 * |---|---|
 * | 0 | success |
 * | 1 | the backup failed (I/O error, worker died, internal error) |
 * | 2 | bad usage or arguments |
 * | 3 | a file or node was not found |
 * | 4 | permission denied, or the target exists (use --force) |
 * | 5 | no space left on the target |
 * | 6 | an image is corrupt or unsupported |
 * | 7 | --verify found a difference |
 * | 130 | interrupted (SIGINT) |
 * | 143 | terminated (SIGTERM) |
 */
export const EXIT = {
  OK: 0,
  FAILED: 1,
  USAGE: 2,
  NOT_FOUND: 3,
  PERMISSION: 4,
  NO_SPACE: 5,
  CORRUPT: 6,
  VERIFY_MISMATCH: 7,
  INTERRUPTED: 130,
  TERMINATED: 143,
} as const;

export function exitCodeFor(kind: ErrorKind): number {
  switch (kind) {
    case 'invalid-argument':
    case 'out-of-bounds':
      return EXIT.USAGE;
    case 'not-found':
      return EXIT.NOT_FOUND;
    case 'permission':
    case 'busy':
      return EXIT.PERMISSION;
    case 'no-space':
      return EXIT.NO_SPACE;
    case 'corrupt':
    case 'unsupported':
      return EXIT.CORRUPT;
    case 'cancelled':
      return EXIT.INTERRUPTED;
    default:
      return EXIT.FAILED;
  }
}
