import { isHostMappable, type HostExtent, type HostMappable } from '@shear/block';

/** The host mapping a node offers: its own mapRead/mapWrite, or what its hostMapping() returns (graph edges and nodes). */
export function mappingOf(io: unknown): HostMappable | undefined {
  if (isHostMappable(io)) return io;
  const fn = (io as { hostMapping?: unknown } | null)?.hostMapping;
  return typeof fn === 'function' ? ((fn as () => HostMappable | undefined).call(io) ?? undefined) : undefined;
}

/** Appends `x` to `out`, merging it into the last extent when they continue each other. */
export function pushExtent(out: HostExtent[], x: HostExtent): void {
  const last = out[out.length - 1];
  if (last && last.kind === 'zero' && x.kind === 'zero') {
    last.bytes += x.bytes;
    return;
  }
  if (last && last.kind === 'fd' && x.kind === 'fd' && last.fd === x.fd && last.hostOffset + last.bytes === x.hostOffset) {
    last.bytes += x.bytes;
    return;
  }
  out.push({ ...x });
}
