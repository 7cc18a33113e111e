export { type RequestKind, REQUEST_KINDS, isRequestKind, kindsConflict } from './request-kind.js';
export {
  RequestTable,
  type InFlightRequest,
  type AddOptions,
  type WaitOptions,
  type AcquireOptions,
  type RequestInfo,
} from './request-table.js';
