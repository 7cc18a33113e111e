// Loaded into every tap test process with `--import=@shear/testkit/leak-check` (.taprc): records
// what is open when the process starts and fails the test file if anything more is still open
// when it ends. See leak-check.ts.
import { installLeakCheck } from './leak-check.js';

installLeakCheck();
