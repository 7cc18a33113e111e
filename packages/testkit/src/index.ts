export { haveTool, requireTools, haveLibnbdPython, requireLibnbdPython, LIBNBD_PYTHON } from './require-tool.js';
export { LeakTracker, installLeakCheck, openFds, childProcesses, type Leak, type FdInfo, type ChildInfo, type LeakCheckOptions } from './leak-check.js';
