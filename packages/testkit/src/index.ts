export { haveTool, requireNativeAddon, requireTools, skipLoudly, haveLibnbdPython, requireLibnbdPython, LIBNBD_PYTHON } from './require-tool.js';
export { LeakTracker, installLeakCheck, openFds, childProcesses, type Leak, type FdInfo, type ChildInfo, type LeakCheckOptions } from './leak-check.js';
export { runBlockIOConformance, type BlockIOFactory } from './block-conformance.js';
