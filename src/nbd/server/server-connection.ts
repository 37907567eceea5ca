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
 * (chunk, position), pauses the socket, and resumes when a record or buffer frees. Direct
 * receive (server-receive.ts) reads a large payload's rest straight into its buffer; after
 * such a payload the next read asks for one header only, so a large WRITE behind it lands
 * in its own buffer whole instead of partly in the receive buffer and then copied.
 *
 * Timeouts (server-timeouts.ts; no timer per connection or request, the server's sweep calls
 * checkTimeouts): a handshake must finish within the handshake timeout; a client in the
 * middle of a request (WRITE payload, rejected payload being discarded, part of a header)
 * that sends nothing for the payload timeout is disconnected, and close() releases the
 * buffers it held. A chunk counter is all the receive path pays for it. After DISC (or the
 * client's EOF) the connection drains: every request received in full before it is answered
 * (one still waiting for a buffer is parsed and served when one frees), within a drain limit.
 *
 * Pieces: request records and header decoding (server-records.ts), payload buffers and the
 * fair share (server-buffers.ts), replies and per-turn batching (server-replies.ts), block
 * status (server-block-status.ts), direct receive (server-receive.ts), timeouts
 * (server-timeouts.ts). This file keeps the state machine: receive and parse, dispatch,
 * completion and teardown.
 *
 * Reply path (server-replies.ts): an output arena, corked on the first reply of an event-loop
 * turn and flushed once in setImmediate, so a turn's replies leave in one writev.
 *
 * Request record states: see server-records.ts (free, payload, device, writing).
 *
 * Invariants:
 * - Every request gets exactly one reply unless the connection is gone.
 * - A device buffer is released exactly once, after the last read of it.
 * - The connection's token range stays reserved until every submitted request completed, so
 *   a late completion can never reach another connection.
 * - A WRITE payload is always consumed (or the connection dropped) before the next header.
 */
import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import type { Logger } from '../../core/log.js';
import type { BlockDevice, Extent } from '../../core/block-device.js';
import { kDirtyFlag, mapExtents, type MetaContextSource } from './meta-contexts.js';
import { assert } from '../../core/assert.js';
import { copyBytes } from '../../core/copy-bytes.js';
import * as p from '../protocol.js';
import { OptionNegotiator, encodeGreeting, type ExportDescriptor, type NegotiatedState } from './server-options.js';
import { validateRequest, type ValidationContext } from './request-validate.js';
import type { BufferShare, ShareUser } from './buffer-share.js';
import { peerVerifyError, upgradeServerSocket, type ServerTls } from './server-tls.js';
import {
  RecordState,
  RequestRecord,
  decodeRequestHeader,
  kRequestIndexBits,
  kRequestsPerConnection,
  type RecordOwner,
} from './server-records.js';
import { RecordBuffers } from './server-buffers.js';
import { ReplyWriter } from './server-replies.js';
import { blockStatusAskedBytes, clipExtents, deviceExtents, kExtentsMax } from './server-block-status.js';
import { adoptForDirectReceive, kDirectReceiveMinBytes, kReceiveBufferBytes } from './server-receive.js';
import { ConnectionClock, TimeoutVerdict, kDisconnectDrainMs } from './server-timeouts.js';

const enum ParseState {
  Header = 0,
  Payload = 1,
  Discard = 2,
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
  /** Status contexts beyond base:allocation (checkpoints, dirty maps), or null. */
  readonly metaContexts: MetaContextSource | null;
  connectionClosed(connection: ServerConnection): void;
  /** Register a connection whose parsing stalled; `resume()` is called after a `wake()`. */
  stalled(connection: ServerConnection): void;
  /** Something freed (a record or a device buffer): resume stalled connections soon. */
  wake(): void;
}

export class ServerConnection implements ShareUser, RecordOwner {
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
  /** The receive buffer's first 28 bytes: the read after a large WRITE asks for one header. */
  private readonly headerTarget: Buffer | null = null;
  private directTarget: Uint8Array | null = null;
  private readonly buffers: RecordBuffers;
  payloadBytesCopied = 0;
  payloadBytesDirect = 0;
  /** Record parsed from a WRITE header that is still waiting for a device buffer. */
  private awaitingBuffer: RequestRecord | null = null;
  private readonly replies: ReplyWriter;
  private closed = false;
  private disconnecting = false;
  /** The client half-closed (EOF) while received bytes still waited to be parsed (a stall). */
  private inputEnded = false;
  inFlight = 0;
  requestsServed = 0;
  /** ShareUser: charged device-buffer bytes held, and whether parsing waits for a buffer. */
  shareHeldBytes = 0;
  shareWanting = false;
  /** Timeouts (checked by the server's sweep): credited handshake and silence time. */
  private readonly clock = new ConnectionClock();

  constructor(
    readonly index: number,
    acceptedSocket: Socket,
    private readonly host: ConnectionHost,
    private readonly logger: Logger,
    directReceive = false,
  ) {
    if (directReceive) {
      this.receiveBuffer = Buffer.allocUnsafeSlow(kReceiveBufferBytes);
      this.headerTarget = this.receiveBuffer.subarray(0, p.kRequestHeaderBytes);
      this.socket = this.adoptForDirectReceive(acceptedSocket);
    } else {
      this.socket = acceptedSocket;
    }
    const socket = this.socket;
    this.buffers = new RecordBuffers(host, this);
    this.replies = new ReplyWriter(socket);
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
      host.metaContexts,
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
    this.replies.socket = secured;
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
    if (this.negotiated === null) {
      this.close('client left during the handshake');
    } else if (!this.disconnecting && (this.stalledChunk !== null || this.awaitingBuffer !== null)) {
      // Bytes the client sent before its EOF still wait for a record or a buffer (they may
      // hold a DISC): resume() parses them first, then ends the input.
      this.inputEnded = true;
    } else {
      this.endOfInput();
    }
  }

  /**
   * Every byte the client sent before its EOF is parsed. A request cut short by the EOF is
   * never submitted or answered (the connection drops, with what is in flight); otherwise the
   * connection drains like after DISC: requests received in full are answered, then it closes.
   */
  private endOfInput(): void {
    if (this.payloadRecord !== null || this.parseState !== ParseState.Header || this.headerFilled > 0) {
      this.close('client left in the middle of a request');
      return;
    }
    // Replies of requests that already completed may still sit corked in this turn's
    // batch: let them leave before the socket closes.
    this.disconnecting = true;
    if (this.inFlight === 0) this.closeWhenFlushed();
  }

  private onData(chunk: Buffer, end: number): void {
    this.clock.receivedChunks += 1;
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
    const receiveBuffer = this.receiveBuffer as Buffer;
    return adoptForDirectReceive(accepted, {
      buffer: (): Uint8Array => this.directTarget ?? receiveBuffer,
      callback: (bytes: number, buffer: Uint8Array): boolean => this.onReceive(bytes, buffer),
    });
  }

  private onReceive(bytes: number, buffer: Uint8Array): boolean {
    if (buffer === this.receiveBuffer) {
      this.onData(this.receiveBuffer, bytes);
      return true;
    }
    if (buffer === this.headerTarget) {
      // The header-sized read after a large WRITE (the same memory as the receive buffer):
      // a large WRITE behind it gets its whole payload read into its own buffer.
      this.directTarget = null;
      this.onData(this.receiveBuffer as Buffer, bytes);
      return true;
    }
    // The bytes went straight into the payload record's buffer.
    const record = this.payloadRecord;
    if (record === null || this.closed) return true;
    this.clock.receivedChunks += 1;
    record.filledBytes += bytes;
    this.payloadBytesDirect += bytes;
    const remaining = record.lengthBytes - record.filledBytes;
    if (remaining > 0) {
      this.directTarget = (record.data as Uint8Array).subarray(record.filledBytes);
      return true;
    }
    // The next request's header is read alone, so a large payload behind it is not read into
    // the receive buffer and copied (a stream of large WRITEs costs one more read each).
    this.directTarget = this.headerTarget;
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
      metaContextSelected: state.baseAllocationId !== 0 || state.extraContexts.length > 0,
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
   * server holds the connection paused (no record or buffer free) never counts. A connection
   * draining after DISC or the client's EOF (waiting for buffers, the device, or a client
   * that does not read its replies) is closed after kDisconnectDrainMs of credited time.
   */
  checkTimeouts(nowMs: number, creditMs: number, handshakeTimeoutMs: number, payloadTimeoutMs: number): void {
    if (this.closed) return;
    const inHandshake = this.negotiated === null;
    const owes = !inHandshake && this.owesBytes();
    const draining = this.disconnecting || this.inputEnded;
    const verdict = this.clock.check(nowMs, creditMs, handshakeTimeoutMs, payloadTimeoutMs, inHandshake, owes, draining);
    if (verdict === TimeoutVerdict.Drain) {
      this.close(`requests and replies did not drain within ${kDisconnectDrainMs} ms of the disconnect`);
    } else if (verdict === TimeoutVerdict.Handshake) {
      this.close(`handshake not finished within ${handshakeTimeoutMs} ms`);
    } else if (verdict === TimeoutVerdict.Silence) {
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
    this.directPayloadRest();
  }

  /** Direct receive: a payload whose rest is large is read straight into its buffer. */
  private directPayloadRest(): void {
    const record = this.payloadRecord;
    if (this.receiveBuffer === null || record === null || this.parseState !== ParseState.Payload) return;
    if (this.directTarget !== null && this.directTarget !== this.headerTarget) return;
    if (record.lengthBytes - record.filledBytes < kDirectReceiveMinBytes || this.closed) return;
    this.directTarget = (record.data as Uint8Array).subarray(record.filledBytes);
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
    if (chunk !== null) {
      if (this.parseState === ParseState.Header && this.freeRecords.length === 0) return true;
      this.stalledChunk = null;
      this.parse(chunk, this.stalledPosition, this.stalledEnd);
      if (this.stalledChunk !== null) return true;
    }
    if (this.inputEnded) {
      // The client's EOF came while these bytes waited; a DISC among them already drains.
      this.inputEnded = false;
      if (!this.disconnecting && !this.closed) this.endOfInput();
    } else if (!this.disconnecting && !this.closed && chunk !== null) {
      this.socket.resume();
    }
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
    decodeRequestHeader(bytes, position, record);
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
      if (!this.buffers.acquire(record)) {
        this.setAwaiting(record);
        return false;
      }
      this.host.device.submit(command, record.flags, record.offsetBytes, record.lengthBytes, record.data, record.token, record.deviceHandle);
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

  private acquireWriteBuffer(record: RequestRecord): boolean {
    if (record.command === p.kCmdRead) {
      if (!this.buffers.acquire(record)) return false;
      this.setAwaiting(null);
      this.host.device.submit(record.command, record.flags, record.offsetBytes, record.lengthBytes, record.data, record.token, record.deviceHandle);
      return true;
    }
    if (!this.buffers.acquire(record)) return false;
    this.setAwaiting(null);
    this.payloadRecord = record;
    this.parseState = ParseState.Payload;
    return true;
  }

  private fillPayload(chunk: Buffer, position: number, end: number): number {
    const record = this.payloadRecord;
    assert(record !== null && record.data !== null, 'payload state has a record with a buffer');
    const take = Math.min(record.lengthBytes - record.filledBytes, end - position);
    // copyBytes: a 4 KiB payload behind a 28-byte request header is not 8-byte congruent with
    // its slot every other request, and V8 copies such a pair into shared memory byte by byte.
    copyBytes(record.data, record.filledBytes, chunk, position, position + take);
    record.filledBytes += take;
    this.payloadBytesCopied += take;
    const remaining = record.lengthBytes - record.filledBytes;
    if (remaining === 0) {
      this.payloadRecord = null;
      this.parseState = ParseState.Header;
      this.submit(record);
    }
    // With bytes left (the chunk is used up), parse() ends in directPayloadRest().
    return position + take;
  }

  private submit(record: RequestRecord): void {
    record.state = RecordState.Device;
    this.buffers.submitting(record);
    this.host.device.submit(record.command, record.flags, record.offsetBytes, record.lengthBytes, record.data, record.token, record.deviceHandle);
  }

  private blockStatus(record: RequestRecord): void {
    const offset = record.offsetBytes;
    const length = record.lengthBytes;
    const reqOne = (record.flags & p.kCmdFlagReqOne) !== 0;
    const sizeBytes = this.validation?.sizeBytes ?? 0;
    const asked = blockStatusAskedBytes(offset, length, sizeBytes);
    if (offset >= sizeBytes) {
      this.finish(record, p.kEInval);
      return;
    }
    if (this.negotiated?.baseAllocationId === 0) {
      this.replyBlockStatus(record, null, asked, reqOne);
      return;
    }
    deviceExtents(this.host.device, offset, asked).then(
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
      this.replies.beginBatch();
      this.replies.simple(record, errno);
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
    this.buffers.release(record);
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

  private replyRead(record: RequestRecord, errno: number): void {
    const structured = this.negotiated?.structuredReplies === true;
    if (this.replies.read(record, errno, structured)) this.releaseRecord(record);
  }

  /**
   * One status chunk per selected context: base:allocation (`extents`, null when not selected)
   * first, then the other contexts in selection order; the last chunk carries DONE.
   */
  private replyBlockStatus(record: RequestRecord, extents: Extent[] | null, askedBytes: number, reqOne: boolean): void {
    if (this.closed) {
      this.releaseRecord(record);
      this.afterRelease();
      return;
    }
    const extra = this.negotiated?.extraContexts ?? [];
    this.requestsServed += 1;
    if (extents !== null) this.writeStatusChunk(record, this.negotiated?.baseAllocationId ?? 0, extents, askedBytes, reqOne, extra.length === 0, p.kStateHole | p.kStateZero);
    const source = this.host.metaContexts;
    for (const [index, context] of extra.entries()) {
      const found = mapExtents(source?.map(context.name) ?? null, record.offsetBytes, askedBytes, reqOne ? 1 : kExtentsMax);
      this.writeStatusChunk(record, context.id, found, askedBytes, reqOne, index === extra.length - 1, kDirtyFlag);
    }
    this.releaseRecord(record);
    this.afterRelease();
  }

  private writeStatusChunk(record: RequestRecord, contextId: number, extents: Extent[], askedBytes: number, reqOne: boolean, done: boolean, flagMask: number): void {
    const lengths: number[] = [];
    const flags: number[] = [];
    clipExtents(extents, askedBytes, reqOne, lengths, flags, flagMask);
    const count = reqOne ? 1 : lengths.length;
    this.replies.blockStatus(record, contextId, lengths, flags, count, done);
  }

  // ---- teardown ---------------------------------------------------------------------------

  private closeWhenFlushed(): void {
    if (this.closed) return;
    if (this.replies.flushScheduled) {
      setImmediate(() => this.closeWhenFlushed());
      return;
    }
    this.socket.end(() => this.close(null));
  }

  /** Drops the connection. Requests still at the device finish silently later. */
  close(reason: string | null): void {
    if (this.closed) return;
    this.closed = true;
    this.replies.stop();
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
