/**
 * The daemon's control socket: a Unix socket only the daemon's user can open, carrying
 * length-prefixed msgpack frames (frame.ts) of requests, answers and pushed events
 * (protocol.ts). Generic: the methods come from the caller (handlers.ts for a mirror).
 *
 * Thread: the daemon's main thread (the same event loop as the NBD server and the session
 * master; handlers must stay short).
 *
 * Access control (Node has no SO_PEERCRED, so the peer's uid cannot be read cheaply):
 * - the socket is bound under umask 0177 (mode 0600 from the first instant, no window), then
 *   chmod 0600 again and checked (mode 0600, owner = our euid) before any connection is served;
 * - connect(2) on a Unix socket needs write permission on it, so other users get EACCES
 *   (root bypasses the mode, as for any file).
 *
 * Robustness (a control client can never hurt the daemon):
 * - an empty, oversized (> 1 MiB) or undecodable frame, or a frame that is not a request,
 *   closes that connection only, with a logged reason; an unknown method is answered with an
 *   error and then closes it;
 * - bounded: kConnectionsMax connections, kPendingMax unanswered requests per connection,
 *   kBacklogBytesMax bytes queued for a client that does not read (then it is dropped);
 * - a handler that throws answers { ok: false, error: { code, message } }.
 *
 * Invariants:
 * - Each request is answered at most once, and never after its connection closed.
 * - close() leaves no socket file behind (only the one this server bound: checked by inode).
 */
import { chmodSync, lstatSync, unlinkSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { probeUnixSocket } from '../core/listen.js';
import { assert } from '../core/assert.js';
import { EnbdError, describeError, type EnbdErrorCode } from '../core/errors.js';
import type { Logger } from '../core/log.js';
import { FrameDecoder, FrameError, encodeFrame } from './frame.js';
import { ProtocolError, kControlErrorCodes, kControlEvents, parseRequest, type ControlRequest, type ControlResponse } from './protocol.js';

export const kConnectionsMax = 16;
export const kPendingMax = 32;
export const kBacklogBytesMax = 4 * 1024 * 1024;
const kCloseGraceMs = 1000;

/** One client connection, as handlers see it. */
export interface ControlSession {
  readonly id: number;
  /** Set by 'subscribe': the session receives broadcast events. */
  readonly subscribed: boolean;
  /** Per-session state a handler keeps (e.g. the REPL's vm context). */
  readonly state: Map<string, unknown>;
}

export type MethodHandler = (params: Record<string, unknown>, session: ControlSession) => unknown;

export interface ControlServerOptions {
  path: string;
  logger: Logger;
  /** Methods by name; 'subscribe' is built in. */
  handlers: ReadonlyMap<string, MethodHandler>;
  /** Called when the number of subscribed sessions changes. */
  onSubscribersChanged?: (count: number) => void;
}

/** An error a handler throws to answer with a chosen code (EnbdError's code works too). */
export class ControlRequestError extends EnbdError {
  constructor(code: EnbdErrorCode, message: string) {
    super(code, message);
    this.name = 'ControlRequestError';
  }
}

class Connection implements ControlSession {
  subscribed = false;
  readonly state = new Map<string, unknown>();
  readonly decoder = new FrameDecoder();
  pending = 0;
  closing = false;
  constructor(
    readonly id: number,
    readonly socket: Socket,
  ) {}
}

function errorBody(error: unknown): { code: string; message: string } {
  const code = (error as { code?: unknown } | null)?.code;
  const message = error instanceof Error ? error.message : String(error);
  return { code: typeof code === 'string' ? code : kControlErrorCodes.internal, message };
}


export class ControlServer {
  readonly path: string;
  private readonly logger: Logger;
  private readonly handlers: ReadonlyMap<string, MethodHandler>;
  private readonly onSubscribersChanged: (count: number) => void;
  private readonly connections = new Set<Connection>();
  private readonly server: Server;
  private nextConnectionId = 1;
  private inode = -1;
  private closed = false;

  private constructor(options: ControlServerOptions) {
    this.path = options.path;
    this.logger = options.logger;
    this.handlers = options.handlers;
    this.onSubscribersChanged = options.onSubscribersChanged ?? (() => undefined);
    this.server = createServer({ allowHalfOpen: false }, (socket) => this.accept(socket));
  }

  /**
   * Binds the socket (mode 0600 from the start), replacing a stale socket left by a dead daemon;
   * refuses a path that is not a socket or that another process still listens on.
   */
  static async listen(options: ControlServerOptions): Promise<ControlServer> {
    assert(options.path.length > 0, 'options.path is set');
    const control = new ControlServer(options);
    await control.removeStale();
    await control.bind();
    return control;
  }

  private async removeStale(): Promise<void> {
    const state = await probeUnixSocket(this.path, 'control socket');
    if (state === 'absent') return;
    if (state === 'live') {
      throw new EnbdError('ENBD_ERR_CONFIG', `control socket ${this.path} is in use by another process (another enbd?); pass --control PATH or --control none`);
    }
    unlinkSync(this.path);
    this.logger.info({ control: this.path }, 'removed a stale control socket');
  }

  private async bind(): Promise<void> {
    // umask 0177 while binding: the socket file is created 0600, so there is no instant in which
    // another user could connect. Restored once listen() settled (bind may complete later).
    const previousUmask = process.umask(0o177);
    try {
      await new Promise<void>((resolve, reject) => {
        this.server.once('error', reject);
        this.server.listen(this.path, () => {
          this.server.off('error', reject);
          resolve();
        });
      });
    } catch (error) {
      throw new EnbdError('ENBD_ERR_CONFIG', `cannot listen on control socket ${this.path}: ${describeError(error)}`);
    } finally {
      process.umask(previousUmask);
    }
    this.server.on('error', (error) => this.logger.error({ err: error }, 'control socket error'));
    chmodSync(this.path, 0o600);
    const stats = lstatSync(this.path);
    const euid = process.geteuid?.() ?? stats.uid;
    if ((stats.mode & 0o777) !== 0o600 || stats.uid !== euid) {
      await this.close();
      throw new EnbdError('ENBD_ERR_CONFIG', `control socket ${this.path} has mode ${(stats.mode & 0o777).toString(8)} owner ${stats.uid}, expected 600 owner ${euid}`);
    }
    this.inode = stats.ino;
    this.logger.info({ control: this.path }, 'control socket listening (mode 0600)');
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  get subscriberCount(): number {
    let count = 0;
    for (const connection of this.connections) if (connection.subscribed && !connection.closing) count += 1;
    return count;
  }

  /** Pushes { event, data } to every subscribed session. */
  broadcast(event: string, data: unknown): void {
    let frame: Buffer | null = null;
    for (const connection of this.connections) {
      if (!connection.subscribed || connection.closing) continue;
      frame ??= encodeFrame({ event, data });
      this.write(connection, frame);
    }
  }

  private accept(socket: Socket): void {
    if (this.closed || this.connections.size >= kConnectionsMax) {
      this.logger.warn({ connectionsMax: kConnectionsMax }, 'too many control connections; refusing one');
      socket.destroy();
      return;
    }
    const connection = new Connection(this.nextConnectionId, socket);
    this.nextConnectionId += 1;
    this.connections.add(connection);
    this.logger.debug({ controlConnection: connection.id }, 'control client connected');
    socket.on('data', (chunk: Buffer) => this.onData(connection, chunk));
    socket.on('error', (error) => this.logger.debug({ controlConnection: connection.id, err: error }, 'control connection error'));
    socket.on('close', () => {
      const wasSubscribed = connection.subscribed;
      connection.closing = true;
      this.connections.delete(connection);
      this.logger.debug({ controlConnection: connection.id }, 'control client disconnected');
      if (wasSubscribed) this.onSubscribersChanged(this.subscriberCount);
    });
  }

  private onData(connection: Connection, chunk: Buffer): void {
    if (connection.closing) return;
    try {
      connection.decoder.push(chunk, (message) => this.onMessage(connection, message));
    } catch (error) {
      if (!(error instanceof FrameError)) throw error;
      this.drop(connection, `bad frame: ${error.message}`);
    }
  }

  private onMessage(connection: Connection, message: unknown): void {
    if (connection.closing) return;
    let request: ControlRequest;
    try {
      request = parseRequest(message);
    } catch (error) {
      if (!(error instanceof ProtocolError)) throw error;
      if (error.id === null) this.drop(connection, error.message);
      else this.answerAndClose(connection, { id: error.id, ok: false, error: { code: error.code, message: error.message } }, error.message);
      return;
    }
    if (request.method === 'subscribe') {
      this.subscribe(connection, request.id);
      return;
    }
    const handler = this.handlers.get(request.method);
    if (handler === undefined) {
      const text = `unknown method "${request.method}"`;
      this.answerAndClose(connection, { id: request.id, ok: false, error: { code: kControlErrorCodes.unknownMethod, message: text } }, text);
      return;
    }
    if (connection.pending >= kPendingMax) {
      this.answer(connection, { id: request.id, ok: false, error: { code: kControlErrorCodes.busy, message: `more than ${kPendingMax} requests in flight on one connection` } });
      return;
    }
    this.run(connection, request, handler);
  }

  private subscribe(connection: Connection, id: number): void {
    const changed = !connection.subscribed;
    connection.subscribed = true;
    this.answer(connection, { id, ok: true, result: { events: [...kControlEvents] } });
    if (changed) this.onSubscribersChanged(this.subscriberCount);
  }

  private run(connection: Connection, request: ControlRequest, handler: MethodHandler): void {
    connection.pending += 1;
    this.logger.debug({ controlConnection: connection.id, method: request.method, id: request.id }, 'control request');
    new Promise<unknown>((resolve) => resolve(handler(request.params, connection))).then(
      (result) => {
        connection.pending -= 1;
        this.answer(connection, { id: request.id, ok: true, result: result ?? null });
      },
      (error: unknown) => {
        connection.pending -= 1;
        const body = errorBody(error);
        this.logger.debug({ controlConnection: connection.id, method: request.method, error: body }, 'control request failed');
        this.answer(connection, { id: request.id, ok: false, error: body });
      },
    );
  }

  private encode(response: ControlResponse): Buffer {
    try {
      return encodeFrame(response);
    } catch (error) {
      if (!(error instanceof FrameError)) throw error;
      return encodeFrame({ id: response.id, ok: false, error: { code: kControlErrorCodes.internal, message: `the answer cannot be sent: ${error.message}` } });
    }
  }

  private answer(connection: Connection, response: ControlResponse): void {
    if (connection.closing) return;
    this.write(connection, this.encode(response));
  }

  private write(connection: Connection, frame: Buffer): void {
    if (connection.socket.writableLength + frame.length > kBacklogBytesMax) {
      this.drop(connection, `client does not read: more than ${kBacklogBytesMax} bytes queued`);
      return;
    }
    connection.socket.write(frame);
  }

  /** Sends a last answer, then closes the connection (protocol violation with a known id). */
  private answerAndClose(connection: Connection, response: ControlResponse, reason: string): void {
    if (connection.closing) return;
    this.logger.warn({ controlConnection: connection.id, reason }, 'closing a control connection');
    connection.closing = true;
    const socket = connection.socket;
    const timer = setTimeout(() => socket.destroy(), kCloseGraceMs);
    timer.unref();
    socket.end(this.encode(response), () => {
      clearTimeout(timer);
      socket.destroy();
    });
  }

  /** Closes the connection at once with a logged reason (the daemon is unaffected). */
  private drop(connection: Connection, reason: string): void {
    if (connection.closing) return;
    this.logger.warn({ controlConnection: connection.id, reason }, 'closing a control connection');
    connection.closing = true;
    connection.socket.destroy();
  }

  /** Stops listening, drops every connection, removes the socket file it bound. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const connection of this.connections) {
      connection.closing = true;
      connection.socket.destroy();
    }
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    try {
      if (this.inode >= 0 && lstatSync(this.path).ino === this.inode) unlinkSync(this.path);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'ENOENT') this.logger.warn({ err: error, control: this.path }, 'cannot remove the control socket');
    }
  }
}
