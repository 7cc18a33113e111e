export { QmpServer, qmpTimestamp, QEMU_COMPAT_VERSION, DEFAULT_MAX_OUTPUT_BYTES, DEFAULT_CLOSE_TIMEOUT_MS, type QmpServerOptions, type QmpEventTimestamp } from './server.js';
export { QmpClient, QmpCommandError, type QmpTarget, type QmpGreeting, type QmpEvent, type QmpClientOptions } from './client.js';
export { CommandRegistry, type QmpHandler, type QmpCommand, type QmpCommandOptions, type QmpCommandContext, type QmpSessionInfo } from './registry.js';
export { QMP_ERROR_CLASSES, isQmpErrorClass, withQmpClass, toQmpError, type QmpErrorClass, type QmpErrorBody, type QmpErrorMapping } from './errors.js';
export { JsonMessageStream, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_TOKENS, QEMU_MAX_NESTING, type JsonStreamLimits, type StreamItem } from './json-stream.js';
export { toQmpJson, quoteJsonString } from './json-writer.js';
export { MAX_QUEUED_REQUESTS } from './session.js';
export type { QmpVersionInfo } from './builtins.js';
