/**
 * NBD server, one client connection: handshake (delegated to OptionNegotiator), then the
 * transmission phase: parse requests, validate them, submit them to the BlockDevice, and write
 * replies in completion order.
 *
 * Thread: main thread (session master).
 *
 * Design notes
 * Receive path: the socket's 'data' chunks are parsed in place. A 28-byte header that straddles
 * two chunks is staged in a fixed 28-byte buffer; a WRITE payload is copied once from the chunk
 * into its destination (the device's buffer, e.g. a ring slot, or this connection's own
 * buffer). When no request record or device buffer is free, or the connection is over its fair
 * share of the device's buffers (buffer-share.ts), parsing stalls: the connection remembers
 * (chunk, position), pauses the socket, and resumes when a record or buffer frees.
 *
 * Timeouts (no timer per connection or request: the server's sweep calls checkTimeouts): a
 * handshake must finish within the handshake timeout; a client in the middle of a request
 * (WRITE payload, rejected payload being discarded, part of a header) that sends nothing for
 * the payload timeout is disconnected, and close() releases the buffers it held. A chunk
 * counter is all the receive path pays for it.
 *
 * Reply path: headers and small READ payloads are appended to an output arena; large READ
 * payloads are written as their own buffers. The socket is corked on the first reply of an
 * event-loop turn and uncorked once in setImmediate, so a turn's replies leave in one writev.
 * The arena is reset only when the socket has nothing pending (writableLength 0), so no
 * pending write ever sees its bytes overwritten.
 *
 * Request record states
 * | state     | meaning                                        | next                   |
 * |-----------|------------------------------------------------|------------------------|
 * | free      | on the free stack                              | payload, device        |
 * | payload   | WRITE header parsed, payload arriving          | device, free (on close)|
 * | device    | submitted to the device (or awaiting extents)  | free, writing          |
 * | writing   | large READ payload handed to the socket        | free                   |
 *
 * Invariants:
 * - Every request gets exactly one reply unless the connection is gone.
 * - A device buffer is released exactly once, after the last read of it.
 * - The connection's token range stays reserved until every submitted request completed, so
 *   a late completion can never reach another connection.
 * - A WRITE payload is always consumed (or the connection dropped) before the next header.
 */
import { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import type { Logger } from '../../core/log.js';
import type { BlockDevice, Extent } from '../../core/block-device.js';
import { assert } from '../../core/assert.js';
import * as p from '../protocol.js';
import { OptionNegotiator, encodeGreeting, type ExportDescriptor, type NegotiatedState } from './server-options.js';
import { validateRequest, type ValidationContext } from './request-validate.js';
import type { BufferShare, ShareUser } from './buffer-share.js';
import { peerVerifyError, upgradeServerSocket, type ServerTls } from './server-tls.js';

export const kRequestsPerConnection = 256;
export const kRequestIndexBits = 8;
const kOutputArenaBytes = 256 * 1024;
/** READ payloads up to this size are copied into the output arena; larger ones are sent as is. */
const kInlineReadBytesMax = 16 * 1024;
/** Own receive/read buffers up to this size are kept per record and reused. */
const kRecordBufferKeepBytes = 256 * 1024;
/** Larger own buffers go back to a per-connection pool: at most this many, this many bytes. */
const kLargeBuffersKept = 16;
const kLargeBufferBytesKept = 64 * 1024 * 1024;
const kExtentsMax = 65536;
const kExtentBytesMax = 0xffff_f000;
const kTwoPow32 = 0x1_0000_0000;
/** Direct receive: own receive buffer size, and the smallest payload rest read straight into its slot. */
const kReceiveBufferBytes = 256 * 1024;
const kDirectReceiveMinBytes = 64 * 1024;

const enum RecordState {
  Free = 0,
  Payload = 1,
  Device = 2,
  Writing = 3,
}

const enum ParseState {
  Header = 0,
  Payload = 1,
  Discard = 2,
}

class RequestRecord {
  state = RecordState.Free;
  command = 0;
  flags = 0;
  offsetBytes = 0;
  lengthBytes = 0;
  cookieHigh = 0;
  cookieLow = 0;
  data: Uint8Array | null = null;
  fromDevice = false;
  ownBuffer: Buffer | null = null;
  /** A buffer from the connection's large-buffer pool, returned on release. */
  largeBuffer: Buffer | null = null;
  /** Bytes charged to the connection's buffer share for `data` (0: not a shared buffer). */
  chargeBytes = 0;
  filledBytes = 0;
  readonly onWritten: () => void;
  constructor(
    readonly index: number,
    readonly token: number,
    connection: ServerConnection,
  ) {
    this.onWritten = () => connection.afterLargeWrite(this);
  }
}

export interface ConnectionHost {
  readonly device: BlockDevice;
  readonly exportDescriptor: ExportDescriptor;
  /** Device supports FAST_ZERO (else such requests fail fast with ENOTSUP). */
  readonly fastZero: boolean;
  /** Fair share of the device's buffers, or null when the device has no shared buffers. */
  readonly bufferShare: BufferShare | null;
  /** TLS offered on this export, or null (off). */
  readonly tls: ServerTls | null;
  connectionClosed(connection: ServerConnection): void;
  /** Register a connection whose parsing stalled; `resume()` is called after a `wake()`. */
  stalled(connection: ServerConnection): void;
  /** Something freed (a record or a device buffer): resume stalled connections soon. */
  wake(): void;
}

export class ServerConnection implements ShareUser {
  private readonly records: RequestRecord[] = [];
  private readonly freeRecords: number[] = [];
  private readonly negotiator: OptionNegotiator;
  private negotiated: NegotiatedState | null = null;
  private validation: ValidationContext | null = null;
  private parseState = ParseState.Header;
  private readonly headerStage = Buffer.alloc(p.kRequestHeaderBytes);
  private headerFilled = 0;
  private payloadRecord: RequestRecord | null = null;
  private discardBytes = 0;
  private stalledChunk: Buffer | null = null;
  private stalledPosition = 0;
  private stalledEnd = 0;
  /** The client's socket; after STARTTLS the TLSSocket wrapping `plainSocket`. */
  private socket: Socket;
  private plainSocket: Socket | null = null;
  /** Direct receive mode: reads land in `receiveBuffer`, or straight in a payload's buffer. */
  private readonly receiveBuffer: Buffer | null = null;
  private directTarget: Uint8Array | null = null;
  private readonly largeBuffers: Buffer[] = [];
  private largeBufferBytes = 0;
  payloadBytesCopied = 0;
  payloadBytesDirect = 0;
  /** Record parsed from a WRITE header that is still waiting for a device buffer. */
  private awaitingBuffer: RequestRecord | null = null;
  private out = Buffer.allocUnsafeSlow(kOutputArenaBytes);
  private outStart = 0;
  private outUsed = 0;
  private flushScheduled = false;
  private readonly flushBound = (): void => this.flush();
  private closed = false;
  private disconnecting = false;
  inFlight = 0;
  requestsServed = 0;
  /** ShareUser: charged device-buffer bytes held, and whether parsing waits for a buffer. */
  shareHeldBytes = 0;
  shareWanting = false;
  /** Timeouts (checked by the server's sweep): credited handshake and silence time. */
  private lastCheckedMs = performance.now();
  private handshakeWaitedMs = 0;
  private receivedChunks = 0;
  private seenChunks = 0;
  private silentMs = 0;

  constructor(
    readonly index: number,
    acceptedSocket: Socket,
    private readonly host: ConnectionHost,
    private readonly logger: Logger,
    directReceive = false,
  ) {
    if (directReceive) {
      this.receiveBuffer = Buffer.allocUnsafeSlow(kReceiveBufferBytes);
      this.socket = this.adoptForDirectReceive(acceptedSocket);
    } else {
      this.socket = acceptedSocket;
    }
    const socket = this.socket;
    for (let index = kRequestsPerConnection - 1; index >= 0; index -= 1) {
      this.freeRecords.push(index);
    }
    for (let index = 0; index < kRequestsPerConnection; index += 1) {
      this.records.push(new RequestRecord(index, (this.index << kRequestIndexBits) | index, this));
    }
    this.negotiator = new OptionNegotiator(
      host.exportDescriptor,
      {
        send: (bytes) => this.sendRaw(bytes),
        onTransmission: (state, rest) => this.enterTransmission(state, rest),
        onClose: (reason) => this.close(reason),
        onStartTls: () => this.startTls(),
      },
      host.tls?.mode ?? 'off',
    );
    socket.setNoDelay(true);
    this.listen(socket, !directReceive);
    socket.write(encodeGreeting());
  }

  private listen(socket: Socket, data: boolean): void {
    if (data) socket.on('data', (chunk: Buffer) => this.onData(chunk, chunk.length));
    socket.on('error', (error: Error) => this.close(`socket error: ${error.message}`));
    socket.on('close', () => this.close('client closed the connection'));
    socket.on('end', () => this.onEnd());
  }

  /**
   * STARTTLS was acknowledged (the ACK is queued on the plain socket's handle): stop reading
   * plain bytes and wrap the same socket in a server TLSSocket. A failed handshake closes this
   * connection only; success restarts option haggling inside TLS.
   */
  private startTls(): void {
    const tls = this.host.tls;
    assert(tls !== null, 'STARTTLS accepted without TLS settings');
    if (this.closed) return;
    const plain = this.socket;
    plain.pause();
    plain.removeAllListeners('data');
    plain.removeAllListeners('end');
    plain.removeAllListeners('error');
    plain.on('error', () => {
      // reported by the TLS socket
    });
    let secured: TLSSocket;
    try {
      secured = upgradeServerSocket(plain, tls);
    } catch (error) {
      this.close(`TLS upgrade failed: ${(error as Error).message}`);
      return;
    }
    this.plainSocket = plain;
    this.socket = secured;
    secured.setNoDelay(true);
    this.listen(secured, true);
    secured.once('secure', () => {
      if (this.closed) return;
      const rejected = tls.verifyPeer ? peerVerifyError(secured) : null;
      if (rejected !== null) {
        this.close(`client certificate rejected: ${rejected}`);
        return;
      }
      this.logger.debug({ protocol: secured.getProtocol(), cipher: secured.getCipher().name }, 'TLS established');
      this.negotiator.tlsEstablished();
    });
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** True when the token range may be reused: closed and nothing left at the device. */
  get reusable(): boolean {
    return this.closed && this.inFlight === 0;
  }

  get inTransmission(): boolean {
    return this.negotiated !== null;
  }

  private sendRaw(bytes: Buffer): void {
    if (!this.closed) this.socket.write(bytes);
  }

  private onEnd(): void {
    if (this.payloadRecord !== null || this.awaitingBuffer !== null) {
      this.close('client left in the middle of a request');
    } else if (this.negotiated === null) {
      this.close('client left during the handshake');
    } else {
      // Replies of requests that already completed may still sit corked in this turn's
      // batch: let them leave before the socket closes.
      this.disconnecting = true;
      if (this.inFlight === 0) this.closeWhenFlushed();
    }
  }

  private onData(chunk: Buffer, end: number): void {
    this.receivedChunks += 1;
    if (this.closed || this.disconnecting) return;
    if (this.negotiated === null) {
      // The negotiator may keep what it is given; a reused receive buffer must be copied.
      this.negotiator.feed(this.receiveBuffer === null ? chunk : Buffer.from(chunk.subarray(0, end)));
      return;
    }
    this.parse(chunk, 0, end);
  }

  /**
   * Direct receive (net.Socket `onread`): the server accepted the socket paused; its handle is
   * moved to a new Socket whose reads go to a buffer we choose before every read. Node's
   * net.Server cannot pass `onread` to accepted sockets, so the handle is adopted; the first
   * Socket object is destroyed without its handle (which also settles the server's count).
   */
  private adoptForDirectReceive(accepted: Socket): Socket {
    const holder = accepted as unknown as { _handle: unknown };
    const handle = holder._handle;
    holder._handle = null;
    accepted.destroy();
    const receiveBuffer = this.receiveBuffer as Buffer;
    const options = {
      handle,
      allowHalfOpen: true,
      readable: true,
      writable: true,
      onread: {
        buffer: (): Uint8Array => this.directTarget ?? receiveBuffer,
        callback: (bytes: number, buffer: Uint8Array): boolean => this.onReceive(bytes, buffer),
      },
    };
    const socket = new Socket(options as unknown as ConstructorParameters<typeof Socket>[0]);
    socket.resume();
    return socket;
  }

  private onReceive(bytes: number, buffer: Uint8Array): boolean {
    if (buffer === this.receiveBuffer) {
      this.onData(this.receiveBuffer, bytes);
      return true;
    }
    // The bytes went straight into the payload record's buffer.
    const record = this.payloadRecord;
    if (record === null || this.closed) return true;
    this.receivedChunks += 1;
    record.filledBytes += bytes;
    this.payloadBytesDirect += bytes;
    const remaining = record.lengthBytes - record.filledBytes;
    if (remaining > 0) {
      this.directTarget = (record.data as Uint8Array).subarray(record.filledBytes);
      return true;
    }
    this.directTarget = null;
    this.payloadRecord = null;
    this.parseState = ParseState.Header;
    this.submit(record);
    return true;
  }

  private enterTransmission(state: NegotiatedState, rest: Buffer): void {
    this.negotiated = state;
    this.validation = {
      sizeBytes: state.exportDescriptor.sizeBytes,
      transmissionFlags: state.exportDescriptor.transmissionFlags,
      maximumPayloadBytes: state.exportDescriptor.maximumPayloadBytes,
      structuredReplies: state.structuredReplies,
      metaContextSelected: state.baseAllocationId !== 0,
      fastZero: this.host.fastZero,
    };
    this.logger.debug({ structuredReplies: state.structuredReplies, baseAllocation: state.baseAllocationId !== 0 }, 'transmission phase');
    if (rest.length > 0) this.parse(rest, 0, rest.length);
  }

  /** Begin a graceful shutdown: refuse new options, stop reading requests, close when idle. */
  shutdown(): void {
    if (this.closed) return;
    if (this.negotiated === null) {
      this.negotiator.beginShutdown();
      this.close('server shutting down');
      return;
    }
    this.disconnecting = true;
    this.socket.pause();
    if (this.inFlight === 0) this.closeWhenFlushed();
  }

  /**
   * Called by the server's sweep every few hundred ms (0 disables a timeout), after the socket
   * data already received was processed. `creditMs` is the time since the previous sweep, or 0
   * when that sweep came late (the event loop or the process was stalled: a client is not
   * blamed for our stall). Closes the connection when its handshake has not finished after
   * `handshakeTimeoutMs` of credited time since the accept, or when the client owes bytes of a
   * started request (WRITE payload, discarded payload, header) and sent none for
   * `payloadTimeoutMs` of credited time; closing releases the buffers it held. Time the
   * server holds the connection paused (no record or buffer free) never counts.
   */
  checkTimeouts(nowMs: number, creditMs: number, handshakeTimeoutMs: number, payloadTimeoutMs: number): void {
    if (this.closed) return;
    // A connection accepted since the previous sweep is credited only its own age.
    const credit = Math.min(creditMs, nowMs - this.lastCheckedMs);
    this.lastCheckedMs = nowMs;
    if (this.negotiated === null) {
      this.handshakeWaitedMs += credit;
      if (handshakeTimeoutMs > 0 && this.handshakeWaitedMs >= handshakeTimeoutMs) {
        this.close(`handshake not finished within ${handshakeTimeoutMs} ms`);
      }
      return;
    }
    if (payloadTimeoutMs <= 0 || !this.owesBytes()) {
      this.silentMs = 0;
      return;
    }
    if (this.receivedChunks !== this.seenChunks) {
      // Bytes arrived since the previous sweep: the silence starts again.
      this.seenChunks = this.receivedChunks;
      this.silentMs = 0;
      return;
    }
    this.silentMs += credit;
    if (this.silentMs >= payloadTimeoutMs) {
      const what =
        this.parseState === ParseState.Payload
          ? 'a WRITE payload'
          : this.parseState === ParseState.Discard
            ? 'a rejected payload'
            : 'a request header';
      this.close(`client sent nothing for ${payloadTimeoutMs} ms in the middle of ${what}`);
    }
  }

  /** The client is in the middle of a request and nothing on our side holds it up. */
  private owesBytes(): boolean {
    if (this.disconnecting) return false;
    if (this.stalledChunk !== null || this.awaitingBuffer !== null) return false;
    return this.parseState !== ParseState.Header || this.headerFilled > 0;
  }

  // ---- receive path ---------------------------------------------------------------------

  private parse(chunk: Buffer, start: number, end: number): void {
    let position = start;
    while (position < end && !this.closed && !this.disconnecting) {
      if (this.parseState === ParseState.Payload) {
        position = this.fillPayload(chunk, position, end);
      } else if (this.parseState === ParseState.Discard) {
        const skip = Math.min(this.discardBytes, end - position);
        this.discardBytes -= skip;
        position += skip;
        if (this.discardBytes === 0) this.parseState = ParseState.Header;
      } else {
        if (this.freeRecords.length === 0) {
          this.stall(chunk, position, end);
          return;
        }
        const available = end - position;
        if (this.headerFilled === 0 && available >= p.kRequestHeaderBytes) {
          const consumed = this.onHeader(chunk, position);
          position += p.kRequestHeaderBytes;
          if (!consumed) {
            this.stall(chunk, position, end);
            return;
          }
        } else {
          const take = Math.min(p.kRequestHeaderBytes - this.headerFilled, available);
          chunk.copy(this.headerStage, this.headerFilled, position, position + take);
          this.headerFilled += take;
          position += take;
          if (this.headerFilled < p.kRequestHeaderBytes) return;
          this.headerFilled = 0;
          if (!this.onHeader(this.headerStage, 0)) {
            this.stall(chunk, position, end);
            return;
          }
        }
      }
    }
  }

  private stall(chunk: Buffer, position: number, end: number): void {
    this.stalledChunk = chunk;
    this.stalledPosition = position;
    this.stalledEnd = end;
    this.socket.pause();
    this.host.stalled(this);
  }

  /** Called when a record or device buffer may have become free. Returns true if still stalled. */
  resume(): boolean {
    if (this.closed) return false;
    if (this.awaitingBuffer !== null && !this.acquireWriteBuffer(this.awaitingBuffer)) return true;
    const chunk = this.stalledChunk;
    if (chunk === null) return false;
    if (this.parseState === ParseState.Header && this.freeRecords.length === 0) return true;
    this.stalledChunk = null;
    this.parse(chunk, this.stalledPosition, this.stalledEnd);
    if (this.stalledChunk !== null) return true;
    if (!this.disconnecting) this.socket.resume();
    return false;
  }

  /**
   * Parses one request header at `bytes[position]`. Returns false when the request must wait
   * for a device buffer (the header is consumed; the record is remembered).
   */
  private onHeader(bytes: Buffer, position: number): boolean {
    const magic = bytes.readUInt32BE(position);
    if (magic !== p.kRequestMagic) {
      this.close(`bad request magic 0x${magic.toString(16)}; framing lost`);
      return true;
    }
    const recordIndex = this.freeRecords.pop();
    assert(recordIndex !== undefined, 'parse checks for a free record first');
    const record = this.records[recordIndex];
    assert(record !== undefined && record.state === RecordState.Free, 'free stack holds free records');
    record.flags = bytes.readUInt16BE(position + 4);
    record.command = bytes.readUInt16BE(position + 6);
    record.cookieHigh = bytes.readUInt32BE(position + 8);
    record.cookieLow = bytes.readUInt32BE(position + 12);
    const offsetHigh = bytes.readUInt32BE(position + 16);
    const offsetLow = bytes.readUInt32BE(position + 20);
    // Offsets at or above 2^53 cannot be exact numbers; any such offset is out of range anyway.
    record.offsetBytes = offsetHigh >= 0x20_0000 ? Number.MAX_SAFE_INTEGER : offsetHigh * kTwoPow32 + offsetLow;
    record.lengthBytes = bytes.readUInt32BE(position + 24);
    record.data = null;
    record.fromDevice = false;
    record.filledBytes = 0;
    this.inFlight += 1;
    return this.dispatchHeader(record);
  }

  private dispatchHeader(record: RequestRecord): boolean {
    const validation = this.validation;
    assert(validation !== null, 'requests only arrive in transmission');
    const command = record.command;
    if (command === p.kCmdDisc) {
      this.releaseRecord(record);
      this.logger.debug('client sent DISC');
      this.disconnecting = true;
      this.socket.pause();
      if (this.inFlight === 0) this.closeWhenFlushed();
      return true;
    }
    const errno = validateRequest(validation, command, record.flags, record.offsetBytes, record.lengthBytes);
    if (errno !== 0) {
      if (command === p.kCmdWrite) this.startDiscard(record.lengthBytes);
      this.finish(record, errno);
      return true;
    }
    if (command === p.kCmdWrite) {
      record.state = RecordState.Payload;
      if (record.lengthBytes === 0) {
        this.submit(record);
        return true;
      }
      if (!this.acquireWriteBuffer(record)) {
        this.setAwaiting(record);
        return false;
      }
      return true;
    }
    record.state = RecordState.Device;
    if (command === p.kCmdRead) {
      if (record.lengthBytes === 0) {
        this.finish(record, 0);
        return true;
      }
      if (!this.acquireBuffer(record)) {
        this.setAwaiting(record);
        return false;
      }
      this.host.device.submit(command, record.flags, record.offsetBytes, record.lengthBytes, record.data, record.token);
      return true;
    }
    if (command === p.kCmdBlockStatus) {
      this.blockStatus(record);
      return true;
    }
    this.host.device.submit(command, record.flags, record.offsetBytes, record.lengthBytes, null, record.token);
    return true;
  }

  private startDiscard(lengthBytes: number): void {
    if (lengthBytes > 0) {
      this.discardBytes = lengthBytes;
      this.parseState = ParseState.Discard;
    }
  }

  /** A record's wait for a buffer starts (record) or ends (null); the share counts waiters. */
  private setAwaiting(record: RequestRecord | null): void {
    this.awaitingBuffer = record;
    this.host.bufferShare?.setWanting(this, record !== null);
  }

  /**
   * Gets a buffer for READ or WRITE data; false when this connection is over its fair share of
   * the device's buffers (buffer-share.ts) or the device has none free right now.
   */
  private acquireBuffer(record: RequestRecord): boolean {
    const device = this.host.device;
    if (device.acquireBuffer !== undefined) {
      const share = this.host.bufferShare;
      const charge = share === null ? 0 : share.chargeFor(record.lengthBytes);
      if (share !== null && !share.mayAcquire(this, charge)) return false;
      const view = device.acquireBuffer(record.command, record.lengthBytes, record.token);
      if (view === null) return false;
      assert(view.length === record.lengthBytes, 'device buffer has the asked length');
      record.data = view;
      record.fromDevice = true;
      record.chargeBytes = charge;
      if (share !== null) share.acquired(this, charge);
      return true;
    }
    const length = record.lengthBytes;
    if (length <= kRecordBufferKeepBytes) {
      if (record.ownBuffer === null || record.ownBuffer.length < length) {
        record.ownBuffer = Buffer.allocUnsafeSlow(Math.max(length, 4096));
      }
      record.data = record.ownBuffer.length === length ? record.ownBuffer : record.ownBuffer.subarray(0, length);
    } else {
      const large = this.takeLargeBuffer(length);
      record.largeBuffer = large;
      record.data = large.length === length ? large : large.subarray(0, length);
    }
    return true;
  }

  /** A pooled buffer of at least `length` bytes (power-of-two capacity when new). */
  private takeLargeBuffer(length: number): Buffer {
    const pool = this.largeBuffers;
    for (let index = 0; index < pool.length; index += 1) {
      const candidate = pool[index] as Buffer;
      if (candidate.length >= length) {
        pool[index] = pool[pool.length - 1] as Buffer;
        pool.pop();
        this.largeBufferBytes -= candidate.length;
        return candidate;
      }
    }
    let capacity = kRecordBufferKeepBytes * 2;
    while (capacity < length) capacity *= 2;
    return Buffer.allocUnsafeSlow(capacity);
  }

  private giveLargeBuffer(buffer: Buffer): void {
    if (this.largeBuffers.length >= kLargeBuffersKept) return;
    if (this.largeBufferBytes + buffer.length > kLargeBufferBytesKept) return;
    this.largeBuffers.push(buffer);
    this.largeBufferBytes += buffer.length;
  }

  private acquireWriteBuffer(record: RequestRecord): boolean {
    if (record.command === p.kCmdRead) {
      if (!this.acquireBuffer(record)) return false;
      this.setAwaiting(null);
      this.host.device.submit(record.command, record.flags, record.offsetBytes, record.lengthBytes, record.data, record.token);
      return true;
    }
    if (!this.acquireBuffer(record)) return false;
    this.setAwaiting(null);
    this.payloadRecord = record;
    this.parseState = ParseState.Payload;
    return true;
  }

  private fillPayload(chunk: Buffer, position: number, end: number): number {
    const record = this.payloadRecord;
    assert(record !== null && record.data !== null, 'payload state has a record with a buffer');
    const take = Math.min(record.lengthBytes - record.filledBytes, end - position);
    chunk.copy(record.data, record.filledBytes, position, position + take);
    record.filledBytes += take;
    this.payloadBytesCopied += take;
    const remaining = record.lengthBytes - record.filledBytes;
    if (remaining === 0) {
      this.payloadRecord = null;
      this.parseState = ParseState.Header;
      this.submit(record);
    } else if (this.receiveBuffer !== null && remaining >= kDirectReceiveMinBytes) {
      // The chunk is used up (take < remaining): read the rest straight into the payload buffer.
      this.directTarget = record.data.subarray(record.filledBytes);
    }
    return position + take;
  }

  private submit(record: RequestRecord): void {
    record.state = RecordState.Device;
    this.host.device.submit(record.command, record.flags, record.offsetBytes, record.lengthBytes, record.data, record.token);
  }

  private blockStatus(record: RequestRecord): void {
    const offset = record.offsetBytes;
    const length = record.lengthBytes;
    const reqOne = (record.flags & p.kCmdFlagReqOne) !== 0;
    const sizeBytes = this.validation?.sizeBytes ?? 0;
    const asked = Math.max(1, Math.min(length, sizeBytes - offset));
    if (offset >= sizeBytes) {
      this.finish(record, p.kEInval);
      return;
    }
    const extentsPromise = this.host.device.features.blockStatus
      ? this.host.device.getExtents(offset, asked)
      : Promise.resolve<Extent[]>([{ lengthBytes: asked, flags: 0 }]);
    extentsPromise.then(
      (extents) => this.replyBlockStatus(record, extents, asked, reqOne),
      (error: unknown) => {
        this.logger.warn({ err: error }, 'block status failed');
        this.finish(record, p.kEIo);
      },
    );
  }

  // ---- completion and reply path --------------------------------------------------------

  /** The device finished the request with this record index. */
  onDeviceComplete(recordIndex: number, errno: number): void {
    const record = this.records[recordIndex];
    assert(record !== undefined && record.state === RecordState.Device, 'completion for a submitted record');
    this.finish(record, errno);
  }

  private finish(record: RequestRecord, errno: number): void {
    if (this.closed) {
      this.releaseRecord(record);
      this.afterRelease();
      return;
    }
    this.requestsServed += 1;
    if (record.command === p.kCmdRead) {
      this.replyRead(record, errno);
    } else {
      this.beginBatch();
      this.replySimple(record, errno);
      this.releaseRecord(record);
    }
    this.afterRelease();
  }

  private afterRelease(): void {
    if (this.inFlight === 0 && (this.disconnecting || this.closed)) {
      if (this.closed) this.host.connectionClosed(this);
      else this.closeWhenFlushed();
    }
  }

  private releaseRecord(record: RequestRecord): void {
    if (record.fromDevice) {
      this.host.device.releaseBuffer?.(record.token);
      record.fromDevice = false;
      if (record.chargeBytes > 0) {
        this.host.bufferShare?.released(this, record.chargeBytes);
        record.chargeBytes = 0;
        // Shares grew: connections waiting on theirs may go on.
        this.host.wake();
      }
    }
    if (record.largeBuffer !== null) {
      this.giveLargeBuffer(record.largeBuffer);
      record.largeBuffer = null;
    }
    record.data = null;
    record.state = RecordState.Free;
    this.freeRecords.push(record.index);
    this.inFlight -= 1;
    assert(this.inFlight >= 0, 'inFlight never negative');
    if (this.stalledChunk !== null || this.awaitingBuffer !== null) this.host.wake();
  }

  afterLargeWrite(record: RequestRecord): void {
    // close() may already have released it (the socket was destroyed under the write).
    if (record.state !== RecordState.Writing) return;
    this.releaseRecord(record);
    this.afterRelease();
  }

  private reserve(bytes: number): number {
    if (this.outUsed + bytes > this.out.length) {
      this.flushSegment();
      if (this.socket.writableLength === 0 && !this.flushScheduled) {
        this.outStart = 0;
        this.outUsed = 0;
      } else {
        this.out = Buffer.allocUnsafeSlow(Math.max(kOutputArenaBytes, bytes));
        this.outStart = 0;
        this.outUsed = 0;
      }
    }
    const at = this.outUsed;
    this.outUsed += bytes;
    return at;
  }

  private beginBatch(): void {
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    if (this.outStart === this.outUsed && this.socket.writableLength === 0) {
      this.outStart = 0;
      this.outUsed = 0;
    }
    this.socket.cork();
    setImmediate(this.flushBound);
  }

  private flushSegment(): void {
    if (this.outUsed > this.outStart) {
      this.socket.write(this.out.subarray(this.outStart, this.outUsed));
      this.outStart = this.outUsed;
    }
  }

  private flush(): void {
    this.flushScheduled = false;
    if (this.closed) return;
    this.flushSegment();
    this.socket.uncork();
  }

  private writeCookie(at: number, record: RequestRecord): void {
    this.out.writeUInt32BE(record.cookieHigh, at);
    this.out.writeUInt32BE(record.cookieLow, at + 4);
  }

  private replySimple(record: RequestRecord, errno: number): void {
    const at = this.reserve(p.kSimpleReplyHeaderBytes);
    const out = this.out;
    out.writeUInt32BE(p.kSimpleReplyMagic, at);
    out.writeUInt32BE(errno, at + 4);
    this.writeCookie(at + 8, record);
  }

  /** Reserves a chunk header plus `bodyBytes` of body; returns where the body starts. */
  private writeChunkHeader(record: RequestRecord, flags: number, type: number, lengthBytes: number, bodyBytes: number): number {
    const at = this.reserve(p.kStructuredReplyHeaderBytes + bodyBytes);
    const out = this.out;
    out.writeUInt32BE(p.kStructuredReplyMagic, at);
    out.writeUInt16BE(flags, at + 4);
    out.writeUInt16BE(type, at + 6);
    this.writeCookie(at + 8, record);
    out.writeUInt32BE(lengthBytes, at + 16);
    return at + p.kStructuredReplyHeaderBytes;
  }

  private replyRead(record: RequestRecord, errno: number): void {
    this.beginBatch();
    const structured = this.negotiated?.structuredReplies === true;
    const length = record.lengthBytes;
    if (errno !== 0 || length === 0 || record.data === null) {
      if (!structured) this.replySimple(record, errno);
      else if (errno === 0) this.writeChunkHeader(record, p.kReplyFlagDone, p.kReplyTypeNone, 0, 0);
      else {
        const body = this.writeChunkHeader(record, p.kReplyFlagDone, p.kReplyTypeError, 6, 6);
        this.out.writeUInt32BE(errno, body);
        this.out.writeUInt16BE(0, body + 4);
      }
      this.releaseRecord(record);
      return;
    }
    if (structured) {
      const at = this.writeChunkHeader(record, p.kReplyFlagDone, p.kReplyTypeOffsetData, 8 + length, 8);
      this.out.writeUInt32BE(Math.floor(record.offsetBytes / kTwoPow32), at);
      this.out.writeUInt32BE(record.offsetBytes >>> 0, at + 4);
    } else {
      this.replySimple(record, 0);
    }
    if (length <= kInlineReadBytesMax) {
      const at = this.reserve(length);
      this.out.set(record.data, at);
      this.releaseRecord(record);
      return;
    }
    this.flushSegment();
    record.state = RecordState.Writing;
    this.socket.write(record.data, record.onWritten);
  }

  private replyBlockStatus(record: RequestRecord, extents: Extent[], askedBytes: number, reqOne: boolean): void {
    if (this.closed) {
      this.releaseRecord(record);
      this.afterRelease();
      return;
    }
    const lengths: number[] = [];
    const flags: number[] = [];
    let covered = 0;
    for (const extent of extents) {
      let remaining = Math.min(extent.lengthBytes, askedBytes - covered);
      while (remaining > 0 && lengths.length < kExtentsMax) {
        const piece = Math.min(remaining, kExtentBytesMax);
        lengths.push(piece);
        flags.push(extent.flags & (p.kStateHole | p.kStateZero));
        covered += piece;
        remaining -= piece;
      }
      if (covered >= askedBytes || lengths.length >= kExtentsMax || (reqOne && lengths.length > 0)) break;
    }
    if (lengths.length === 0) {
      lengths.push(askedBytes);
      flags.push(0);
    }
    this.requestsServed += 1;
    this.beginBatch();
    const contextId = this.negotiated?.baseAllocationId ?? 0;
    const count = reqOne ? 1 : lengths.length;
    const at = this.writeChunkHeader(record, p.kReplyFlagDone, p.kReplyTypeBlockStatus, 4 + 8 * count, 4 + 8 * count);
    this.out.writeUInt32BE(contextId, at);
    for (let index = 0; index < count; index += 1) {
      this.out.writeUInt32BE(lengths[index] ?? 0, at + 4 + 8 * index);
      this.out.writeUInt32BE(flags[index] ?? 0, at + 8 + 8 * index);
    }
    this.releaseRecord(record);
    this.afterRelease();
  }

  // ---- teardown ---------------------------------------------------------------------------

  private closeWhenFlushed(): void {
    if (this.closed) return;
    if (this.flushScheduled) {
      setImmediate(() => this.closeWhenFlushed());
      return;
    }
    this.socket.end(() => this.close(null));
  }

  /** Drops the connection. Requests still at the device finish silently later. */
  close(reason: string | null): void {
    if (this.closed) return;
    this.closed = true;
    if (reason !== null && reason !== 'client closed the connection') this.logger.info({ reason }, 'closing connection');
    else this.logger.debug({ reason }, 'connection closed');
    const payloadRecord = this.payloadRecord;
    this.payloadRecord = null;
    if (payloadRecord !== null) this.releaseRecord(payloadRecord);
    const waiting = this.awaitingBuffer;
    this.setAwaiting(null);
    if (waiting !== null) {
      waiting.fromDevice = false;
      this.releaseRecord(waiting);
    }
    this.stalledChunk = null;
    this.directTarget = null;
    for (const record of this.records) {
      if (record.state === RecordState.Writing) this.releaseRecord(record);
    }
    this.socket.destroy();
    this.plainSocket?.destroy();
    if (this.inFlight === 0) this.host.connectionClosed(this);
  }
}
