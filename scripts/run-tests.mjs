#!/usr/bin/env node
// Runs the whole tap suite and ends with the plain line "N passed, N failed, N skipped" that CI
// reads ("N passed, N failed" first, as before). A test here is a top-level t.test() inside a test
// file (the TAP lines four spaces deep); a file that fails outside any t.test() counts as one
// failed test. A test is skipped when its own line says # SKIP, or when it passed but something
// inside it was skipped (requireTools' loud local skip is an assertion with # SKIP): it did not
// run in full, so it must not count as passed.
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';

const tapBin = new URL('../node_modules/.bin/tap', import.meta.url).pathname;
const args = ['--reporter=tap', ...process.argv.slice(2)];
const child = spawn(tapBin, args, { stdio: ['ignore', 'pipe', 'inherit'] });
let passed = 0;
let failed = 0;
let skipped = 0;
let fileFailedWithoutSubtest = 0;
let inFile = { ok: 0, notOk: 0, skipped: 0 };
let skipInsideTest = false;

const rl = createInterface({ input: child.stdout });
rl.on('line', (line) => {
  const depth1 = /^ {4}(not ok|ok) \d+/.exec(line);
  const depth0 = /^(not ok|ok) \d+ - /.exec(line);
  const skip = /# SKIP/.test(line);
  if (/^ {8,}(not ok|ok) \d+/.test(line) && skip) skipInsideTest = true;
  if (depth1) {
    if (depth1[1] === 'not ok') inFile.notOk++;
    else if (skip || skipInsideTest) inFile.skipped++;
    else inFile.ok++;
    skipInsideTest = false;
  }
  if (depth0) {
    passed += inFile.ok;
    failed += inFile.notOk;
    skipped += inFile.skipped;
    if (depth0[1] === 'not ok' && inFile.notOk === 0) fileFailedWithoutSubtest++;
    inFile = { ok: 0, notOk: 0, skipped: 0 };
    skipInsideTest = false;
  }
  // Passing assertions inside subtests are noise in a CI log; failures and skips are printed whole.
  if (/^ {8,}ok \d+/.test(line) && !skip) return;
  process.stdout.write(line + '\n');
});

child.on('close', (code, signal) => {
  failed += fileFailedWithoutSubtest;
  if ((code !== 0 || signal) && failed === 0) failed = 1;
  process.stdout.write(`${passed} passed, ${failed} failed, ${skipped} skipped\n`);
  process.exit(failed > 0 || code !== 0 ? 1 : 0);
});
