import { ShearError } from '@shear/base';
import {
  COMPRESSION_ZLIB,
  COMPRESSION_ZSTD,
  INCOMPAT_COMPRESSION_TYPE,
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTENDED_L2,
  KNOWN_INCOMPAT,
  describeFeatureBits,
  type ParsedHeader,
} from './header.js';

/**
 * Refuses images Shear cannot read or, when `writable`, cannot write safely. Every refusal
 * names the feature so the operator knows what to convert or repair.
 */
export function checkOpenable(p: ParsedHeader, writable: boolean): void {
  const h = p.header;
  const unknown = h.incompatibleFeatures & ~KNOWN_INCOMPAT;
  if (unknown !== 0n) {
    throw new ShearError(
      'ERR_QCOW2_UNKNOWN_FEATURE',
      `Cannot open qcow2 image: it uses unknown incompatible features (${describeFeatureBits(unknown, 0, p.featureNames)})`,
    );
  }
  if (h.incompatibleFeatures & INCOMPAT_DATA_FILE) {
    throw new ShearError('ERR_NOT_IMPLEMENTED', 'Cannot open qcow2 image: external data files are not supported');
  }
  if (h.incompatibleFeatures & INCOMPAT_EXTENDED_L2) {
    throw new ShearError('ERR_NOT_IMPLEMENTED', 'Cannot open qcow2 image: extended L2 entries (subclusters) are not supported');
  }
  if (h.incompatibleFeatures & INCOMPAT_COMPRESSION_TYPE) {
    if (h.compressionType === COMPRESSION_ZLIB) {
      throw new ShearError('ERR_QCOW2_CORRUPT', 'Cannot open qcow2 image: the compression type bit is set but compression_type is zlib');
    }
    if (h.compressionType !== COMPRESSION_ZSTD) {
      throw new ShearError('ERR_QCOW2_UNKNOWN_FEATURE', `Cannot open qcow2 image: compression type ${h.compressionType} is unknown`);
    }
  } else if (h.compressionType !== COMPRESSION_ZLIB) {
    throw new ShearError('ERR_QCOW2_CORRUPT', `Cannot open qcow2 image: compression_type is ${h.compressionType} but the compression type bit is clear`);
  }
  if (h.cryptMethod !== 0) {
    throw new ShearError('ERR_NOT_IMPLEMENTED', `Cannot open qcow2 image: encryption (crypt_method ${h.cryptMethod}) is not supported`);
  }
  if (!writable) return;
  if (h.version < 3) {
    throw new ShearError('ERR_NOT_IMPLEMENTED', 'Cannot open qcow2 image for writing: version 2 (compat=0.10) images are read-only in Shear; convert with qemu-img amend -o compat=1.1');
  }
  if (h.incompatibleFeatures & INCOMPAT_DIRTY) {
    throw new ShearError(
      'ERR_QCOW2_NEEDS_REPAIR',
      "Cannot open qcow2 image for writing: it is marked dirty (its refcounts may be wrong); repair it with 'qemu-img check -r all' first",
    );
  }
  if (h.incompatibleFeatures & INCOMPAT_CORRUPT) {
    throw new ShearError(
      'ERR_QCOW2_NEEDS_REPAIR',
      "Cannot open qcow2 image for writing: it is marked corrupt; repair it with 'qemu-img check -r all' first",
    );
  }
  if (h.nbSnapshots > 0) {
    throw new ShearError('ERR_NOT_IMPLEMENTED', `Cannot open qcow2 image for writing: it has ${h.nbSnapshots} internal snapshot(s), which Shear does not maintain`);
  }
}
