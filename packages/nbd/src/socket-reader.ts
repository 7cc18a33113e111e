import type { Socket } from 'node:net';
import { ShearError } from '@shear/base';
import { ByteQueue } from './protocol/byte-queue.js';

/** Bytes buffered before the socket is paused (unless a pending read needs more). */
const DEFAULT_HIGH_WATER_BYTES = 1024 * 1024;

/**
 * Exact-length reads from a socket, for code that reads a protocol as a sequence of awaits.
 * Holds at most max(highWater, the pending read) bytes: beyond that the socket is paused, so
 * a client that sends faster than we serve is slowed by TCP rather than by our memory.
 *
 * Owns nothing but its listeners: dispose() removes them; the socket belongs to the caller.
 */
export class SocketReader {
  readonly #socket: Socket;
  readonly #queue = new ByteQueue();
  readonly #highWater: number;
  #waiter: { bytes: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  #ended: ShearError | null = null;
  readonly #onData = (chunk: Buffer) => this.#data(chunk);
  readonly #onEnd = () => this.#end('the peer closed the connection');
  readonly #onClose = () => this.#end('the connection was closed');
  readonly #onError = (err: Error) => this.#end(`the connection failed: ${err.message}`);

  constructor(socket: Socket, opts: { highWaterBytes?: number } = {}) {
    this.#socket = socket;
    this.#highWater = opts.highWaterBytes ?? DEFAULT_HIGH_WATER_BYTES;
    socket.on('data', this.#onData);
    socket.on('end', this.#onEnd);
    socket.on('close', this.#onClose);
    socket.on('error', this.#onError);
  }

  /** Bytes received and not yet read. */
  get buffered(): number {
    return this.#queue.length;
  }

  /** Whether the peer ended the stream or the socket closed. */
  get ended(): boolean {
    return this.#ended !== null;
  }

  /**
   * The next `bytes` bytes.
   * @throws ERR_NBD_DISCONNECTED when the stream ends first (also for a read already waiting)
   */
  read(bytes: number): Promise<Buffer> {
    if (this.#waiter) return Promise.reject(new ShearError('ERR_INTERNAL', 'Cannot read from the NBD socket: a read is already pending'));
    if (this.#queue.length >= bytes) {
      const out = this.#queue.take(bytes);
      this.#maybeResume();
      return Promise.resolve(out);
    }
    if (this.#ended) return Promise.reject(this.#ended);
    return new Promise<Buffer>((resolve, reject) => {
      this.#waiter = { bytes, resolve, reject };
      this.#maybeResume();
    });
  }

  /**
   * Stops reading and hands back what was received but not read (a protocol switching to
   * another decoder). The reader is disposed.
   */
  release(): Buffer {
    const rest = this.#queue.take(this.#queue.length);
    this.dispose();
    return rest;
  }

  dispose(): void {
    this.#socket.off('data', this.#onData);
    this.#socket.off('end', this.#onEnd);
    this.#socket.off('close', this.#onClose);
    this.#socket.off('error', this.#onError);
    this.#queue.clear();
    this.#end('the reader was disposed');
  }

  #data(chunk: Buffer): void {
    this.#queue.push(chunk);
    const w = this.#waiter;
    if (w && this.#queue.length >= w.bytes) {
      this.#waiter = null;
      w.resolve(this.#queue.take(w.bytes));
    }
    const need = this.#waiter?.bytes ?? 0;
    if (this.#queue.length >= Math.max(this.#highWater, need) && !this.#socket.isPaused()) this.#socket.pause();
  }

  #maybeResume(): void {
    const need = this.#waiter?.bytes ?? 0;
    if (this.#socket.isPaused() && this.#queue.length < Math.max(this.#highWater, need) && !this.#socket.destroyed) this.#socket.resume();
  }

  #end(why: string): void {
    if (!this.#ended) this.#ended = new ShearError('ERR_NBD_DISCONNECTED', `Cannot read from the NBD connection: ${why}`);
    const w = this.#waiter;
    if (w) {
      this.#waiter = null;
      w.reject(this.#ended);
    }
  }
}
