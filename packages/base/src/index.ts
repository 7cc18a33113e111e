export { ERROR_CODES, kindOf, type ErrorCode, type ErrorKind } from './error-codes.js';
export { ShearError, isShearError, toWire, fromWire, type ErrorContext, type WireError } from './shear-error.js';
export { KiB, MiB, GiB, TiB, isPowerOfTwo, log2Exact, alignDown, alignUp, rangesOverlap, assertRange } from './range.js';
export { throwIfAborted } from './abort.js';
export { Transaction, inTransaction, type TransactionAction } from './transaction.js';
export { ArgReader } from './args.js';
export { crashPoint } from './crash-point.js';
export { silentLogger, type Logger, type LogFields } from './logger.js';
