/**
 * Client end of the control socket, for the CLI (`enbd status`, `enbd leg ...`, `enbd repl`)
 * and tests: connects, sends requests with increasing ids, matches answers by id, and hands
 * pushed events to a listener.
 *
 * Thread: the CLI's main thread.
 *
 * Errors are ControlError with a message for a person (the CLI prints `enbd: error: MESSAGE`):
 * reason 'connect' (no socket, refused, permission denied; the message names the path),
 * 'remote' (the daemon answered ok: false; remoteCode is its code), 'closed' (the connection
 * ended with requests unanswered), 'protocol' (the daemon sent something unreadable),
 * 'timeout'.
 */
import { lstatSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { assert } from '../core/assert.js';
import { EnbdError } from '../core/errors.js';
import { FrameDecoder, FrameError, encodeFrame } from './frame.js';
import { ProtocolError, parseServerMessage, type ControlEvent, type ControlMethod, type ControlResults } from './protocol.js';

export type ControlErrorReason = 'connect' | 'remote' | 'closed' | 'protocol' | 'timeout';

/** Code ENBD_ERR_CONTROL; `reason` says what went wrong, `remoteCode` the daemon's code. */
export class ControlError extends EnbdError {
  readonly reason: ControlErrorReason;
  /** The daemon's error code (reason 'remote') or the socket's errno code (reason 'connect'). */
  readonly remoteCode: string | null;
  constructor(reason: ControlErrorReason, message: string, remoteCode: string | null = null) {
    super('ENBD_ERR_CONTROL', message);
    this.name = 'ControlError';
    this.reason = reason;
    this.remoteCode = remoteCode;
  }
}

const kConnectTimeoutMs = 5000;
export const kCallTimeoutMsDefault = 120_000;

function isSocket(path: string): boolean {
  try {
    return lstatSync(path).isSocket();
  } catch {
    return false;
  }
}

function connectMessage(path: string, error: NodeJS.ErrnoException): string {
  switch (error.code) {
    case 'ENOENT':
      return `no control socket at ${path} (is enbd mirror running? its control socket is --control PATH, by default <socket>.ctl)`;
    case 'ECONNREFUSED':
      return isSocket(path)
        ? `nothing listens on control socket ${path} (a stale socket left by a stopped daemon?)`
        : `${path} is not a socket (pass the daemon's control socket with --control PATH)`;
    case 'EACCES':
    case 'EPERM':
      return `permission denied on control socket ${path} (${error.code}): it is mode 0600 and belongs to the daemon's user; run this as that user`;
    case 'ENOTSOCK':
      return `${path} is not a socket`;
    default:
      return `cannot connect to control socket ${path}: ${error.message}`;
  }
}

interface PendingCall {
  resolve: (result: unknown) => void;
  reject: (error: ControlError) => void;
  timer: NodeJS.Timeout;
}

export class ControlClient {
  readonly path: string;
  private readonly socket: Socket;
  private readonly decoder = new FrameDecoder();
  private readonly pending = new Map<number, PendingCall>();
  private nextId = 1;
  private closedError: ControlError | null = null;
  private eventListener: ((event: ControlEvent) => void) | null = null;
  private readonly closeListeners: Array<(error: ControlError | null) => void> = [];
  private closingByUs = false;

  private constructor(path: string, socket: Socket) {
    this.path = path;
    this.socket = socket;
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (error) => this.fail(new ControlError('closed', `control connection to ${path} failed: ${error.message}`)));
    socket.on('close', () => this.fail(new ControlError('closed', `the daemon closed the control connection (${path})`)));
  }

  /** Connects to the daemon's control socket; rejects with a ControlError naming the path. */
  static async connect(path: string, timeoutMs = kConnectTimeoutMs): Promise<ControlClient> {
    assert(path.length > 0, 'a control socket path');
    return await new Promise((resolve, reject) => {
      const socket = connect(path);
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new ControlError('timeout', `control socket ${path} did not accept within ${timeoutMs} ms`));
      }, timeoutMs);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        resolve(new ControlClient(path, socket));
      });
      socket.once('error', (error: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        socket.destroy();
        reject(new ControlError('connect', connectMessage(path, error), error.code ?? null));
      });
    });
  }

  /** Calls a method; resolves with its result, rejects with a ControlError. */
  async call<M extends ControlMethod>(method: M, params: Record<string, unknown> = {}, timeoutMs = kCallTimeoutMsDefault): Promise<ControlResults[M]> {
    return (await this.callRaw(method, params, timeoutMs)) as ControlResults[M];
  }

  /** Calls any method name (tests use it for unknown methods). */
  async callRaw(method: string, params: Record<string, unknown> = {}, timeoutMs = kCallTimeoutMsDefault): Promise<unknown> {
    if (this.closedError !== null) throw this.closedError;
    const id = this.nextId;
    this.nextId += 1;
    const frame = encodeFrame({ id, method, params });
    return await new Promise<unknown>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new ControlError('timeout', `${method}: no answer from the daemon within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      this.socket.write(frame);
    });
  }

  /** Subscribes to the daemon's events (leg-state, leg-added, leg-removed, resync-progress, log-level). */
  async subscribe(listener: (event: ControlEvent) => void): Promise<void> {
    this.eventListener = listener;
    await this.call('subscribe');
  }

  /** Called once when the connection ends (error null when we closed it ourselves). */
  onClose(listener: (error: ControlError | null) => void): void {
    this.closeListeners.push(listener);
  }

  get isClosed(): boolean {
    return this.closedError !== null;
  }

  close(): void {
    this.closingByUs = true;
    this.socket.destroy();
  }

  private onData(chunk: Buffer): void {
    try {
      this.decoder.push(chunk, (message) => this.onMessage(message));
    } catch (error) {
      if (!(error instanceof FrameError) && !(error instanceof ProtocolError)) throw error;
      this.fail(new ControlError('protocol', `unreadable message from the daemon: ${error.message}`));
      this.socket.destroy();
    }
  }

  private onMessage(value: unknown): void {
    const message = parseServerMessage(value);
    if (message.kind === 'event') {
      this.eventListener?.({ event: message.event, data: message.data });
      return;
    }
    const call = this.pending.get(message.id);
    if (call === undefined) return; // timed out already
    this.pending.delete(message.id);
    clearTimeout(call.timer);
    if (message.ok) call.resolve(message.result);
    else call.reject(new ControlError('remote', message.error.message, message.error.code));
  }

  private fail(error: ControlError): void {
    if (this.closedError !== null) return;
    this.closedError = error;
    for (const call of this.pending.values()) {
      clearTimeout(call.timer);
      call.reject(error);
    }
    this.pending.clear();
    const reported = this.closingByUs ? null : error;
    for (const listener of this.closeListeners.splice(0)) listener(reported);
  }
}
