import { assertRange } from '@shear/base';
import type { HostExtent, HostMappable, WriteMapping } from '../host-mapping.js';
import type { FileDriver } from './file.js';

/**
 * A raw file maps one to one onto its fd. Files opened with O_DIRECT are not mapped: worker
 * buffers and request edges would all have to meet the device's alignment; their I/O goes
 * through the driver on the coordinator instead.
 */
export function fileMapping(driver: FileDriver): HostMappable | undefined {
  if (driver.direct) return undefined;
  const extents = (offset: number, bytes: number): HostExtent[] => {
    assertRange(offset, bytes, driver.length, 'mapped range');
    return bytes === 0 ? [] : [{ kind: 'fd', fd: driver.fd, hostOffset: offset, bytes }];
  };
  return {
    async mapRead(offset, bytes) {
      return extents(offset, bytes);
    },
    async mapWrite(offset, bytes): Promise<WriteMapping> {
      return { extents: extents(offset, bytes), commit: async () => {}, abort: async () => {} };
    },
  };
}
