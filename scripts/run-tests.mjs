#!/usr/bin/env node
// Runs the whole tap suite and ends with the plain line "N passed, N failed" that CI reads.
// A test here is a top-level t.test() inside a test file (the TAP lines four spaces deep);
// a file that fails outside any t.test() counts as one failed test.
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';

const tapBin = new URL('../node_modules/.bin/tap', import.meta.url).pathname;
const args = ['--reporter=tap', ...process.argv.slice(2)];
const child = spawn(tapBin, args, { stdio: ['ignore', 'pipe', 'inherit'] });
let passed = 0;
let failed = 0;
let fileFailedWithoutSubtest = 0;
let subtestsInFile = { ok: 0, notOk: 0 };

const rl = createInterface({ input: child.stdout });
rl.on('line', (line) => {
  const depth1 = /^ {4}(not ok|ok) \d+/.exec(line);
  const depth0 = /^(not ok|ok) \d+ - /.exec(line);
  if (depth1 && !/# SKIP/.test(line)) {
    if (depth1[1] === 'ok') subtestsInFile.ok++;
    else subtestsInFile.notOk++;
  }
  if (depth0) {
    passed += subtestsInFile.ok;
    failed += subtestsInFile.notOk;
    if (depth0[1] === 'not ok' && subtestsInFile.notOk === 0) fileFailedWithoutSubtest++;
    subtestsInFile = { ok: 0, notOk: 0 };
  }
  // Passing assertions inside subtests are noise in a CI log; failures are printed whole.
  if (/^ {8,}ok \d+/.test(line)) return;
  process.stdout.write(line + '\n');
});

child.on('close', (code, signal) => {
  failed += fileFailedWithoutSubtest;
  if ((code !== 0 || signal) && failed === 0) failed = 1;
  process.stdout.write(`${passed} passed, ${failed} failed\n`);
  process.exit(failed > 0 || code !== 0 ? 1 : 0);
});
