import { ArgReader, ShearError } from '@shear/base';
import { hasHostFile, isBoundedCache, type BlockNode } from '@shear/block';
import { addBlockdev, confinePath, createImage } from '@shear/blockdev';
import { formatQcow2 } from '@shear/qcow2';
import type { JobDriver } from '@shear/jobs';
import type { CommandRegistry } from '@shear/qmp';
import { blockdevContext, type DaemonContext } from '../context.js';

/** The file a node reads from, for query output: its own or its file child's. */
function filenameOf(node: BlockNode): string {
  for (let n: BlockNode | undefined = node; n; n = n.child('file')?.child ?? n.child('image')?.child) {
    if (n.isOpen && hasHostFile(n.driver)) return n.driver.path;
    if (!n.child('file') && !n.child('image')) break;
  }
  return `json:{"driver":"${node.info.name}"}`;
}

function backingDepth(node: BlockNode): number {
  let depth = 0;
  for (let n = node.child('backing')?.child; n; n = n.child('backing')?.child) depth++;
  return depth;
}

/** QEMU's BlockDeviceInfo, with the members Shear can fill. */
export function describeNode(node: BlockNode): Record<string, unknown> {
  const file = filenameOf(node);
  const backing = node.child('backing')?.child;
  const info: Record<string, unknown> = {
    'node-name': node.name,
    drv: node.info.name,
    ro: node.readOnly,
    file,
    encrypted: false,
    'detect_zeroes': 'off',
    bps: 0,
    bps_rd: 0,
    bps_wr: 0,
    iops: 0,
    iops_rd: 0,
    iops_wr: 0,
    'backing_file_depth': backingDepth(node),
    'write_threshold': 0,
    cache: { writeback: true, direct: node.isOpen && hasHostFile(node.driver) ? node.driver.direct : false, 'no-flush': false },
    image: { filename: file, format: node.info.name, 'virtual-size': node.length, 'dirty-flag': false },
    'dirty-bitmaps': node.bitmaps.info(),
  };
  if (node.isOpen && isBoundedCache(node.driver)) info['x-shear-cache'] = node.driver.info();
  if (backing) {
    info['backing_file'] = filenameOf(backing);
    (info['image'] as Record<string, unknown>)['backing-filename'] = filenameOf(backing);
  }
  return info;
}

/**
 * Removes the node and, all the way down, the children created inline with it (generated
 * names) that nothing else uses any more: a qcow2 over an inline blkdebug over an inline file
 * leaves no node, and no descriptor, behind.
 */
async function removeWithInlineChildren(ctx: DaemonContext, name: string): Promise<void> {
  const node = ctx.graph.get(name);
  const inline = node.childEdges.map((e) => e.child).filter((c) => c.name.startsWith('#'));
  try {
    await ctx.graph.removeNode(name);
  } catch (err) {
    // Refused (in use): nothing happened. Failed while closing (a last flush into a failing
    // target): the node is gone all the same, as in QEMU, and what is below it must go too.
    if (ctx.graph.find(name)) throw err;
    ctx.log.warn({ evt: 'node.close-failed', node: name, err }, 'block node removed, but closing it failed');
  }
  for (const c of inline) {
    if (c.parentEdges.size === 0 && ctx.graph.find(c.name)) await removeWithInlineChildren(ctx, c.name).catch(() => {});
  }
}

/** A blockdev-create job: creates an image file, or formats a node as qcow2 (QEMU's JobType 'create'). */
class CreateJob implements JobDriver {
  readonly type = 'create';
  #done = 0;
  constructor(readonly work: () => Promise<void>) {}
  async run(): Promise<void> {
    await this.work();
    this.#done = 1;
  }
  progress() {
    return { offset: this.#done, len: 1 };
  }
}

export function registerBlockNodeCommands(reg: CommandRegistry, ctx: DaemonContext): void {
  reg.register('blockdev-add', async (args) => {
    if (typeof args['node-name'] !== 'string') throw new ShearError('ERR_INVALID_ARGUMENT', "'node-name' must be specified for the root node");
    const node = await addBlockdev(ctx.graph, args, blockdevContext(ctx));
    ctx.log.info({ evt: 'node.added', node: node.name, driver: node.info.name }, 'block node added');
    return {};
  });

  reg.register('blockdev-del', async (args) => {
    const a = new ArgReader(args);
    const name = a.string('node-name');
    a.done();
    const node = ctx.graph.get(name);
    // An x-shear-io writer is like a guest device on the node: it goes with the node.
    for (const e of [...node.parentEdges]) if (!('info' in e.parent) && e.parent.name.startsWith('x-shear-io:')) ctx.graph.detachUser(e);
    await removeWithInlineChildren(ctx, name);
    ctx.log.info({ evt: 'node.removed', node: name }, 'block node removed');
    return {};
  });

  reg.register('query-named-block-nodes', (args) => {
    const a = new ArgReader(args);
    const flat = a.bool('flat', false);
    a.done();
    void flat;
    return ctx.graph.nodes().map(describeNode);
  });

  reg.register('blockdev-create', (args) => {
    const a = new ArgReader(args);
    const jobId = a.string('job-id');
    const o = a.object('options')!;
    a.done();
    ctx.jobs.checkNewId(jobId);
    const driver = o.string('driver');
    let work: () => Promise<void>;
    if (driver === 'file') {
      // --allow-dir confines the files a client creates as well as those it opens.
      const filename = confinePath(o.string('filename'), ctx.allowedDirs);
      const size = o.int('size', { min: 0 })!;
      o.ignore('preallocation', 'nocow', 'extent-size-hint');
      o.done();
      work = () => createImage({ path: filename, format: 'raw', size, exclusive: false });
    } else if (driver === 'qcow2') {
      const fileRef = o.raw('file');
      const size = o.int('size', { min: 0 })!;
      const backingFile = o.string('backing-file', undefined);
      const backingFormat = o.string('backing-fmt', undefined);
      const clusterBytes = o.int('cluster-size', { min: 512, optional: true });
      o.ignore('version', 'preallocation', 'lazy-refcounts', 'refcount-bits', 'compression-type', 'data-file', 'data-file-raw', 'extended-l2', 'encrypt');
      o.done();
      if (typeof fileRef !== 'string') throw new ShearError('ERR_INVALID_ARGUMENT', "Invalid parameter type for 'options.file', expected: string");
      const node = ctx.graph.get(fileRef);
      // Formatted through the node itself (it can grow), as QEMU formats the given node.
      work = async () => {
        await formatQcow2(node, {
          size,
          ...(clusterBytes !== undefined ? { clusterBytes } : {}),
          ...(backingFile !== undefined ? { backingFile } : {}),
          ...(backingFormat !== undefined ? { backingFormat } : {}),
        });
        await node.flush();
      };
    } else {
      throw new ShearError('ERR_NOT_IMPLEMENTED', `Cannot create an image with driver '${driver}': blockdev-create supports file and qcow2`);
    }
    const job = ctx.jobs.create(jobId, new CreateJob(work), { autoDismiss: false });
    job.start();
    return {};
  });
}
