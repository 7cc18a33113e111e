export { NbdServer, DEFAULT_HANDSHAKE_TIMEOUT_MS, type NbdServerOptions, type RemoveMode } from './server/server.js';
export { type NbdExportOptions, type NbdExportInfo } from './server/export.js';
export { MAX_INFLIGHT_REQUESTS } from './server/connection.js';
export { NbdClientDriver, DEFAULT_CLIENT_MAX_INFLIGHT, DEFAULT_CONNECT_TIMEOUT_MS, type NbdClientOptions, type NbdContextExtent } from './client/driver.js';
export { type BlockSizes } from './client/handshake.js';
export { isLoopbackHost, isNbdUri, nbdUri, parseNbdUri, parsePort, type NbdAddress, type NbdBoundAddress, type NbdExportRef } from './address.js';
export { nbdErrorFor, errorFromNbd, NBD_ERRNO_NAMES } from './errors.js';
export * as protocol from './protocol/index.js';
