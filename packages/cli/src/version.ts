import { readFileSync } from 'node:fs';

/** The version of the shear command: its package's version (src/ and dist/ sit beside package.json). */
export function shearVersion(): string {
  const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string };
  return pkg.version;
}
