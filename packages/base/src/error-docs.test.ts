import t from 'tap';
import { readFileSync } from 'node:fs';
import { ERROR_CODES } from './error-codes.js';

t.test('docs/errors.md documents every code of the registry, with its kind, and nothing else', async (t) => {
  const doc = readFileSync(new URL('../../../docs/errors.md', import.meta.url), 'utf8');
  const rows = new Map<string, string>();
  for (const m of doc.matchAll(/^\| `(ERR_[A-Z0-9_]+)` \| ([a-z-]+) \|/gm)) rows.set(m[1]!, m[2]!);
  for (const [code, kind] of Object.entries(ERROR_CODES)) {
    t.equal(rows.get(code), kind, `${code} is documented as ${kind}`);
  }
  for (const code of rows.keys()) t.ok(code in ERROR_CODES, `${code} in the doc exists in the registry`);
});
