/**
 * NBD server: listens on Unix sockets and/or TCP, accepts clients, and serves one export
 * backed by a BlockDevice. Owns the device's completion handler and routes each completion to
 * the connection that submitted it (token = connection index << 8 | record index).
 *
 * Thread: main thread (session master).
 *
 * Abuse bounds (issue 10): at most `connectionsMax` connections (more are closed at once, the
 * refusals logged at most once a second); a handshake must finish within `handshakeTimeoutMs`;
 * a client that stops sending in the middle of a request is closed after `payloadTimeoutMs`;
 * each connection keeps to a fair share of the device's buffers (buffer-share.ts). The two
 * timeouts are enforced by one sweep timer (every quarter of the shorter timeout, 10 ms to
 * 1 s), so nothing is armed or allocated per request. The check runs in a setImmediate after
 * the timer, once pending socket data was read, and a sweep that comes more than two periods
 * late credits no time: a stalled event loop or a stopped process never times clients out.
 *
 * Invariants:
 * - A connection index is reused only after that connection closed AND every request it had
 *   at the device completed (ServerConnection.reusable), so no completion is misrouted.
 * - A client's bytes can only close that client's connection; nothing a client sends throws
 *   out of a socket callback (errors are caught per connection and logged).
 */
import type { MetaContextSource } from './meta-contexts.js';
import { checkUnixFree, listenOn } from '../../core/listen.js';
import { createServer, type Server, type Socket } from 'node:net';
import { lstatSync, unlinkSync } from 'node:fs';
import { createLogger, type Logger } from '../../core/log.js';
import type { BlockDevice } from '../../core/block-device.js';
import { assert, isPowerOfTwo } from '../../core/assert.js';
import { withTimeout } from '../../core/timeout.js';
import { OptionError } from '../../core/errors.js';
import * as p from '../protocol.js';
import type { ExportDescriptor } from './server-options.js';
import { ServerConnection, type ConnectionHost } from './server-connection.js';
import { kRequestIndexBits, kRequestsPerConnection } from './server-records.js';
import { BufferShare } from './buffer-share.js';
import type { ServerTls } from './server-tls.js';

export interface NbdServerOptions {
  device: BlockDevice;
  /** Canonical export name; the default export "" reaches it too. */
  exportName?: string;
  description?: string;
  logger?: Logger;
  /** Largest READ/WRITE payload accepted and advertised (default 32 MiB). */
  maximumPayloadBytes?: number;
  /** Serve read-only even if the device can write. */
  readOnly?: boolean;
  /** Most clients at once (default 128); more are closed at once. */
  connectionsMax?: number;
  /** A client must finish option negotiation within this (default 10000 ms; 0 = no limit). */
  handshakeTimeoutMs?: number;
  /**
   * A client in the middle of a request (WRITE payload or header) that sends nothing for this
   * long is disconnected and its buffers released (default 30000 ms; 0 = no limit).
   */
  payloadTimeoutMs?: number;
  /**
   * Receive WRITE payloads straight into the device's buffers with net.Socket `onread`
   * (large payloads skip the copy from Node's read buffer). Default false.
   */
  directReceive?: boolean;
  /**
   * TLS offered (mode on) or required (mode require), from loadServerTls; null/absent = off.
   * Direct receive is not used when TLS is configured (TLS records are decrypted by node:tls).
   */
  tls?: ServerTls | null;
  /** Status contexts beyond base:allocation (the mirror's checkpoints and dirty maps). */
  metaContexts?: MetaContextSource | null;
}

export const kConnectionsMaxDefault = 128;
export const kHandshakeTimeoutMsDefault = 10_000;
export const kPayloadTimeoutMsDefault = 30_000;
/** Largest timeout accepted (setInterval/setTimeout limit). */
export const kTimeoutMsMax = 0x7fff_ffff;
/** How long a graceful close waits for in-flight requests and replies to drain. */
export const kShutdownDrainMs = 10_000;
export const kConnectionsMaxLimit = (0x7fff_ffff >>> kRequestIndexBits) - 1;
/** Refused connections are logged at most this often (with a count). */
const kRefusalLogIntervalMs = 1000;
const kSweepIntervalMsMin = 10;
const kSweepIntervalMsMax = 1000;

function checkTimeout(value: number, what: string): number {
  if (!Number.isInteger(value) || value < 0 || value > kTimeoutMsMax) {
    throw new OptionError('ENBD_ERR_OPTION', `options.${what} must be an integer from 0 to ${kTimeoutMsMax}`);
  }
  return value;
}

/** Sweep period for the timeouts: a quarter of the shorter enabled one; 0 when none is. */
export function sweepIntervalMsFor(handshakeTimeoutMs: number, payloadTimeoutMs: number): number {
  const enabled = [handshakeTimeoutMs, payloadTimeoutMs].filter((timeoutMs) => timeoutMs > 0);
  if (enabled.length === 0) return 0;
  const quarter = Math.floor(Math.min(...enabled) / 4);
  return Math.min(kSweepIntervalMsMax, Math.max(kSweepIntervalMsMin, quarter));
}

export function transmissionFlagsFor(device: BlockDevice, readOnly: boolean): number {
  const features = device.features;
  let flags = p.kTxFlagHasFlags | p.kTxFlagSendDf | p.kTxFlagSendCache;
  if (readOnly || features.readOnly) flags |= p.kTxFlagReadOnly;
  if (features.flush) flags |= p.kTxFlagSendFlush;
  if (features.fua && !(readOnly || features.readOnly)) flags |= p.kTxFlagSendFua;
  if (features.rotational) flags |= p.kTxFlagRotational;
  if (features.multiConn) flags |= p.kTxFlagCanMultiConn;
  if (!(readOnly || features.readOnly)) {
    if (features.trim) flags |= p.kTxFlagSendTrim;
    if (features.writeZeroes) flags |= p.kTxFlagSendWriteZeroes | p.kTxFlagSendFastZero;
  }
  return flags;
}

export class NbdServer implements ConnectionHost {
  readonly device: BlockDevice;
  readonly exportDescriptor: ExportDescriptor;
  readonly fastZero: boolean;
  readonly bufferShare: BufferShare | null;
  readonly tls: ServerTls | null;
  readonly metaContexts: MetaContextSource | null;
  private readonly logger: Logger;
  private readonly connections: (ServerConnection | null)[] = [];
  private readonly stalledConnections = new Set<ServerConnection>();
  private readonly listeners: Server[] = [];
  /** Unix sockets this server bound, with their inode: close() unlinks only those very files. */
  private readonly unixPaths: Array<{ path: string; inode: number }> = [];
  private connectionsMax: number;
  private wakeScheduled = false;
  private nextConnectionId = 1;
  private closing = false;
  private readonly idleWaiters: (() => void)[] = [];
  private readonly directReceive: boolean;
  private handshakeTimeoutMs: number;
  private payloadTimeoutMs: number;
  private sweepIntervalMs: number;
  private sweepTimer: NodeJS.Timeout | null = null;
  private readonly sweepBound = (): void => {
    setImmediate(this.checkTimeoutsBound);
  };
  private readonly checkTimeoutsBound = (): void => this.checkTimeouts();
  private lastSweepMs = -1;
  private readonly wakeBound = (): void => this.resumeStalled();
  /** Refused connections not logged yet, when the last refusal log was, and the total. */
  private refusalsPending = 0;
  private refusalLoggedAtMs = -Infinity;
  private refusalsTotal = 0;
  /** Payload bytes copied from socket chunks (closed connections; open ones add theirs). */
  private payloadBytesCopiedClosed = 0;
  private payloadBytesDirectClosed = 0;

  constructor(options: NbdServerOptions) {
    const device = options.device;
    const maximumPayloadBytes = options.maximumPayloadBytes ?? p.kDefaultPayloadBytesMax;
    if (!Number.isInteger(maximumPayloadBytes) || maximumPayloadBytes < 4096 || maximumPayloadBytes > 0x7fff_ffff) {
      throw new OptionError('ENBD_ERR_OPTION', 'options.maximumPayloadBytes must be an integer from 4096 to 2^31-1');
    }
    const connectionsMax = options.connectionsMax ?? kConnectionsMaxDefault;
    if (!Number.isInteger(connectionsMax) || connectionsMax < 1 || connectionsMax > kConnectionsMaxLimit) {
      throw new OptionError('ENBD_ERR_OPTION', `options.connectionsMax must be an integer from 1 to ${kConnectionsMaxLimit}`);
    }
    const handshakeTimeoutMs = checkTimeout(
      options.handshakeTimeoutMs ?? kHandshakeTimeoutMsDefault,
      'handshakeTimeoutMs',
    );
    const payloadTimeoutMs = checkTimeout(
      options.payloadTimeoutMs ?? kPayloadTimeoutMsDefault,
      'payloadTimeoutMs',
    );
    const name = options.exportName ?? '';
    if (Buffer.byteLength(name) > p.kStringBytesMax) throw new OptionError('ENBD_ERR_OPTION', 'options.exportName is longer than 4096 bytes');
    const blockSizes = device.blockSizes;
    assert(isPowerOfTwo(blockSizes.minimumBytes), 'device minimum block size is a power of two');
    this.device = device;
    this.logger = options.logger ?? createLogger({ level: 'silent' });
    this.connectionsMax = connectionsMax;
    this.handshakeTimeoutMs = handshakeTimeoutMs;
    this.payloadTimeoutMs = payloadTimeoutMs;
    this.sweepIntervalMs = sweepIntervalMsFor(handshakeTimeoutMs, payloadTimeoutMs);
    const capacityBytes = device.bufferCapacityBytes;
    this.bufferShare =
      device.acquireBuffer !== undefined && capacityBytes !== undefined
        ? new BufferShare(capacityBytes, device.bufferUnitBytes)
        : null;
    this.tls = options.tls ?? null;
    this.metaContexts = options.metaContexts ?? null;
    if (options.directReceive === true && this.tls !== null) {
      this.logger.info('direct receive is not used with TLS (--tls on/require): WRITE payloads are streamed (--receive stream)');
    }
    this.directReceive = options.directReceive === true && this.tls === null;
    this.fastZero = device.features.fastZero;
    this.exportDescriptor = {
      name,
      description: options.description ?? device.description,
      sizeBytes: device.sizeBytes,
      transmissionFlags: transmissionFlagsFor(device, options.readOnly === true),
      minimumBlockBytes: blockSizes.minimumBytes,
      preferredBlockBytes: Math.max(blockSizes.preferredBytes, blockSizes.minimumBytes, 512),
      maximumPayloadBytes: Math.min(maximumPayloadBytes, blockSizes.maximumBytes),
    };
    device.setCompletionHandler((token, errno) => this.onDeviceComplete(token, errno));
    device.onBufferAvailable = () => this.wake();
  }

  get connectionCount(): number {
    let count = 0;
    for (const connection of this.connections) if (connection !== null && !connection.isClosed) count += 1;
    return count;
  }

  get inFlight(): number {
    let count = 0;
    for (const connection of this.connections) if (connection !== null) count += connection.inFlight;
    return count;
  }

  /** The abuse bounds now in force (connectionsMax, handshake and payload timeouts). */
  limits(): { connectionsMax: number; handshakeTimeoutMs: number; payloadTimeoutMs: number } {
    return { connectionsMax: this.connectionsMax, handshakeTimeoutMs: this.handshakeTimeoutMs, payloadTimeoutMs: this.payloadTimeoutMs };
  }

  /**
   * Changes the abuse bounds of a running server (SIGHUP reload). Open connections stay: a lower
   * connectionsMax refuses only new ones; new timeouts apply from the next sweep, which is
   * re-armed with the period they call for.
   */
  setLimits(limits: { connectionsMax: number; handshakeTimeoutMs: number; payloadTimeoutMs: number }): void {
    if (!Number.isInteger(limits.connectionsMax) || limits.connectionsMax < 1 || limits.connectionsMax > kConnectionsMaxLimit) {
      throw new OptionError('ENBD_ERR_OPTION', `limits.connectionsMax must be an integer from 1 to ${kConnectionsMaxLimit}`);
    }
    this.handshakeTimeoutMs = checkTimeout(limits.handshakeTimeoutMs, 'handshakeTimeoutMs');
    this.payloadTimeoutMs = checkTimeout(limits.payloadTimeoutMs, 'payloadTimeoutMs');
    this.connectionsMax = limits.connectionsMax;
    const sweepIntervalMs = sweepIntervalMsFor(this.handshakeTimeoutMs, this.payloadTimeoutMs);
    if (sweepIntervalMs === this.sweepIntervalMs) return;
    this.sweepIntervalMs = sweepIntervalMs;
    const running = this.sweepTimer !== null;
    this.stopSweep();
    this.lastSweepMs = -1;
    if ((running || this.connectionCount > 0) && !this.closing) this.startSweep();
  }

  /** Connections refused because `connectionsMax` were open (since the start). */
  get connectionsRefused(): number {
    return this.refusalsTotal;
  }

  /** WRITE payload bytes copied from socket chunks, and bytes read straight into buffers. */
  payloadStats(): { bytesCopied: number; bytesDirect: number } {
    let bytesCopied = this.payloadBytesCopiedClosed;
    let bytesDirect = this.payloadBytesDirectClosed;
    for (const connection of this.connections) {
      if (connection === null || connection === undefined) continue;
      bytesCopied += connection.payloadBytesCopied;
      bytesDirect += connection.payloadBytesDirect;
    }
    return { bytesCopied, bytesDirect };
  }

  private onDeviceComplete(token: number, errno: number): void {
    const connection = this.connections[token >>> kRequestIndexBits];
    assert(connection !== undefined && connection !== null, `completion for unknown token ${token}`);
    connection.onDeviceComplete(token & (kRequestsPerConnection - 1), errno);
  }

  private createListener(): Server {
    const server = createServer({ allowHalfOpen: true, noDelay: true, pauseOnConnect: this.directReceive }, (socket) =>
      this.accept(socket),
    );
    server.on('error', (error) => this.logger.error({ err: error }, 'listener error'));
    this.listeners.push(server);
    return server;
  }

  /**
   * Listens on a Unix socket. An existing socket is replaced only when it is stale (connect
   * refused: its daemon is gone); one that something accepts on is refused with a message
   * naming it (`what`: the option the user gave, e.g. "--socket"), and left alone.
   */
  async listenUnix(path: string, what = 'socket'): Promise<void> {
    if ((await checkUnixFree(path, what)) === 'stale') {
      unlinkSync(path);
      this.logger.info({ socket: path }, 'replaced a stale Unix socket (nothing accepted on it)');
    }
    const server = this.createListener();
    await listenOn(server, { path });
    this.unixPaths.push({ path, inode: lstatSync(path).ino });
    this.logger.info({ socket: path }, 'listening on Unix socket');
  }

  /** Serves an inherited listening socket (systemd socket activation, LISTEN_FDS). */
  async listenFd(fd: number): Promise<void> {
    assert(Number.isInteger(fd) && fd >= 3, 'an inherited fd (3 or above)');
    const server = this.createListener();
    await listenOn(server, { fd });
    this.logger.info({ fd }, 'listening on an inherited socket (socket activation)');
  }

  /** Listens on TCP; returns the bound port (useful with port 0). */
  async listenTcp(host: string, port: number): Promise<number> {
    const server = this.createListener();
    await listenOn(server, { host, port });
    const address = server.address();
    const bound = typeof address === 'object' && address !== null ? address.port : port;
    this.logger.info({ host, port: bound }, 'listening on TCP');
    return bound;
  }

  /** Serve an already connected socket (socket activation, tests). */
  accept(socket: Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    const index = this.freeConnectionIndex();
    if (index < 0) {
      socket.destroy();
      this.refusalsTotal += 1;
      this.refusalsPending += 1;
      this.logRefusals(performance.now());
      return;
    }
    this.startSweep();
    const id = this.nextConnectionId;
    this.nextConnectionId += 1;
    const peer = socket.remoteAddress !== undefined ? `${socket.remoteAddress}:${String(socket.remotePort)}` : 'unix';
    const logger = this.logger.child({ conn: id, peer });
    logger.debug('client connected');
    try {
      const previous = this.connections[index];
      if (previous !== null && previous !== undefined) {
        this.payloadBytesCopiedClosed += previous.payloadBytesCopied;
        this.payloadBytesDirectClosed += previous.payloadBytesDirect;
      }
      this.connections[index] = new ServerConnection(index, socket, this, logger, this.directReceive);
    } catch (error) {
      logger.error({ err: error }, 'failed to set up connection');
      socket.destroy();
    }
  }

  private freeConnectionIndex(): number {
    for (let index = 0; index < this.connections.length; index += 1) {
      const connection = this.connections[index];
      if (connection === null || connection === undefined || connection.reusable) return index;
    }
    return this.connections.length < this.connectionsMax ? this.connections.length : -1;
  }

  /** Logs the refusals not logged yet, at most once per kRefusalLogIntervalMs. */
  private logRefusals(nowMs: number): void {
    if (this.refusalsPending === 0) return;
    if (nowMs - this.refusalLoggedAtMs < kRefusalLogIntervalMs) return;
    const counts = { refused: this.refusalsPending, refusedTotal: this.refusalsTotal };
    this.logger.warn(
      { connectionsMax: this.connectionsMax, ...counts },
      'too many clients (--max-connections); refused connections',
    );
    this.refusalsPending = 0;
    this.refusalLoggedAtMs = nowMs;
  }

  private startSweep(): void {
    if (this.sweepTimer !== null || this.sweepIntervalMs === 0) return;
    this.sweepTimer = setInterval(this.sweepBound, this.sweepIntervalMs);
    this.sweepTimer.unref();
  }

  /**
   * Handshake and payload timeouts of every connection, and late refusal logs. Runs in a
   * setImmediate after the sweep timer, so socket data that waited while the loop was busy
   * (or the process stopped) is processed first; a sweep more than two intervals late credits
   * no time at all.
   */
  private checkTimeouts(): void {
    const nowMs = performance.now();
    const sinceMs = this.lastSweepMs < 0 ? this.sweepIntervalMs : nowMs - this.lastSweepMs;
    this.lastSweepMs = nowMs;
    const creditMs = sinceMs > 2 * this.sweepIntervalMs ? 0 : sinceMs;
    for (const connection of this.connections) {
      connection?.checkTimeouts(nowMs, creditMs, this.handshakeTimeoutMs, this.payloadTimeoutMs);
    }
    this.logRefusals(nowMs);
  }

  connectionClosed(connection: ServerConnection): void {
    this.stalledConnections.delete(connection);
    if (this.idleWaiters.length > 0 && this.inFlight === 0 && this.connectionCount === 0) {
      for (const waiter of this.idleWaiters.splice(0)) waiter();
    }
  }

  stalled(connection: ServerConnection): void {
    this.stalledConnections.add(connection);
  }

  wake(): void {
    if (this.wakeScheduled || this.stalledConnections.size === 0) return;
    this.wakeScheduled = true;
    setImmediate(this.wakeBound);
  }

  private resumeStalled(): void {
    this.wakeScheduled = false;
    for (const connection of this.stalledConnections) {
      if (!connection.resume()) this.stalledConnections.delete(connection);
    }
  }

  /**
   * Graceful stop: stop accepting, let in-flight requests finish and their replies leave,
   * then close every connection. Resolves when no request is left at the device.
   */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    // Stop accepting now; server.close's callback waits for every connection, so don't await it.
    for (const server of this.listeners) server.close();
    for (const { path, inode } of this.unixPaths) {
      try {
        if (lstatSync(path).ino === inode) unlinkSync(path);
      } catch {
        // already gone
      }
    }
    const idle = new Promise<void>((resolve) => this.idleWaiters.push(resolve));
    for (const connection of this.connections) connection?.shutdown();
    if (this.inFlight === 0 && this.connectionCount === 0) {
      this.stopSweep();
      return;
    }
    const drained = await withTimeout(idle.then(() => true), kShutdownDrainMs, false);
    if (!drained) {
      this.logger.warn({ inFlight: this.inFlight }, 'clients did not drain in time; dropping them');
      for (const connection of this.connections) connection?.close('server shutdown timed out');
    }
    this.stopSweep();
  }

  private stopSweep(): void {
    if (this.sweepTimer !== null) clearInterval(this.sweepTimer);
    this.sweepTimer = null;
    this.refusalLoggedAtMs = -Infinity;
    this.logRefusals(0);
  }
}

export function createNbdServer(options: NbdServerOptions): NbdServer {
  return new NbdServer(options);
}
