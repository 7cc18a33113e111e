#!/usr/bin/env node
// The `shear` command as npm links it (node_modules/.bin/shear, so `npx shear` runs it). npm links
// a bin only if its file exists at install time, and dist/ exists only after `npm run build`:
// hence this small file, committed, in front of the built CLI.
import { existsSync } from 'node:fs';

const main = new URL('../dist/main.js', import.meta.url);
if (!existsSync(main)) {
  process.stderr.write('shear: not built yet: run `npm run build` in the repository first\n');
  process.exit(1);
}
await import(main.href);
