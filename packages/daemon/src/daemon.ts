import type { Logger } from '@shear/base';
import { BlockGraph } from '@shear/block';
import { addBlockdev } from '@shear/blockdev';
import { CopyWorkerPool } from '@shear/block-copy';
import { JobManager } from '@shear/jobs';
import { CommandRegistry, QmpServer } from '@shear/qmp';
import { blockdevContext, type DaemonContext } from './context.js';
import { registerBlockNodeCommands } from './commands/block-nodes.js';
import { registerJobCommands } from './commands/job-commands.js';
import { registerBitmapAndTransactionCommands } from './commands/transaction.js';
import { registerIoCommand } from './commands/io-command.js';
import { registerResourceQuery } from './commands/resources.js';
import { NbdService, registerNbdCommands } from './commands/nbd-commands.js';

export interface DaemonOptions {
  /** QMP on a UNIX socket (mode 0600) and/or loopback TCP. */
  qmp: { path?: string; tcp?: { port: number; host?: string } };
  /** Nodes to open at start, as --blockdev JSON objects (blockdev-add arguments). */
  blockdevs?: unknown[];
  /** Copy worker threads; default the machine's parallelism; 0 = copy on the main thread. */
  workers?: number;
  /** Confine file names given to blockdev-add to these directories. */
  allowedDirs?: string[];
  /** nbd-server-start arguments to run at start (--nbd-server). */
  nbdServer?: Record<string, unknown>;
  /** block-export-add arguments to run at start (--export). */
  exports?: Record<string, unknown>[];
  /** Let the NBD server listen on non-loopback addresses (off: refused). */
  nbdAllowRemote?: boolean;
  log: Logger;
}

/**
 * The daemon: one block graph, one job manager, one worker pool, one QMP server. Owns all of
 * them; shutdown() releases them in order: stop taking commands, drop NBD clients, cancel jobs
 * and wait for them (their events still reach QMP clients), close nodes (parents first), close
 * the QMP connections without waiting for clients to leave, stop the workers.
 */
export class ShearDaemon {
  readonly graph = new BlockGraph();
  readonly jobs: JobManager;
  readonly pool: CopyWorkerPool | undefined;
  readonly qmp: QmpServer;
  readonly log: Logger;
  readonly #ctx: DaemonContext;
  readonly nbd: NbdService;
  #shutdown: Promise<void> | undefined;
  #closed!: () => void;
  /** Resolves once the daemon has shut down (quit, signal, or shutdown()). */
  readonly closed: Promise<void>;

  private constructor(opts: DaemonOptions) {
    this.log = opts.log;
    this.closed = new Promise((resolve) => (this.#closed = resolve));
    const registry = new CommandRegistry();
    this.qmp = new QmpServer({
      ...(opts.qmp.path ? { path: opts.qmp.path } : {}),
      ...(opts.qmp.tcp ? { tcp: opts.qmp.tcp } : {}),
      registry,
      log: opts.log,
      onQuit: () => this.shutdown('quit'),
    });
    this.jobs = new JobManager((event, data) => {
      const job = data['id'] ?? data['device'];
      this.log.info({ evt: `job.${event}`, job: typeof job === 'string' ? job : undefined, ...data }, event);
      this.qmp.emit(event, data);
    });
    this.pool = opts.workers === 0 ? undefined : new CopyWorkerPool(opts.workers !== undefined ? { workers: opts.workers } : {});
    this.#ctx = {
      graph: this.graph,
      jobs: this.jobs,
      pool: this.pool,
      log: opts.log,
      emit: (event, data) => {
        // A refused guest write or a lost snapshot is what an operator must not miss in the log.
        const level = event === 'X_SHEAR_CBW_ERROR' || event === 'X_SHEAR_CACHE_WRITE_FAILED' ? 'warn' : 'info';
        this.log[level]({ evt: `event.${event}`, ...data }, event);
        this.qmp.emit(event, data);
      },
      allowedDirs: opts.allowedDirs,
    };
    registerBlockNodeCommands(registry, this.#ctx);
    registerBitmapAndTransactionCommands(registry, this.#ctx);
    registerJobCommands(registry, this.#ctx);
    registerIoCommand(registry, this.#ctx);
    registerResourceQuery(registry, this.#ctx);
    this.nbd = new NbdService(this.#ctx, { allowRemote: opts.nbdAllowRemote ?? false });
    registerNbdCommands(registry, this.#ctx, this.nbd);
  }

  /** Opens the --blockdev nodes, then starts listening. On failure everything is released. */
  static async start(opts: DaemonOptions): Promise<ShearDaemon> {
    const d = new ShearDaemon(opts);
    try {
      for (const b of opts.blockdevs ?? []) await addBlockdev(d.graph, b, blockdevContext(d.#ctx));
      if (opts.nbdServer) await d.#run('nbd-server-start', opts.nbdServer);
      for (const e of opts.exports ?? []) await d.#run('block-export-add', e);
      await d.qmp.listen();
    } catch (err) {
      await d.shutdown('start failed');
      throw err;
    }
    // A client may have sent quit before the socket was fully set up: then it is over already.
    if (d.#shutdown) return d;
    d.log.info({ evt: 'daemon.started', qmp: opts.qmp, nodes: d.graph.nodes().map((n) => n.name), workers: d.pool?.workers ?? 0 }, 'shear daemon started');
    return d;
  }

  /** Runs a registered command as if it came from QMP (start-up options). */
  async #run(name: string, args: Record<string, unknown>): Promise<void> {
    const cmd = this.qmp.registry.get(name)!;
    await cmd.handler(args, { session: { id: 0, peer: 'command-line' }, id: undefined, signal: new AbortController().signal, log: this.log, afterReply: (fn) => fn() });
  }

  shutdown(reason: string): Promise<void> {
    this.#shutdown ??= this.#doShutdown(reason);
    return this.#shutdown;
  }

  async #doShutdown(reason: string): Promise<void> {
    this.log.info({ evt: 'daemon.stopping', reason }, 'shear daemon stopping');
    const errors: unknown[] = [];
    const step = async (name: string, fn: () => Promise<void>) => {
      try {
        await fn();
      } catch (err) {
        errors.push(err);
        this.log.error({ evt: 'daemon.shutdown_step_failed', step: name, err }, 'shutdown step failed');
      }
    };
    // QMP takes no more commands, but its clients stay connected to see the jobs' events.
    await step('qmp-quiesce', () => this.qmp.quiesce());
    await step('nbd', () => this.nbd.close());
    await step('jobs', () => this.jobs.cancelAll());
    await step('nodes', async () => {
      for (let left = this.graph.nodes(); left.length > 0; left = this.graph.nodes()) {
        // Users (x-shear-io writers, exports) go with the daemon.
        for (const n of left) for (const e of [...n.parentEdges]) if (!('info' in e.parent)) this.graph.detachUser(e);
        const free = left.filter((n) => n.parentEdges.size === 0);
        if (free.length === 0) throw new Error(`nodes still in use: ${left.map((n) => n.name).join(', ')}`);
        for (const n of free) await this.graph.removeNode(n.name);
      }
    });
    // Clients see their socket close once the nodes are flushed and closed; nobody is waited for.
    await step('qmp', () => this.qmp.close());
    await step('workers', async () => this.pool?.destroy());
    this.log.info({ evt: 'daemon.stopped', reason, failedSteps: errors.length }, 'shear daemon stopped');
    this.#closed();
  }
}
