#!/usr/bin/env node
// Builds the optional addon during `npm install` / `npm ci`. A failed build never fails the
// install: @shear/native then loads its pure-JS fallback. The compiler's output goes to
// build/install.log; on failure one warning line says where to look.
//
// node-gyp: npm puts its bundled copy on PATH inside lifecycle scripts and names it in
// npm_config_node_gyp. Node's headers: when npm has no `nodedir`, the headers beside the
// running node (<prefix>/include/node) are used, so no download is attempted.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const packageDir = join(dirname(fileURLToPath(import.meta.url)), '..');
const buildDir = join(packageDir, 'build');
const logPath = join(buildDir, 'install.log');
const strict = process.argv.includes('--strict');

function gypCommand() {
  const candidates = [
    process.env.npm_config_node_gyp,
    // npm's bundled copy, for runs outside an npm lifecycle script
    join(dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'),
  ];
  const script = candidates.find((c) => c && existsSync(c));
  return script ? { cmd: process.execPath, args: [script] } : { cmd: 'node-gyp', args: [] };
}

function nodedirArgs() {
  if (process.env.npm_config_nodedir) return [];
  const prefix = join(dirname(process.execPath), '..');
  return existsSync(join(prefix, 'include', 'node', 'node_api.h')) ? [`--nodedir=${prefix}`] : [];
}

function fail(why) {
  if (strict) {
    process.stderr.write(`@shear/native: addon build failed (${why}); see ${logPath}\n`);
    process.exit(1);
  }
  process.stderr.write(`@shear/native: addon build failed (${why}), using the pure-JS fallback; see ${logPath}\n`);
  process.exit(0);
}

if (process.platform !== 'linux') {
  process.stderr.write(`@shear/native: no addon for ${process.platform}, using the pure-JS fallback\n`);
  process.exit(strict ? 1 : 0);
}

// `node-gyp rebuild` starts by deleting build/, so the output is kept and written afterwards.
const { cmd, args } = gypCommand();
const argv = [...args, 'rebuild', ...nodedirArgs()];
const result = spawnSync(cmd, argv, { cwd: packageDir, stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 64 * 1024 * 1024 });
mkdirSync(buildDir, { recursive: true });
writeFileSync(logPath, `$ ${cmd} ${argv.join(' ')}\n${result.stdout ?? ''}${result.stderr ?? ''}${result.error ? String(result.error) + '\n' : ''}`);
if (result.error) fail(result.error.message);
else if (result.status !== 0) fail(result.signal ? `signal ${result.signal}` : `exit code ${result.status}`);
