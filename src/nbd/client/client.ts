/**
 * NbdClient: a BlockDevice backed by a remote NBD export (one connection). The mirror uses one
 * per remote leg; resync, tools and tests use its Promise convenience API.
 * Threads: the thread that called `connect` (one client is never shared between threads).
 *
 * Design notes
 * - Hot path (`submit`): no Promise, no closure, no object literal per request. The request
 *   lives in a preallocated RequestTable slot; cookie = (generation << 32) | slot.
 * - Send: 28-byte headers go into a ring arena (HeaderArena, kHeaderArenaBytes). The first
 *   submit of a turn corks the socket and schedules one flush (process.nextTick); the flush
 *   hands the pending header run to the socket and uncorks, so everything submitted in one
 *   turn leaves in one writev. A WRITE's payload is the caller's view, written as is (never
 *   copied); the header run before it is handed over first to keep the order. Arena bytes are
 *   reused once the socket reports the write that carried them as done. A one-header run (a
 *   WRITE's own header) is a view the arena caches per position and the leg actor caches its
 *   payload view per ring slot, so a WRITE costs two chunks of the turn's one writev and no
 *   view of ours (Node's Writable still wraps a plain Uint8Array payload in a Buffer). Header and payload stay two chunks: joining them would need a copy
 *   of the payload (a second userspace copy per WRITE) or a header area in front of every ring
 *   slot (runs of slots must stay contiguous).
 *   nextTick, not setImmediate (measured with 4 KiB requests against nbdkit memory on a Unix
 *   socket, 2 cores): queue depth 1 ~35k vs ~19-34k IOPS, depth 8 ~100-150k vs ~65-140k, depth
 *   64 about equal. Completions arrive in one onread callback, so the resubmits they trigger
 *   are batched by nextTick already, without waiting for the poll phase to end.
 * - Receive: `onread` with one reusable 256 KiB buffer; ReplyParser copies READ data from it into
 *   the destination (the only copy) and completes requests.
 * - Direct receive (plain sockets, `directReceive`, default on): `onread` asks for the next
 *   read's buffer after every read (nextReceiveBuffer). While READ data with
 *   kDirectReceiveMinBytes or more left is being received, the next read goes straight into
 *   the rest of its destination (a ring slot: no copy, and the kernel copies into shared memory
 *   at memcpy speed, where a copy from JS into a SharedArrayBuffer runs byte by byte when the
 *   two addresses are not 8-byte congruent - the measured cost of the copy path). After such a
 *   reply the reads take only the bytes that finish the next header (lookahead: exact header
 *   sizes, 28 for a structured header + OFFSET_DATA offset), so the next large READ's data is
 *   not partly copied; the first reply that had no direct data ends the lookahead. Structured
 *   OFFSET_DATA chunks and simple replies both qualify; holes, errors and small data take the
 *   copy path. Cost: one view per read after the first of a large READ (as on the server), one
 *   more read per reply in lookahead.
 *   Safety: a failure gives the destinations back at once (EIO; the leg actor may reuse the
 *   slot), so fail() re-points the pending read at the receive buffer before anything else
 *   (handle.useUserBuffer, synchronous): no byte lands in a destination after its request
 *   completed. Under TLS the 'data' chunks take the copy path.
 * - Completion: `handler(token, errno)` for caller requests; requests of the Promise API carry
 *   an internal id and the `internal` mark in their slot, so they never reach the handler and
 *   cannot clash with caller tokens.
 * - Failure (protocol error, request timeout, fence(), a drain that outlives the disconnect
 *   bound): every request in flight completes with EIO at once, `closeReason` is set, `onClose`
 *   fires once (not for fence()). The socket is NOT destroyed: the client sends NBD_CMD_DISC
 *   (the spec makes the server finish what it holds, then close), half-closes, ignores further
 *   replies, and keeps reading until the server closes (state FENCING). Only then is it proven
 *   that nothing sent on this connection can still be applied: `fence()` resolves true. A
 *   request that timed out may still land on the server until that moment ("zombie" write).
 *   Headers of the current turn not yet handed to the socket are dropped (their requests
 *   already failed); what the socket holds is whole requests, so DISC follows a request
 *   boundary.
 * - Connection lost (socket closed or reset by the peer) -> CLOSED directly: the server's end
 *   is gone, nothing more can land. destroy() is the hard stop: DISC attempt, then the socket
 *   is destroyed without waiting. A close we caused (destroy, the close() bound) or a network
 *   timeout (keepalive, unreachable host) proves nothing: fence() then stays false.
 * - Requests submitted when not OPEN complete with EIO on a later macrotask (setImmediate:
 *   a handler that resubmits on failure cannot starve the event loop).
 * - Request timeout: one interval timer of requestTimeoutMs/4 bumps an epoch; each slot records
 *   the epoch at submit; a slot 5 epochs old (older than the timeout) fails the connection.
 * - Every wait is bounded: disconnect() drains for at most kDisconnectTimeoutMs (then fails
 *   what is left), then waits at most kDisconnectTimeoutMs for the server's close (then
 *   destroys). fence(timeoutMs) gives up after timeoutMs but keeps the connection, so a later
 *   fence() waits on it again.
 *
 * Pieces: connect + handshake I/O + TLS wrap (client-connect.ts, PendingConnection), options
 * and features (client-options.ts), the Promise API's requests (client-promise.ts), the request
 * table (client-requests.ts), the header arena (client-arena.ts), the reply parser
 * (client-replies.ts). This file keeps submit and batching, completion, and failure/close.
 *
 * States: OPEN --disconnect()--> DRAINING --in flight 0--> CLOSING (DISC sent) --close--> CLOSED
 *         OPEN/DRAINING --protocol error / timeout / fence()--> FENCING (DISC sent, half-closed)
 *         FENCING --server closed / reset / destroy() / close() bound--> CLOSED
 *         any state --socket lost / destroy()--> CLOSED
 */
import type { Socket } from 'node:net';
import { assert } from '../../core/assert.js';
import { settlesWithin } from '../../core/timeout.js';
import { kTwoPow32 } from '../../core/u64.js';
import { EnbdError } from '../../core/errors.js';
import type { Logger } from '../../core/log.js';
import type {
  BlockDevice,
  BlockSizes,
  CompletionHandler,
  DeviceFeatures,
  Extent,
} from '../../core/block-device.js';
import {
  kCmdBlockStatus,
  kCmdCache,
  kCmdDisc,
  kCmdFlush,
  kCmdRead,
  kCmdTrim,
  kCmdWrite,
  kCmdWriteZeroes,
  kDefaultPayloadBytesMax,
  kEIo,
  kENoMem,
  kRequestHeaderBytes,
  kRequestMagic,
} from '../protocol.js';
import { commandNames } from '../protocol-names.js';
import { describeNbdAddress, formatNbdUri, parseNbdUri, type NbdAddress } from '../uri.js';
import { negotiateClient, type HandshakeResult } from './client-handshake.js';
import { RequestTable } from './client-requests.js';
import { ReplyParser, type ReplyEvents } from './client-replies.js';
import { HeaderArena, type RunSink } from './client-arena.js';
import { PendingConnection, type DirectHandle } from './client-connect.js';
import {
  featuresFromFlags,
  kConnectTimeoutMsDefault,
  kDefaultBlockSizes,
  validateOptions,
  type NbdClientOptions,
} from './client-options.js';
import { PromiseRequests } from './client-promise.js';

export type { NbdClientOptions } from './client-options.js';

export const kHeaderArenaBytes = 64 * 1024;
/** Direct receive: the least READ data left that is read straight into its destination. */
export const kDirectReceiveMinBytes = 64 * 1024;
/** Lookahead reads take at most this many bytes (a structured header + OFFSET_DATA offset). */
const kLookaheadBytesMax = 32;
const kDisconnectTimeoutMs = 5000;
/**
 * Socket errors that end the connection without the server's end being known gone (unlike a
 * reset or a close by the peer): a fence cannot be proven by them.
 */
const kUnprovenSocketErrors: ReadonlySet<string> = new Set(['ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'EHOSTDOWN', 'ENETDOWN']);
/** Payload-less commands (TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS) are split at 1 GiB. */
const kPayloadlessBytesMax = 1024 * 1024 * 1024;
const kTimeoutEpochs = 5;
const kStateOpen = 0;
const kStateDraining = 1;
const kStateClosing = 2;
const kStateFencing = 3;
const kStateClosed = 4;

/** NBD_CMD_DISC's header, for the failure path (the arena is reset there). */
const kDiscHeader = ((): Buffer => {
  const header = Buffer.alloc(kRequestHeaderBytes);
  header.writeUInt32BE(kRequestMagic, 0);
  header.writeUInt16BE(kCmdDisc, 6);
  return header;
})();

function noHandler(token: number): void {
  assert(false, `NbdClient completed token ${token} but no completion handler was set`);
}

function flushTurn(client: NbdClient): void {
  client.flushTurnForScheduler();
}

function failPending(client: NbdClient): void {
  client.failPendingForScheduler();
}

export class NbdClient implements BlockDevice, ReplyEvents, RunSink {
  readonly address: NbdAddress;
  readonly exportName: string;
  readonly sizeBytes: number;
  readonly features: DeviceFeatures;
  readonly blockSizes: BlockSizes;
  readonly description: string;
  readonly transmissionFlags: number;
  readonly structuredReplies: boolean;
  /**
   * Called once when the connection ends or fails: null after a clean disconnect, else the
   * reason (lost, protocol error, timeout). Not called for fence() or a disconnect that had to
   * give up waiting (the caller asked for those).
   */
  onClose: ((error: EnbdError | null) => void) | null = null;

  private readonly socket: Socket;
  private readonly serverName: string;
  private readonly logger: Logger | null;
  private readonly debugEnabled: boolean;
  private readonly baseAllocationContextId: number | null;
  private state = kStateOpen;
  private reason: EnbdError | null = null;
  private handler: CompletionHandler = noHandler;
  private readonly table = new RequestTable();
  private readonly parser: ReplyParser;
  // Receive side: the connection's receive buffer, its first 0..kLookaheadBytesMax bytes as
  // views (lookahead reads), and the handle that re-points a pending read (null: copy only).
  private readonly receiveBuffer: Buffer;
  private readonly receiveHeads: Buffer[] = [];
  private readonly directHandle: DirectHandle | null;
  /** The pending read goes into a READ's destination (directTarget), not the receive buffer. */
  private armedDirect = false;
  private lookahead = false;
  // Send side (see design notes).
  private readonly arena: HeaderArena;
  private turnScheduled = false;
  private readonly onRunWritten: (error?: Error | null) => void;
  // Requests that complete with an error without reaching the server (not OPEN, table full).
  private readonly failTokens: number[] = [];
  private readonly failErrnos: number[] = [];
  private readonly failInternal: boolean[] = [];
  private failScheduled = false;
  // Promise API.
  private readonly promises: PromiseRequests;
  // Timeout.
  private readonly requestTimeoutMs: number;
  private timeoutTimer: NodeJS.Timeout | null = null;
  private epoch = 0;
  // Disconnect and fence.
  private drained: (() => void) | null = null;
  private closedPromise: Promise<void> | null = null;
  /** Resolves when the socket has closed (server closed it, reset, or destroyed). */
  private readonly socketClosed: Promise<void>;
  private socketClosedResolve: (() => void) | null = null;
  private lastSocketError: Error | null = null;
  /**
   * The socket's close proves nothing about the server: we destroyed it ourselves, or the
   * network gave up on the peer (keepalive/retransmit timeout, unreachable) while the server
   * may still be running.
   */
  private closeUnproven = false;

  /** Connect, negotiate and return a client in transmission. */
  static async connect(
    uri: string | NbdAddress,
    options: NbdClientOptions = {},
  ): Promise<NbdClient> {
    validateOptions(options);
    const address = typeof uri === 'string' ? parseNbdUri(uri) : uri;
    const exportName = options.exportName ?? address.exportName;
    const timeoutMs = options.connectTimeoutMs ?? kConnectTimeoutMsDefault;
    const connection = new PendingConnection(address, timeoutMs);
    try {
      await connection.connected();
      const result = await negotiateClient(connection, {
        exportName,
        structuredReplies: options.structuredReplies ?? true,
        blockStatus: options.blockStatus ?? true,
        serverName: connection.serverName,
        logger: options.logger,
        tls: address.tls !== undefined,
      });
      const leftover = connection.finishHandshake();
      const directHandle = options.directReceive === false ? null : connection.directHandle();
      const client = new NbdClient(connection.socket, address, exportName, result, options, connection.receiveBuffer, directHandle);
      connection.attach(client);
      if (leftover.length > 0) client.onReceive(leftover, leftover.length);
      return client;
    } catch (error) {
      connection.abort();
      throw error;
    }
  }

  private constructor(
    socket: Socket,
    address: NbdAddress,
    exportName: string,
    result: HandshakeResult,
    options: NbdClientOptions,
    receiveBuffer: Buffer,
    directHandle: DirectHandle | null,
  ) {
    this.socket = socket;
    this.receiveBuffer = receiveBuffer;
    this.directHandle = directHandle;
    for (let bytes = 0; bytes <= kLookaheadBytesMax; bytes += 1) this.receiveHeads.push(receiveBuffer.subarray(0, bytes));
    this.address = address;
    this.exportName = exportName;
    this.serverName = describeNbdAddress(address);
    this.logger = options.logger ?? null;
    this.debugEnabled = this.logger?.isLevelEnabled('debug') ?? false;
    this.sizeBytes = result.sizeBytes;
    this.transmissionFlags = result.transmissionFlags;
    this.structuredReplies = result.structuredReplies;
    this.baseAllocationContextId = result.baseAllocationContextId;
    const blockStatus = result.baseAllocationContextId !== null;
    this.features = featuresFromFlags(result.transmissionFlags, blockStatus);
    this.blockSizes = result.blockSizes ?? { ...kDefaultBlockSizes };
    this.description =
      result.description.length > 0 ? result.description : formatNbdUri({ ...address, exportName });
    this.parser = new ReplyParser(this.table, this);
    this.arena = new HeaderArena(kHeaderArenaBytes, this);
    this.onRunWritten = () => this.arena.releaseRun();
    this.promises = new PromiseRequests((command, flags, offsetBytes, lengthBytes, data, id) =>
      this.submitRequest(command, flags, offsetBytes, lengthBytes, data, id, true),
    );
    this.socketClosed = new Promise<void>((resolve) => (this.socketClosedResolve = resolve));
    this.requestTimeoutMs = options.requestTimeoutMs ?? 0;
    if (this.requestTimeoutMs > 0) {
      const periodMs = Math.max(1, Math.floor(this.requestTimeoutMs / (kTimeoutEpochs - 1)));
      this.timeoutTimer = setInterval(() => this.checkTimeouts(), periodMs);
      this.timeoutTimer.unref();
    }
    assert(this.sizeBytes >= 0, 'export size is known');
    this.logger?.debug(
      {
        server: this.serverName,
        exportName,
        sizeBytes: this.sizeBytes,
        flags: this.transmissionFlags,
      },
      'nbd client: connected',
    );
  }

  get isConnected(): boolean {
    return this.state === kStateOpen || this.state === kStateDraining;
  }

  /** Why the connection ended (null while open or after a clean disconnect). */
  get closeReason(): EnbdError | null {
    return this.reason;
  }

  get inFlight(): number {
    return this.table.inUseCount + this.failTokens.length;
  }

  setCompletionHandler(handler: CompletionHandler): void {
    assert(typeof handler === 'function', 'completion handler is a function');
    this.handler = handler;
  }

  submit(
    command: number,
    flags: number,
    offsetBytes: number,
    lengthBytes: number,
    data: Uint8Array | null,
    token: number,
  ): void {
    assert(command !== kCmdBlockStatus, 'BLOCK_STATUS is internal (getExtents)');
    assert(command !== kCmdDisc, 'DISC is internal (disconnect)');
    this.submitRequest(command, flags, offsetBytes, lengthBytes, data, token, false);
  }

  private submitRequest(
    command: number,
    flags: number,
    offsetBytes: number,
    lengthBytes: number,
    data: Uint8Array | null,
    token: number,
    internal: boolean,
  ): void {
    assert(Number.isSafeInteger(offsetBytes) && offsetBytes >= 0, 'offset is a safe integer >= 0');
    assert(Number.isInteger(lengthBytes) && lengthBytes >= 0, 'length is an integer >= 0');
    assert(lengthBytes < kTwoPow32, 'length fits u32');
    if (command === kCmdRead || command === kCmdWrite) {
      assert(data !== null && data.length === lengthBytes, 'READ/WRITE data is lengthBytes long');
    }
    if (this.state !== kStateOpen) return this.failLater(token, kEIo, internal);
    const table = this.table;
    const slot = table.acquire();
    if (slot < 0) return this.failLater(token, kENoMem, internal);
    table.command[slot] = command;
    table.internal[slot] = internal ? 1 : 0;
    table.token[slot] = token;
    table.offsetBytes[slot] = offsetBytes;
    table.lengthBytes[slot] = lengthBytes;
    table.epoch[slot] = this.epoch;
    table.data[slot] = command === kCmdRead ? data : null;
    const cookieHigh = table.generation[slot] as number;
    this.writeHeader(command, flags, cookieHigh, slot, offsetBytes, lengthBytes);
    if (command === kCmdWrite && lengthBytes > 0) {
      assert(data !== null, 'WRITE has a payload');
      this.arena.flushRun();
      this.socket.write(data);
    }
  }

  // ---- send side -------------------------------------------------------------------------

  private writeHeader(
    command: number,
    flags: number,
    cookieHigh: number,
    cookieLow: number,
    offsetBytes: number,
    lengthBytes: number,
  ): void {
    if (!this.turnScheduled) {
      this.turnScheduled = true;
      this.socket.cork();
      process.nextTick(flushTurn, this);
    }
    let target = this.arena.buffer;
    let at = this.arena.reserve();
    if (at < 0) {
      // Arena full (the socket is backed up): this header gets its own buffer.
      this.arena.flushRun();
      target = Buffer.allocUnsafe(kRequestHeaderBytes);
      at = 0;
    }
    target.writeUInt32BE(kRequestMagic, at);
    target.writeUInt16BE(flags, at + 4);
    target.writeUInt16BE(command, at + 6);
    target.writeUInt32BE(cookieHigh, at + 8);
    target.writeUInt32BE(cookieLow, at + 12);
    target.writeUInt32BE(Math.floor(offsetBytes / kTwoPow32), at + 16);
    target.writeUInt32BE(offsetBytes >>> 0, at + 20);
    target.writeUInt32BE(lengthBytes, at + 24);
    if (target !== this.arena.buffer) this.socket.write(target);
  }

  /** @internal RunSink: the arena hands over a run of headers. */
  writeRun(view: Buffer): void {
    this.socket.write(view, this.onRunWritten);
  }

  /** @internal Called once per turn (process.nextTick) after the first submit of the turn. */
  flushTurnForScheduler(): void {
    assert(this.turnScheduled, 'turn flush was scheduled');
    this.turnScheduled = false;
    // FENCING/CLOSED: the socket was ended (end() uncorked it) or destroyed; write nothing.
    if (this.state === kStateClosed || this.state === kStateFencing) return;
    this.arena.flushRun();
    this.socket.uncork();
  }

  // ---- completion ------------------------------------------------------------------------

  private failLater(token: number, errno: number, internal: boolean): void {
    this.failTokens.push(token);
    this.failErrnos.push(errno);
    this.failInternal.push(internal);
    if (!this.failScheduled) {
      this.failScheduled = true;
      setImmediate(failPending, this);
    }
  }

  /** @internal */
  failPendingForScheduler(): void {
    this.failScheduled = false;
    const count = this.failTokens.length;
    const tokens = this.failTokens.splice(0, count);
    const errnos = this.failErrnos.splice(0, count);
    const internal = this.failInternal.splice(0, count);
    for (let index = 0; index < count; index++) {
      this.complete(tokens[index] as number, errnos[index] as number, internal[index] === true);
    }
  }

  private complete(token: number, errno: number, internal: boolean): void {
    if (internal) this.promises.complete(token, errno, this.reason);
    else this.handler(token, errno);
  }

  /** @internal ReplyEvents: the parser finished a request. */
  onReplyDone(slot: number, errno: number): void {
    if (!this.parser.lastReplyDirect) this.lookahead = false;
    const table = this.table;
    const token = table.token[slot] as number;
    const internal = table.internal[slot] === 1;
    table.release(slot);
    this.complete(token, errno, internal);
    if (this.drained !== null && table.inUseCount === 0) this.drained();
  }

  /** @internal */
  onBlockStatus(slot: number, view: Buffer, start: number, end: number): void {
    assert(this.table.internal[slot] === 1, 'BLOCK_STATUS is only sent by getExtents');
    const request = this.promises.get(this.table.token[slot] as number);
    if (request === undefined || view.readUInt32BE(start) !== this.baseAllocationContextId) return;
    const extents: Extent[] = [];
    for (let at = start + 4; at + 8 <= end; at += 8) {
      extents.push({ lengthBytes: view.readUInt32BE(at), flags: view.readUInt32BE(at + 4) });
    }
    request.extents = extents;
  }

  /** @internal */
  onChunkError(slot: number, errno: number, message: string): void {
    if (!this.debugEnabled) return;
    const command = this.table.command[slot] as number;
    this.logger?.debug(
      { server: this.serverName, command: commandNames[command], errno, message },
      'nbd client: error chunk',
    );
  }

  /** @internal */
  onProtocolError(message: string): void {
    const text = `NBD server ${this.serverName} broke the protocol: ${message}`;
    this.fail(new EnbdError('ENBD_ERR_PROTOCOL', text));
  }

  /** @internal Receive path (TLS 'data', handshake leftovers): `count` new bytes at the start of `buffer`. */
  onReceive(buffer: Buffer, count: number): void {
    // FENCING: the server is finishing what it holds; its replies are ignored.
    if (this.state === kStateClosed || this.state === kStateFencing) return;
    this.parser.push(buffer, 0, count);
  }

  /** @internal Receive path (onread): `count` bytes landed in the last nextReceiveBuffer(). */
  onRead(count: number): void {
    if (this.armedDirect) {
      this.armedDirect = false;
      if (this.state === kStateClosed || this.state === kStateFencing) return;
      this.parser.directReceived(count);
      return;
    }
    this.onReceive(this.receiveBuffer, count);
  }

  /** @internal onread: the buffer of the next read (see "Direct receive" in the notes). */
  nextReceiveBuffer(): Uint8Array {
    this.armedDirect = false;
    const parser = this.parser;
    if (this.directHandle === null || this.state === kStateClosed || this.state === kStateFencing || parser.isDead) {
      return this.receiveBuffer;
    }
    const target = parser.directTarget(kDirectReceiveMinBytes);
    if (target !== null) {
      this.armedDirect = true;
      this.lookahead = true;
      return target;
    }
    if (!this.lookahead) return this.receiveBuffer;
    const wantBytes = parser.wantBytes(this.structuredReplies);
    if (wantBytes <= 0 || wantBytes > kLookaheadBytesMax) {
      this.lookahead = false; // small READ data left: copy it with whatever follows
      return this.receiveBuffer;
    }
    return this.receiveHeads[wantBytes] as Buffer;
  }

  /** READ data bytes copied from the receive buffer / read straight into destinations. */
  get readBytesCopied(): number {
    return this.parser.dataBytesCopied;
  }

  get readBytesDirect(): number {
    return this.parser.dataBytesDirect;
  }

  /** A pending read into a destination is re-pointed at the receive buffer (synchronous). */
  private disarmDirect(): void {
    this.lookahead = false;
    if (!this.armedDirect) return;
    this.armedDirect = false;
    if (!this.socket.destroyed) this.directHandle?.useUserBuffer(this.receiveBuffer);
  }

  // ---- failure, timeout and close ----------------------------------------------------------

  /**
   * Failure: everything in flight completes with EIO now; the connection is fenced (DISC sent,
   * half-closed, replies ignored) and kept until the server closes it. `notify` false: fence()
   * or a bounded disconnect, which do not fire onClose.
   */
  private fail(reason: EnbdError, notify = true): void {
    if (this.state === kStateClosed || this.state === kStateFencing) return;
    const wasClosing = this.state === kStateClosing;
    this.reason = wasClosing ? null : reason;
    this.parser.kill();
    this.disarmDirect();
    if (this.timeoutTimer !== null) clearInterval(this.timeoutTimer);
    this.timeoutTimer = null;
    this.arena.reset();
    const socket = this.socket;
    if (wasClosing || socket.destroyed) {
      // DISC already sent (CLOSING), or the socket is gone: nothing more to send.
      this.state = wasClosing && !socket.destroyed ? kStateFencing : kStateClosed;
    } else {
      this.state = kStateFencing;
      if (socket.writable) {
        socket.write(kDiscHeader);
        socket.end();
      }
    }
    if (!wasClosing && notify) {
      this.logger?.warn({ server: this.serverName, code: reason.code }, reason.message);
    }
    this.failInFlight();
    this.drained?.();
    const onClose = this.onClose;
    if (onClose !== null && notify) onClose(this.reason);
  }

  private failInFlight(): void {
    const table = this.table;
    for (let slot = 0; slot < table.capacity && table.inUseCount > 0; slot++) {
      if (table.inUse[slot] !== 1) continue;
      const token = table.token[slot] as number;
      const internal = table.internal[slot] === 1;
      table.release(slot);
      this.complete(token, kEIo, internal);
    }
  }

  /** @internal Socket 'close' (connection lost, closed after DISC, or destroyed). */
  handleSocketClose(): void {
    const previous = this.state;
    if (previous !== kStateClosed && previous !== kStateFencing) {
      const error = this.lastSocketError;
      const detail = error === null ? 'closed by the server' : `lost: ${error.message}`;
      const text = `connection to NBD server ${this.serverName} ${detail}`;
      this.fail(new EnbdError('ENBD_ERR_CLOSED', text, kEIo));
    }
    this.state = kStateClosed;
    if (previous === kStateFencing) {
      this.logger?.debug({ server: this.serverName }, 'nbd client: fenced connection closed');
    }
    this.socketClosedResolve?.();
    this.socketClosedResolve = null;
  }

  /** @internal */
  handleSocketError(error: Error): void {
    this.lastSocketError = error;
    const code = (error as NodeJS.ErrnoException).code;
    if (code !== undefined && kUnprovenSocketErrors.has(code)) this.closeUnproven = true;
  }

  private checkTimeouts(): void {
    this.epoch = (this.epoch + 1) >>> 0;
    const table = this.table;
    if (table.inUseCount === 0) return;
    for (let slot = 0; slot < table.capacity; slot++) {
      if (table.inUse[slot] !== 1) continue;
      if (((this.epoch - (table.epoch[slot] as number)) >>> 0) < kTimeoutEpochs) continue;
      const command = commandNames[table.command[slot] as number] ?? 'request';
      const where = `${table.offsetBytes[slot] as number}+${table.lengthBytes[slot] as number}`;
      this.fail(
        new EnbdError(
          'ENBD_ERR_TIMEOUT',
          `NBD server ${this.serverName} did not answer ${command} at ${where} ` +
            `within ${this.requestTimeoutMs} ms`,
          kEIo,
        ),
      );
      return;
    }
  }

  /**
   * Hard stop: requests in flight complete with EIO, DISC is attempted, the socket is
   * destroyed without waiting for the server.
   */
  destroy(reason?: EnbdError): void {
    const text = `connection to NBD server ${this.serverName} destroyed`;
    this.fail(reason ?? new EnbdError('ENBD_ERR_CLOSED', text, kEIo));
    this.destroySocket();
  }

  private destroySocket(): void {
    if (this.socket.destroyed) return;
    this.closeUnproven = true;
    this.socket.destroy();
  }

  /**
   * Stop using the connection now (requests in flight complete with EIO, new ones fail; no
   * onClose) and resolve true once the server closed it (or it was already closed, or lost):
   * nothing sent on it can be applied any more. False after `timeoutMs`; the connection is
   * kept and a later fence() waits on it again (close() or destroy() end it for good). False
   * for good once this side destroyed the socket before the server closed it (destroy(), or the
   * close() bound): that proves nothing about what the server still holds.
   */
  async fence(timeoutMs: number): Promise<boolean> {
    assert(Number.isFinite(timeoutMs) && timeoutMs >= 0, 'fence timeout is a finite number >= 0');
    if (this.state === kStateOpen || this.state === kStateDraining) {
      const text = `connection to NBD server ${this.serverName} fenced`;
      this.fail(new EnbdError('ENBD_ERR_CLOSED', text, kEIo), false);
    }
    assert(this.state === kStateClosing || this.state === kStateFencing || this.state === kStateClosed, 'fenced');
    if (this.state !== kStateClosed && !(await this.waitSocketClosed(timeoutMs))) return false;
    return !this.closeUnproven;
  }

  /** True once the socket closed, false after `timeoutMs`. */
  private async waitSocketClosed(timeoutMs: number): Promise<boolean> {
    if (this.state === kStateClosed) return true;
    return await settlesWithin(this.socketClosed, timeoutMs);
  }

  /** Wait for requests in flight, send NBD_CMD_DISC, close. Idempotent; bounded. */
  async disconnect(): Promise<void> {
    if (this.closedPromise === null) this.closedPromise = this.runDisconnect();
    await this.closedPromise;
  }

  close(): Promise<void> {
    return this.disconnect();
  }

  private async runDisconnect(): Promise<void> {
    if (this.state === kStateOpen) {
      this.state = kStateDraining;
      if (this.table.inUseCount > 0) await this.waitDrained();
      if (this.state === kStateDraining && this.table.inUseCount > 0) {
        const text = `NBD server ${this.serverName} did not finish its requests within ${kDisconnectTimeoutMs} ms of the disconnect`;
        this.fail(new EnbdError('ENBD_ERR_TIMEOUT', text, kEIo), false);
      }
      if (this.state === kStateDraining) {
        this.writeHeader(kCmdDisc, 0, 0, 0, 0, 0);
        this.state = kStateClosing;
        this.arena.flushRun();
        this.socket.end();
      }
    }
    if (!(await this.waitSocketClosed(kDisconnectTimeoutMs))) this.destroySocket();
    await this.socketClosed;
    this.logger?.debug({ server: this.serverName }, 'nbd client: disconnected');
  }

  /** Resolves when nothing is in flight any more (or the connection failed), or at the bound. */
  private async waitDrained(): Promise<void> {
    let timer: NodeJS.Timeout | null = null;
    await new Promise<void>((resolve) => {
      this.drained = resolve;
      timer = setTimeout(resolve, kDisconnectTimeoutMs);
    });
    if (timer !== null) clearTimeout(timer);
    this.drained = null;
  }

  // ---- Promise API -------------------------------------------------------------------------

  private payloadChunkBytes(): number {
    const { minimumBytes, maximumBytes } = this.blockSizes;
    const bytes = Math.min(maximumBytes, kDefaultPayloadBytesMax);
    return Math.max(minimumBytes, bytes - (bytes % minimumBytes));
  }

  async read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    const target = Buffer.allocUnsafe(lengthBytes);
    await this.readInto(offsetBytes, target);
    return target;
  }

  async readInto(offsetBytes: number, target: Uint8Array): Promise<void> {
    await this.promises.pieces(kCmdRead, 0, offsetBytes, target.length, this.payloadChunkBytes(), target);
  }

  async write(offsetBytes: number, data: Uint8Array, flags = 0): Promise<void> {
    await this.promises.pieces(kCmdWrite, flags, offsetBytes, data.length, this.payloadChunkBytes(), data);
  }

  async flush(flags = 0): Promise<void> {
    await this.promises.request(kCmdFlush, flags, 0, 0, null);
  }

  async trim(offsetBytes: number, lengthBytes: number, flags = 0): Promise<void> {
    await this.promises.pieces(kCmdTrim, flags, offsetBytes, lengthBytes, kPayloadlessBytesMax, null);
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, flags = 0): Promise<void> {
    await this.promises.pieces(kCmdWriteZeroes, flags, offsetBytes, lengthBytes, kPayloadlessBytesMax, null);
  }

  async cache(offsetBytes: number, lengthBytes: number): Promise<void> {
    await this.promises.pieces(kCmdCache, 0, offsetBytes, lengthBytes, kPayloadlessBytesMax, null);
  }

  /** base:allocation extents from `offsetBytes` (one data extent when not negotiated). */
  async getExtents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    assert(Number.isSafeInteger(lengthBytes) && lengthBytes > 0, 'extent query length is positive');
    assert(Number.isSafeInteger(offsetBytes), 'extent query offset is an integer');
    assert(offsetBytes >= 0 && offsetBytes < this.sizeBytes, 'extent query inside the export');
    if (this.baseAllocationContextId === null) return [{ lengthBytes, flags: 0 }];
    const countBytes = Math.min(lengthBytes, kPayloadlessBytesMax, this.sizeBytes - offsetBytes);
    const id = this.promises.upcomingId; // the id `request` is about to use
    const done = this.promises.request(kCmdBlockStatus, 0, offsetBytes, countBytes, null);
    const request = this.promises.get(id);
    assert(request !== undefined, 'block status request registered');
    assert(request.command === kCmdBlockStatus, 'registered request is the block status one');
    await done;
    const extents = request?.extents ?? null;
    if (extents === null || extents.length === 0) return [{ lengthBytes: countBytes, flags: 0 }];
    return extents;
  }
}
