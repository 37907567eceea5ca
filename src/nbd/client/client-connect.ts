/**
 * NbdClient's connect phase: one connection during connect + handshake. PendingConnection owns
 * the socket until the NbdClient takes it over, turns socket events into HandshakeIo reads
 * (client-handshake.ts), wraps the socket in TLS after STARTTLS (client-tls.ts), and enforces
 * the connect deadline.
 * Threads: the thread that called `NbdClient.connect`.
 *
 * Design notes
 * - The socket reads with `onread` into one reusable kReceiveBufferBytes buffer from the
 *   start; during the handshake the bytes are copied out (handshake reads are few and small),
 *   afterwards the attached client picks the buffer of every next read (`nextReceiveBuffer`:
 *   the receive buffer, a header-sized part of it, or a READ's destination for direct receive)
 *   and is told how many bytes landed there (`onRead`).
 * - `directHandle()`: the plain socket's handle, whose `useUserBuffer` (the call Node's net
 *   makes for `onread` itself) re-points the next read at once; the client needs it to stop
 *   reading into a destination it gives back early (a failure). Null under TLS or when the
 *   handle lacks it: then the client never reads into destinations.
 * - After STARTTLS reads arrive as 'data' chunks of the TLSSocket instead (the plain socket's
 *   `onread` path serves plain connections only).
 * - Socket errors and the close are failures of the connect (ENBD_ERR_CONNECT) before the
 *   socket connected, of the handshake (ENBD_ERR_HANDSHAKE) after; once a client is attached
 *   they are its events (ConnectionSink).
 *
 * Invariants:
 * - At most one handshake read is pending; a failure rejects it and the connect waiter once.
 * - Bytes received beyond the handshake are handed to the client (`finishHandshake`), in order.
 */
import { connect as netConnect, type Socket } from 'node:net';
import { assert } from '../../core/assert.js';
import { EnbdError } from '../../core/errors.js';
import type { NbdAddress } from '../uri.js';
import { describeNbdAddress } from '../uri.js';
import type { HandshakeIo } from './client-handshake.js';
import { upgradeClientSocket } from './client-tls.js';

export const kReceiveBufferBytes = 256 * 1024;
/** TCP keepalive: first probe after this much idle time. */
const kKeepAliveDelayMs = 10_000;

/** The client that takes the connection over after the handshake. */
export interface ConnectionSink {
  /** Receive path (TLS 'data', handshake leftovers): `count` new bytes at the start of `buffer`. */
  onReceive(buffer: Buffer, count: number): void;
  /** Plain socket (onread): `count` bytes landed in the buffer `nextReceiveBuffer` gave last. */
  onRead(count: number): void;
  /** Plain socket: the buffer of the next read (called after every read). */
  nextReceiveBuffer(): Uint8Array;
  handleSocketClose(): void;
  handleSocketError(error: Error): void;
}

/** The part of a libuv stream handle direct receive needs (see the design notes). */
export interface DirectHandle {
  useUserBuffer(buffer: Uint8Array): void;
}

interface PendingRead {
  lengthBytes: number;
  resolve: (data: Buffer) => void;
  reject: (error: Error) => void;
}

/**
 * One connection during connect + handshake: owns the socket until NbdClient takes it over,
 * turns socket events into HandshakeIo reads, and enforces the connect deadline.
 */
export class PendingConnection implements HandshakeIo {
  /** The plain socket, or after STARTTLS the TLSSocket over it. */
  socket: Socket;
  private plainSocket: Socket | null = null;
  readonly serverName: string;
  readonly receiveBuffer = Buffer.allocUnsafeSlow(kReceiveBufferBytes);
  private received: Buffer[] = [];
  private receivedBytes = 0;
  private client: ConnectionSink | null = null;
  private pending: PendingRead | null = null;
  private failure: Error | null = null;
  private isConnected = false;
  private connectWaiter: { resolve: () => void; reject: (error: Error) => void } | null = null;
  private readonly deadline: NodeJS.Timeout;

  constructor(
    private readonly address: NbdAddress,
    timeoutMs: number,
  ) {
    this.serverName = describeNbdAddress(address);
    const onread = {
      buffer: (): Uint8Array => (this.client !== null ? this.client.nextReceiveBuffer() : this.receiveBuffer),
      callback: (count: number): boolean => {
        if (this.client !== null) this.client.onRead(count);
        else this.onHandshakeBytes(count);
        return true;
      },
    };
    this.socket =
      address.kind === 'unix'
        ? netConnect({ path: address.socketPath, onread })
        : netConnect({ host: address.host, port: address.port, onread, noDelay: true });
    this.socket.once('connect', () => {
      this.isConnected = true;
      if (address.kind === 'tcp') {
        this.socket.setNoDelay(true);
        // A peer that vanished without a FIN/RST (host down, cable) is found by the kernel.
        this.socket.setKeepAlive(true, kKeepAliveDelayMs);
      }
      this.connectWaiter?.resolve();
    });
    this.socket.on('error', (error) => this.onSocketError(error));
    this.socket.on('close', () => this.onSocketClose());
    this.deadline = setTimeout(() => {
      const text = `connecting to NBD server ${this.serverName} timed out after ${timeoutMs} ms`;
      this.setFailure(new EnbdError('ENBD_ERR_TIMEOUT', text));
      this.socket.destroy();
    }, timeoutMs);
  }

  connected(): Promise<void> {
    if (this.isConnected) return Promise.resolve();
    if (this.failure !== null) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => (this.connectWaiter = { resolve, reject }));
  }

  read(lengthBytes: number): Promise<Buffer> {
    assert(this.pending === null, 'one handshake read at a time');
    if (this.receivedBytes >= lengthBytes) return Promise.resolve(this.take(lengthBytes));
    if (this.failure !== null) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => (this.pending = { lengthBytes, resolve, reject }));
  }

  write(data: Uint8Array): void {
    if (this.failure === null) this.socket.write(data);
  }

  /** The handshake succeeded: stop the deadline; returns bytes received beyond it. */
  finishHandshake(): Buffer {
    clearTimeout(this.deadline);
    const leftover = Buffer.concat(this.received);
    this.received = [];
    this.receivedBytes = 0;
    return leftover;
  }

  /** The plain socket's handle for direct receive, or null (TLS, or no `useUserBuffer`). */
  directHandle(): DirectHandle | null {
    if (this.plainSocket !== null) return null;
    const handle = (this.socket as unknown as { _handle?: { useUserBuffer?: unknown } | null })._handle;
    if (handle === null || handle === undefined || typeof handle.useUserBuffer !== 'function') return null;
    return handle as DirectHandle;
  }

  attach(client: ConnectionSink): void {
    this.client = client;
    if (this.failure !== null) client.handleSocketClose();
  }

  abort(): void {
    clearTimeout(this.deadline);
    this.socket.destroy();
    this.plainSocket?.destroy();
  }

  /**
   * STARTTLS was acknowledged: wrap the socket in TLS (node:tls over the same handle; reads
   * then arrive as 'data' chunks instead of through `onread`). Resolves once the handshake and
   * the certificate checks passed.
   */
  async startTls(): Promise<void> {
    const settings = this.address.tls;
    assert(settings !== undefined, 'startTls on a plain address');
    if (this.receivedBytes > 0) {
      throw new EnbdError('ENBD_ERR_HANDSHAKE', `NBD server ${this.serverName} sent data after its STARTTLS reply`);
    }
    if (this.failure !== null) throw this.failure;
    const plain = this.socket;
    plain.removeAllListeners('error');
    plain.removeAllListeners('close');
    plain.on('error', () => {
      // reported by the TLS socket
    });
    const secured = upgradeClientSocket(plain, this.address, settings);
    this.plainSocket = plain;
    this.socket = secured;
    secured.on('data', (chunk: Buffer) => {
      if (this.client !== null) this.client.onReceive(chunk, chunk.length);
      else this.onHandshakeChunk(chunk);
    });
    await new Promise<void>((resolve, reject) => {
      const fail = (error: Error): void => {
        const failure = new EnbdError('ENBD_ERR_HANDSHAKE', `TLS handshake with NBD server ${this.serverName} failed: ${error.message}`, 0, { cause: error });
        this.setFailure(failure);
        reject(failure);
      };
      const closed = (): void => fail(new Error('connection closed during the TLS handshake'));
      secured.once('secureConnect', () => {
        secured.removeListener('error', fail);
        secured.removeListener('close', closed);
        secured.on('error', (error) => this.onSocketError(error));
        secured.on('close', () => this.onSocketClose());
        resolve();
      });
      secured.once('error', fail);
      secured.once('close', closed);
    });
  }

  private onHandshakeChunk(chunk: Buffer): void {
    this.received.push(chunk);
    this.receivedBytes += chunk.length;
    const pending = this.pending;
    if (pending !== null && this.receivedBytes >= pending.lengthBytes) {
      this.pending = null;
      pending.resolve(this.take(pending.lengthBytes));
    }
  }

  private take(lengthBytes: number): Buffer {
    const single = this.received.length === 1 ? (this.received[0] as Buffer) : null;
    const all = single ?? Buffer.concat(this.received);
    this.received = all.length > lengthBytes ? [all.subarray(lengthBytes)] : [];
    this.receivedBytes = all.length - lengthBytes;
    return all.subarray(0, lengthBytes);
  }

  private onHandshakeBytes(count: number): void {
    this.received.push(Buffer.from(this.receiveBuffer.subarray(0, count)));
    this.receivedBytes += count;
    const pending = this.pending;
    if (pending !== null && this.receivedBytes >= pending.lengthBytes) {
      this.pending = null;
      pending.resolve(this.take(pending.lengthBytes));
    }
  }

  private setFailure(error: Error): void {
    if (this.failure !== null) return;
    this.failure = error;
    const pending = this.pending;
    this.pending = null;
    pending?.reject(error);
    const waiter = this.connectWaiter;
    this.connectWaiter = null;
    waiter?.reject(error);
  }

  private onSocketError(error: Error): void {
    if (this.client !== null) {
      this.client.handleSocketError(error);
      return;
    }
    const code = (error as NodeJS.ErrnoException).code;
    const server = `NBD server ${this.serverName}`;
    const failure = this.isConnected
      ? new EnbdError(
          'ENBD_ERR_HANDSHAKE',
          `connection to ${server} failed during the handshake: ${code ?? error.message}`,
          0,
          { cause: error },
        )
      : new EnbdError('ENBD_ERR_CONNECT', `cannot connect to ${server}: ${error.message}`, 0, {
          cause: error,
        });
    this.setFailure(failure);
  }

  private onSocketClose(): void {
    if (this.client !== null) {
      this.client.handleSocketClose();
      return;
    }
    this.setFailure(
      this.isConnected
        ? new EnbdError(
            'ENBD_ERR_HANDSHAKE',
            `NBD server ${this.serverName} closed the connection during the handshake`,
          )
        : new EnbdError('ENBD_ERR_CONNECT', `cannot connect to NBD server ${this.serverName}`),
    );
  }
}
