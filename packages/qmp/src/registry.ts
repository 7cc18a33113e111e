import { ShearError, type Logger } from '@shear/base';
import type { QmpErrorMapping } from './errors.js';

/** What a handler may know about the connection that sent the command. */
export interface QmpSessionInfo {
  /** Unique per server, counting from 1. */
  readonly id: number;
  /** "unix" or "tcp:<address>:<port>". */
  readonly peer: string;
}

export interface QmpCommandContext {
  readonly session: QmpSessionInfo;
  /** The command's `id` member as sent, or undefined when there was none. */
  readonly id: unknown;
  /**
   * Fires when the result can no longer be delivered: the client disconnected or the server is
   * closing. Long commands check it and stop early; the reply of a cancelled command is dropped
   * when nobody is left to read it.
   */
  readonly signal: AbortSignal;
  readonly log: Logger;
  /** Runs `fn` once the reply has been written (e.g. `quit` stops the daemon after replying). */
  afterReply(fn: () => void): void;
}

/**
 * A command. `args` is the `arguments` member (an object; `{}` when absent), not validated: the
 * handler validates it completely (ArgReader from @shear/base) before any side effect, and
 * throws ShearError for bad input. The return value is the reply's `return` member (undefined
 * becomes `{}`).
 */
export type QmpHandler = (args: Record<string, unknown>, ctx: QmpCommandContext) => unknown;

export interface QmpCommandOptions extends QmpErrorMapping {}

export interface QmpCommand extends QmpCommandOptions {
  readonly name: string;
  readonly handler: QmpHandler;
}

/** Command names as QEMU spells them: letters, digits, '-', '_' and '.' (downstream '__' too). */
const COMMAND_NAME = /^[A-Za-z_][A-Za-z0-9_.-]*$/;

/** The commands a server offers, by name, in registration order (query-commands lists them so). */
export class CommandRegistry {
  readonly #commands = new Map<string, QmpCommand>();

  /** @throws ERR_QMP_COMMAND_EXISTS if `name` is taken, ERR_INVALID_ARGUMENT for a malformed name */
  register(name: string, handler: QmpHandler, opts: QmpCommandOptions = {}): void {
    if (!COMMAND_NAME.test(name)) {
      throw new ShearError('ERR_INVALID_ARGUMENT', `Cannot register QMP command '${name}': the name is malformed`);
    }
    if (this.#commands.has(name)) {
      throw new ShearError('ERR_QMP_COMMAND_EXISTS', `Cannot register QMP command '${name}': a command with this name exists`);
    }
    this.#commands.set(name, { ...opts, name, handler });
  }

  unregister(name: string): boolean {
    return this.#commands.delete(name);
  }

  get(name: string): QmpCommand | undefined {
    return this.#commands.get(name);
  }

  has(name: string): boolean {
    return this.#commands.has(name);
  }

  names(): string[] {
    return [...this.#commands.keys()];
  }
}
