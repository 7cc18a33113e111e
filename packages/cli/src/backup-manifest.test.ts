import t from 'tap';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, open, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { isShearError } from '@shear/base';
import {
  CHUNK_BYTES,
  buildManifest,
  computeChunkDigests,
  diffChunks,
  finaliseBackup,
  manifestPathFor,
  readManifest,
  validateManifest,
  wholeDigest,
  zeroChunkDigest,
  type ChainView,
} from './backup-manifest.js';

/** A view over a real file, as a raw image reads. */
async function fileView(file: string): Promise<ChainView & { close(): Promise<void>; reads: number }> {
  const fh = await open(file, 'r');
  const { size } = await fh.stat();
  const v = {
    length: size,
    reads: 0,
    async read(offset: number, buf: Uint8Array) {
      v.reads++;
      buf.fill(0);
      await fh.read(buf, 0, buf.length, offset);
    },
    close: () => fh.close(),
  };
  return v;
}

const sha = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

t.test('chunk digests are SHA-256 per MiB, the last chunk short; the whole digest hashes the raw digests', async (t) => {
  const dir = await mkdtemp(path.join(tmpdir(), 'shear-manifest-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const size = 2 * CHUNK_BYTES + 12345;
  const data = randomBytes(size);
  const file = path.join(dir, 'disk.raw');
  await writeFile(file, data);
  const view = await fileView(file);
  t.teardown(() => view.close());
  const chunks = await computeChunkDigests(view);
  t.same(chunks, [sha(data.subarray(0, CHUNK_BYTES)), sha(data.subarray(CHUNK_BYTES, 2 * CHUNK_BYTES)), sha(data.subarray(2 * CHUNK_BYTES))]);
  t.equal(wholeDigest(chunks), sha(Buffer.concat(chunks.map((c) => Buffer.from(c, 'hex')))));
  t.equal(zeroChunkDigest(CHUNK_BYTES), sha(new Uint8Array(CHUNK_BYTES)));

  // Reuse: only chunk 1 is read again; the others come from the parent's list.
  const parent = ['a'.repeat(64), 'b'.repeat(64), 'c'.repeat(64)];
  const before = view.reads;
  const mixed = await computeChunkDigests(view, { only: [1, 1, 7], reuse: parent });
  t.same(mixed, [parent[0], chunks[1], parent[2]]);
  t.equal(view.reads - before, 1);
  await t.rejects(computeChunkDigests(view, { only: [0], reuse: ['a'.repeat(64)] }), { code: 'ERR_INVALID_ARGUMENT' });

  // Zero ranges reported by block status are hashed without reading.
  const zeroView: ChainView = {
    length: CHUNK_BYTES + 10,
    read: () => Promise.reject(new Error('must not read')),
    blockStatus: (offset, bytes) => Promise.resolve([{ offset, bytes, zero: true }]),
  };
  t.same(await computeChunkDigests(zeroView), [zeroChunkDigest(CHUNK_BYTES), zeroChunkDigest(10)]);
});

t.test('diffChunks names every differing chunk with its byte range', async (t) => {
  const a = ['0'.repeat(64), '1'.repeat(64), '2'.repeat(64)];
  const b = ['0'.repeat(64), 'f'.repeat(64), '2'.repeat(64)];
  t.same(diffChunks(a, b, 2 * CHUNK_BYTES + 5), [{ index: 1, offset: CHUNK_BYTES, bytes: CHUNK_BYTES, expected: a[1], actual: b[1] }]);
  t.same(diffChunks(a, a.slice(0, 2), 2 * CHUNK_BYTES + 5), [{ index: 2, offset: 2 * CHUNK_BYTES, bytes: 5, expected: a[2], actual: undefined }]);
});

t.test('finalise order, read back, and typed errors for bad manifests', async (t) => {
  const dir = await mkdtemp(path.join(tmpdir(), 'shear-manifest-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const image = path.join(dir, 'full.raw');
  const partial = path.join(dir, '.full.raw.partial');
  await writeFile(partial, Buffer.alloc(3 * CHUNK_BYTES));
  const chunks = [0, 1, 2].map(() => zeroChunkDigest(CHUNK_BYTES));
  const m = buildManifest({
    kind: 'full',
    image: 'full.raw',
    imageFormat: 'raw',
    disk: { size: 3 * CHUNK_BYTES, identity: 'nbd:vda', source: 'nbd+unix:///vda?socket=/x' },
    parent: null,
    bitmap: null,
    chunks,
    copiedBytes: 0,
    trimmedBytes: 0,
  });
  t.equal(m.sha256, wholeDigest(chunks));
  await t.rejects(readManifest(image), { code: 'ERR_MANIFEST_NOT_FOUND' });
  await finaliseBackup(partial, image, m);
  t.ok((await stat(image)).isFile());
  await t.rejects(stat(partial), { code: 'ENOENT' });
  await t.rejects(stat(manifestPathFor(image) + '.tmp'), { code: 'ENOENT' });
  t.same(await readManifest(image), m);

  const text = await readFile(manifestPathFor(image), 'utf8');
  const bad = async (mutate: (j: Record<string, unknown>) => void, why: RegExp): Promise<void> => {
    const j = JSON.parse(text) as Record<string, unknown>;
    mutate(j);
    await writeFile(manifestPathFor(image), JSON.stringify(j));
    const err = await readManifest(image).then(() => undefined, (e: unknown) => e);
    t.ok(isShearError(err, 'ERR_MANIFEST_INVALID'), `rejected: ${why.source}`);
    t.match((err as Error).message, why);
  };
  await bad((j) => (j['version'] = 2), /version 2 is not supported/);
  await bad((j) => (j['sha256'] = 'f'.repeat(64)), /sha256 does not match/);
  await bad((j) => (j['chunks'] = chunks.slice(0, 2)), /2 chunk digests for a 3145728-byte disk/);
  await bad((j) => (j['kind'] = 'incremental'), /incremental backup lacks a parent/);
  await bad((j) => (j['image'] = '../x'), /image is not a file name/);
  await bad((j) => delete j['disk'], /disk is missing/);
  await writeFile(manifestPathFor(image), '{not json');
  await t.rejects(readManifest(image), { code: 'ERR_MANIFEST_INVALID', message: /not JSON/ });
  t.throws(() => validateManifest([], 'x'), { code: 'ERR_MANIFEST_INVALID' });
});
