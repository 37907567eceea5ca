/**
 * Fault-injecting in-memory legs for engine tests (issue 10), plus a small promise driver for a
 * MirrorDevice (the NBD server's calling convention without a socket).
 *
 * - `FaultStore`: one per leg; the "server": its bytes, the durable image as of the last good
 *   flush, a log of applied writes and of every request it was sent, and the faults the test
 *   turns on. It outlives connections (a reconnect opens a new FaultLeg on the same store).
 * - `FaultLeg`: one per connection (each opener call), a BlockDevice like NbdClient: pipelined,
 *   completes asynchronously, optional request timeout that fails the whole connection (all in
 *   flight EIO, onClose), fence(timeoutMs), close().
 * - `faultOpener(stores)`: a LegDeviceOpener for MirrorOptions.openDevice; leg URIs are the
 *   store names ('fault-leg-0', ...).
 * - `MirrorDriver`: write/read/flush/trim/zero on a MirrorDevice as promises of an errno.
 *
 * Threads: test main thread only (inline placement).
 *
 * Design notes: client side vs server side of a connection
 *   The FaultLeg keeps the client's view (`waiting`: tokens submitted and not yet completed).
 *   The store keeps the server's view (`ServerRequest`s it received and has not executed).
 *   They part ways exactly where NBD does:
 *   | event                  | client side (tokens)            | server side (requests)           |
 *   |------------------------|---------------------------------|----------------------------------|
 *   | normal reply           | completed with the reply errno  | executed (applied), then replied |
 *   | request timeout        | all EIO now, onClose(error)     | kept: still executes later       |
 *   | close() / fence()      | all EIO now (fence) / drained   | kept until executed              |
 *   | store.drop()           | all EIO now, onClose(error)     | discarded (the server died)      |
 *   | store.crash()          | as drop                         | discarded; bytes = durable image |
 *   A request the server executes after its connection failed is a late ("zombie") write:
 *   with `hang` on it is held until `store.release()`. fence() resolves true only once the
 *   connection's server side is empty (every zombie applied or discarded), false on timeout.
 *
 * Faults (per store, set by the test at any time; they act on requests received from then on):
 *   eio      which requests fail with EIO: 'none' | 'writes' (WRITE/TRIM/WRITE_ZEROES) |
 *            'reads' (READ/CACHE) | 'flushes' | 'all'; `eioBudget` limits how many (default ∞).
 *   hang     requests are held unanswered (answered/applied by release(), if still connected).
 *   slowMs   every reply is delayed this long (0 = next turn).
 *   refuseOpen  the opener throws (connect refused).
 *   strict   nbdkit-like validation: a zero-length request, or a FLUSH with a non-zero offset or
 *            length, is answered EINVAL and never executed.
 *   blank()  the bytes (and the durable image) become zeros, like a server restarted on an
 *            empty file; live connections drop.
 *
 * Invariants:
 * - Every token submitted to a FaultLeg completes exactly once, never inside submit().
 * - WRITE payloads are copied at submit (the server received them); READ data is filled only
 *   while the client still waits for that token.
 * - A request is executed at most once; a discarded request never touches the bytes.
 */
import assert from 'node:assert/strict';
import type { BlockDevice, BlockSizes, CompletionHandler, DeviceFeatures, Extent } from '../../src/core/block-device.js';
import { EnbdError } from '../../src/core/errors.js';
import { createLogger } from '../../src/core/log.js';
import { assembleArray, type AssembledArray } from '../../src/meta/assemble.js';
import { createArray } from '../../src/meta/create-array.js';
import { LegMeta } from '../../src/meta/leg-meta.js';
import type { LegDeviceOpener } from '../../src/engine/messages.js';
import { MirrorDevice, type MirrorEvent, type MirrorOptions } from '../../src/engine/mirror.js';
import * as p from '../../src/nbd/protocol.js';
import { commandNames } from '../../src/nbd/protocol-names.js';

export type EioMode = 'none' | 'writes' | 'reads' | 'flushes' | 'all';

/** One request as the server received it (for "never reached a leg" assertions). */
export interface ReceivedRequest {
  /** Order among every store's received requests and applied writes (one counter). */
  sequence: number;
  connection: number;
  command: number;
  flags: number;
  offsetBytes: number;
  lengthBytes: number;
}

/** One data change the store applied. `late`: its connection had failed or closed by then. */
export interface AppliedWrite {
  /** Order among every store's received requests and applied writes (one counter). */
  sequence: number;
  connection: number;
  command: number;
  offsetBytes: number;
  lengthBytes: number;
  late: boolean;
}

interface ServerRequest {
  connection: FaultLeg;
  token: number;
  command: number;
  flags: number;
  offsetBytes: number;
  lengthBytes: number;
  payload: Uint8Array | null;
  /** READ destination (the client's view); used only if the client still waits. */
  destination: Uint8Array | null;
  errno: number;
  held: boolean;
  timer: NodeJS.Timeout | null;
  done: boolean;
}

const kReceivedKept = 100_000;
let appliedSequence = 0;

function isWriteCommand(command: number): boolean {
  return command === p.kCmdWrite || command === p.kCmdTrim || command === p.kCmdWriteZeroes;
}

export class FaultStore {
  readonly bytes: Uint8Array;
  /** The bytes as of the last successful FLUSH (FUA writes land here too). */
  durable: Uint8Array;
  readonly applied: AppliedWrite[] = [];
  readonly received: ReceivedRequest[] = [];
  receivedCount = 0;
  opens = 0;
  refusedOpens = 0;
  /** Requests answered EINVAL by the strict check. */
  strictRefusals = 0;
  /** One entry per connection failed by its request timeout: the requests it was waiting for. */
  readonly timeouts: ReceivedRequest[][] = [];
  eio: EioMode = 'none';
  eioBudget = Number.POSITIVE_INFINITY;
  eioAnswered = 0;
  hang = false;
  /** Holds (as `hang` does) only the requests it returns true for; release() lets them go. */
  holdIf: ((request: { command: number; offsetBytes: number; lengthBytes: number }) => boolean) | null = null;
  slowMs = 0;
  refuseOpen = false;
  /** Connections opened from now on advertise no FUA (the mirror then sends none). */
  noFua = false;
  /** While set, connect() waits for it before opening (a reconnect held mid-way). */
  openGate: Promise<void> | null = null;
  /** getExtents reports 64 KiB blocks of zero bytes as hole+zero (else everything is data). */
  reportZeros = false;
  strict = false;
  readonly connections = new Set<FaultLeg>();
  private readonly pending = new Set<ServerRequest>();
  private nextConnection = 1;

  constructor(readonly name: string, readonly sizeBytes: number) {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0) throw new RangeError('sizeBytes must be a positive integer');
    this.bytes = new Uint8Array(sizeBytes);
    this.durable = new Uint8Array(sizeBytes);
  }

  /** Opens a new connection (what the opener does), or throws when refuseOpen is set. */
  async connect(requestTimeoutMs: number): Promise<FaultLeg> {
    await new Promise((resolve) => setImmediate(resolve));
    if (this.openGate !== null) await this.openGate;
    if (this.refuseOpen) {
      this.refusedOpens += 1;
      throw new EnbdError('ENBD_ERR_CONNECT', `fault store ${this.name} refused the connection`);
    }
    this.opens += 1;
    const leg = new FaultLeg(this, this.nextConnection++, requestTimeoutMs);
    this.connections.add(leg);
    return leg;
  }

  /** Clears every fault (held requests stay held until release()). */
  heal(): void {
    this.eio = 'none';
    this.eioBudget = Number.POSITIVE_INFINITY;
    this.hang = false;
    this.holdIf = null;
    this.slowMs = 0;
    this.refuseOpen = false;
  }

  /** Requests held by `hang` (any connection). */
  get heldCount(): number {
    let count = 0;
    for (const request of this.pending) if (request.held) count += 1;
    return count;
  }

  /** Applies (and answers, where the client still waits) every held request, in arrival order. */
  release(): number {
    let count = 0;
    for (const request of [...this.pending]) {
      if (!request.held) continue;
      request.held = false;
      this.execute(request);
      count += 1;
    }
    return count;
  }

  /** The server closes every connection now; what it had not executed is lost. */
  drop(reason = 'dropped by the test'): void {
    for (const request of [...this.pending]) this.discard(request);
    for (const leg of [...this.connections]) leg.failFromServer(new EnbdError('ENBD_ERR_CLOSED', `fault store ${this.name}: ${reason}`, p.kEIo));
  }

  /** As drop(), and every write since the last good flush is lost (bytes = durable image). */
  crash(): void {
    this.drop('crashed');
    this.bytes.set(this.durable);
  }

  /** A server restarted on an empty file: connections drop, every byte reads zero. */
  blank(): void {
    this.drop('restarted on an empty file');
    this.bytes.fill(0);
    this.durable.fill(0);
  }

  /** Requests of `command` the store was sent (optionally only with lengthBytes === 0...). */
  receivedOf(predicate: (request: ReceivedRequest) => boolean): ReceivedRequest[] {
    return this.received.filter(predicate);
  }

  /** @internal Server side of FaultLeg.submit. */
  receive(request: ServerRequest): void {
    this.receivedCount += 1;
    appliedSequence += 1;
    if (this.received.length < kReceivedKept) {
      this.received.push({
        sequence: appliedSequence,
        connection: request.connection.id,
        command: request.command,
        flags: request.flags,
        offsetBytes: request.offsetBytes,
        lengthBytes: request.lengthBytes,
      });
    }
    this.pending.add(request);
    if (this.strict && this.strictlyInvalid(request)) {
      this.strictRefusals += 1;
      request.errno = p.kEInval;
    } else if (this.eioApplies(request.command) && this.eioBudget > 0) {
      this.eioBudget -= 1;
      this.eioAnswered += 1;
      request.errno = p.kEIo;
    }
    if (this.hang || (this.holdIf !== null && this.holdIf(request))) {
      request.held = true;
      return;
    }
    const run = (): void => {
      request.timer = null;
      this.execute(request);
    };
    request.timer = this.slowMs > 0 ? setTimeout(run, this.slowMs) : setTimeout(run, 0);
  }

  private strictlyInvalid(request: ServerRequest): boolean {
    if (request.command === p.kCmdFlush) return request.offsetBytes !== 0 || request.lengthBytes !== 0;
    return request.lengthBytes === 0;
  }

  private eioApplies(command: number): boolean {
    switch (this.eio) {
      case 'none': return false;
      case 'all': return true;
      case 'writes': return isWriteCommand(command);
      case 'reads': return command === p.kCmdRead || command === p.kCmdCache;
      case 'flushes': return command === p.kCmdFlush;
    }
  }

  /** Executes a request once: applies it unless it failed, then answers if the client waits. */
  private execute(request: ServerRequest): void {
    if (request.done) return;
    request.done = true;
    this.pending.delete(request);
    if (request.timer !== null) clearTimeout(request.timer);
    request.timer = null;
    const leg = request.connection;
    const waiting = leg.isWaiting(request.token, request);
    if (request.errno === 0) this.apply(request, waiting);
    if (waiting) leg.answer(request.token, request.errno);
    leg.serverSideChanged();
  }

  private apply(request: ServerRequest, waiting: boolean): void {
    const { command, offsetBytes, lengthBytes } = request;
    const end = offsetBytes + lengthBytes;
    if (offsetBytes < 0 || end > this.sizeBytes) {
      request.errno = isWriteCommand(command) ? p.kENoSpc : p.kEInval;
      return;
    }
    switch (command) {
      case p.kCmdRead:
        if (waiting && request.destination !== null) request.destination.set(this.bytes.subarray(offsetBytes, end));
        return;
      case p.kCmdWrite:
        if (request.payload !== null) this.bytes.set(request.payload, offsetBytes);
        break;
      case p.kCmdTrim:
      case p.kCmdWriteZeroes:
        this.bytes.fill(0, offsetBytes, end);
        break;
      case p.kCmdFlush:
        this.durable = this.bytes.slice();
        return;
      default:
        return;
    }
    if ((request.flags & p.kCmdFlagFua) !== 0) this.durable.set(this.bytes.subarray(offsetBytes, end), offsetBytes);
    appliedSequence += 1;
    this.applied.push({ sequence: appliedSequence, connection: request.connection.id, command, offsetBytes, lengthBytes, late: !waiting });
  }

  private discard(request: ServerRequest): void {
    if (request.done) return;
    request.done = true;
    this.pending.delete(request);
    if (request.timer !== null) clearTimeout(request.timer);
    request.timer = null;
    request.connection.serverSideChanged();
  }

  /** @internal Server-side requests of one connection not yet executed or discarded. */
  pendingOf(leg: FaultLeg): number {
    let count = 0;
    for (const request of this.pending) if (request.connection === leg) count += 1;
    return count;
  }

  /** @internal */
  forget(leg: FaultLeg): void {
    if (this.pendingOf(leg) === 0) this.connections.delete(leg);
  }
}

type ConnectionState = 'open' | 'failed' | 'closed';

export class FaultLeg implements BlockDevice {
  readonly sizeBytes: number;
  features: DeviceFeatures = {
    readOnly: false, flush: true, fua: true, trim: true, writeZeroes: true, fastZero: false,
    cache: true, multiConn: true, rotational: false, blockStatus: true,
  };
  readonly blockSizes: BlockSizes = { minimumBytes: 1, preferredBytes: 4096, maximumBytes: 32 * 1024 * 1024 };
  readonly description: string;
  onClose: ((error: EnbdError | null) => void) | null = null;
  state: ConnectionState = 'open';
  /** Set once fence() was called: new requests fail at once. */
  fenced = false;
  private handler: CompletionHandler | null = null;
  /** Client side: token -> the server request it waits for, and when it was sent. */
  private readonly waiting = new Map<number, { request: ServerRequest; sentAt: number }>();
  private readonly serverWaiters = new Set<() => void>();
  private readonly drainWaiters = new Set<() => void>();
  private timeoutTimer: NodeJS.Timeout | null = null;

  constructor(readonly store: FaultStore, readonly id: number, readonly requestTimeoutMs: number) {
    this.sizeBytes = store.sizeBytes;
    this.description = `fault leg ${store.name} #${id}`;
    if (store.noFua) this.features = { ...this.features, fua: false };
    if (requestTimeoutMs > 0) {
      const periodMs = Math.max(1, Math.floor(requestTimeoutMs / 4));
      this.timeoutTimer = setInterval(() => this.checkTimeouts(), periodMs);
    }
  }

  get inFlight(): number {
    return this.waiting.size;
  }

  setCompletionHandler(handler: CompletionHandler): void {
    this.handler = handler;
  }

  submit(command: number, flags: number, offsetBytes: number, lengthBytes: number, data: Uint8Array | null, token: number): void {
    if (this.state !== 'open' || this.fenced) {
      setImmediate(() => this.deliver(token, p.kEIo));
      return;
    }
    const request: ServerRequest = {
      connection: this,
      token,
      command,
      flags,
      offsetBytes,
      lengthBytes,
      payload: command === p.kCmdWrite && data !== null ? data.slice(0, lengthBytes) : null,
      destination: command === p.kCmdRead ? data : null,
      errno: 0,
      held: false,
      timer: null,
      done: false,
    };
    this.waiting.set(token, { request, sentAt: performance.now() });
    this.store.receive(request);
  }

  /** @internal The client still waits for this token's answer to exactly this request. */
  isWaiting(token: number, request: ServerRequest): boolean {
    return this.state === 'open' && !this.fenced && this.waiting.get(token)?.request === request;
  }

  /** @internal A reply from the server. */
  answer(token: number, errno: number): void {
    this.waiting.delete(token);
    this.deliver(token, errno);
    if (this.waiting.size === 0) for (const wake of [...this.drainWaiters]) wake();
  }

  private deliver(token: number, errno: number): void {
    const handler = this.handler;
    if (handler === null) throw new Error(`${this.description}: no completion handler`);
    handler(token, errno);
  }

  /** @internal Something of this connection's server side was executed or discarded. */
  serverSideChanged(): void {
    if (this.store.pendingOf(this) > 0) return;
    for (const wake of [...this.serverWaiters]) wake();
    if (this.state !== 'open') this.store.forget(this);
  }

  /** Client side gives up: every waiting token completes with EIO now. */
  private failWaiting(): void {
    const tokens = [...this.waiting.keys()];
    this.waiting.clear();
    for (const token of tokens) this.deliver(token, p.kEIo);
    for (const wake of [...this.drainWaiters]) wake();
  }

  private stopTimer(): void {
    if (this.timeoutTimer !== null) clearInterval(this.timeoutTimer);
    this.timeoutTimer = null;
  }

  /** The connection is lost on its own (store.drop, request timeout): EIO all, onClose. */
  failFromServer(error: EnbdError): void {
    if (this.state !== 'open') return;
    this.state = 'failed';
    this.stopTimer();
    this.failWaiting();
    this.store.forget(this);
    this.onClose?.(error);
  }

  private checkTimeouts(): void {
    if (this.state !== 'open' || this.waiting.size === 0) return;
    const now = performance.now();
    for (const { request, sentAt } of this.waiting.values()) {
      if (now - sentAt < this.requestTimeoutMs) continue;
      const name = commandNames[request.command] ?? 'request';
      this.store.timeouts.push([...this.waiting.values()].map(({ request: waited }) => ({
        sequence: 0,
        connection: this.id,
        command: waited.command,
        flags: waited.flags,
        offsetBytes: waited.offsetBytes,
        lengthBytes: waited.lengthBytes,
      })));
      this.failFromServer(new EnbdError('ENBD_ERR_TIMEOUT', `${this.description} did not answer ${name} within ${this.requestTimeoutMs} ms`, p.kEIo));
      return;
    }
  }

  async getExtents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    await new Promise((resolve) => setImmediate(resolve));
    if (this.state !== 'open' || this.fenced) throw new EnbdError('ENBD_ERR_IO', `${this.description} is not connected`, p.kEIo);
    const end = Math.min(this.sizeBytes, offsetBytes + Math.max(1, lengthBytes));
    if (!this.store.reportZeros) return [{ lengthBytes: end - offsetBytes, flags: 0 }];
    const extents: Extent[] = [];
    const block = 64 * 1024;
    for (let at = offsetBytes; at < end;) {
      const stop = Math.min(end, (Math.floor(at / block) + 1) * block);
      const flags = this.store.bytes.subarray(at, stop).every((byte) => byte === 0) ? p.kStateHole | p.kStateZero : 0;
      const last = extents[extents.length - 1];
      if (last !== undefined && last.flags === flags) last.lengthBytes += stop - at;
      else extents.push({ lengthBytes: stop - at, flags });
      at = stop;
    }
    return extents;
  }

  /**
   * Stops using the connection now (waiting tokens EIO, new requests EIO), then resolves true
   * once its server side is empty (every request executed or discarded), false after timeoutMs.
   */
  async fence(timeoutMs: number): Promise<boolean> {
    this.fenced = true;
    this.stopTimer();
    this.failWaiting();
    if (this.store.pendingOf(this) === 0) {
      this.markClosed();
      return true;
    }
    const cleared = await new Promise<boolean>((resolve) => {
      let timer: NodeJS.Timeout | null = null;
      const wake = (): void => {
        if (timer !== null) clearTimeout(timer);
        this.serverWaiters.delete(wake);
        resolve(true);
      };
      this.serverWaiters.add(wake);
      timer = setTimeout(() => {
        this.serverWaiters.delete(wake);
        resolve(false);
      }, timeoutMs);
    });
    if (cleared) this.markClosed();
    return cleared;
  }

  private markClosed(): void {
    if (this.state === 'open') this.state = 'closed';
    this.store.forget(this);
  }

  /** Like NbdClient.close(): waits for the client's requests in flight (answer or timeout). */
  async close(): Promise<void> {
    if (this.state === 'open' && !this.fenced && this.waiting.size > 0) {
      await new Promise<void>((resolve) => {
        const wake = (): void => {
          if (this.waiting.size > 0 && this.state === 'open') return;
          this.drainWaiters.delete(wake);
          resolve();
        };
        this.drainWaiters.add(wake);
      });
    }
    this.stopTimer();
    this.markClosed();
  }
}

/** A LegDeviceOpener that connects leg URI `store.name` to that store. */
export function faultOpener(stores: FaultStore[]): LegDeviceOpener {
  const byName = new Map(stores.map((store) => [store.name, store]));
  return async (_legIndex, uri, options) => {
    const store = byName.get(uri);
    if (store === undefined) throw new EnbdError('ENBD_ERR_CONFIG', `no fault store named ${uri}`);
    return await store.connect(options.requestTimeoutMs);
  };
}

// ---- driving a MirrorDevice -----------------------------------------------------------------

/**
 * Submits requests to a MirrorDevice the way the NBD server does (acquireBuffer for READ and
 * non-empty WRITE payloads, the lease handle to submit, releaseBuffer(handle) after a READ's
 * completion; a WRITE's slot returns by itself) and resolves each with its errno.
 */
export class MirrorDriver {
  private nextToken = 1;
  private readonly done = new Map<number, (errno: number) => void>();
  private readonly bufferWaiters: Array<() => void> = [];

  constructor(readonly mirror: MirrorDevice) {
    mirror.setCompletionHandler((token, errno) => {
      const resolve = this.done.get(token);
      if (resolve === undefined) throw new Error(`mirror completed unknown token ${token}`);
      this.done.delete(token);
      resolve(errno);
    });
    mirror.onBufferAvailable = () => {
      for (const wake of this.bufferWaiters.splice(0)) wake();
    };
  }

  /** Requests submitted and not completed. */
  get pending(): number {
    return this.done.size;
  }

  private token(): number {
    const token = this.nextToken;
    this.nextToken = token >= 0x3fff_0000 ? 1 : token + 1;
    return token;
  }

  private async buffer(command: number, lengthBytes: number, token: number): Promise<{ handle: number; view: Uint8Array }> {
    for (;;) {
      const lease = this.mirror.acquireBuffer(command, lengthBytes, token);
      if (lease !== null) return { handle: lease.handle, view: lease.view };
      await new Promise<void>((resolve) => this.bufferWaiters.push(resolve));
    }
  }

  /** Submits now (`onSubmit` runs just before, so a caller learns the true arrival order). */
  private run(command: number, flags: number, offsetBytes: number, lengthBytes: number, data: Uint8Array | null, token: number, onSubmit?: () => void, handle = -1): Promise<number> {
    const result = new Promise<number>((resolve) => this.done.set(token, resolve));
    onSubmit?.();
    this.mirror.submit(command, flags, offsetBytes, lengthBytes, data, token, handle);
    return result;
  }

  /** WRITE: the mirror takes the lent slot back at completion (writeBuffersReturnAtCompletion). */
  async write(offsetBytes: number, data: Uint8Array, flags = 0, onSubmit?: () => void): Promise<number> {
    const token = this.token();
    if (data.length === 0) return await this.run(p.kCmdWrite, flags, offsetBytes, 0, null, token, onSubmit);
    const lease = await this.buffer(p.kCmdWrite, data.length, token);
    lease.view.set(data);
    return await this.run(p.kCmdWrite, flags, offsetBytes, data.length, lease.view, token, onSubmit, lease.handle);
  }

  /** READ: `{ errno, data }` (data only when errno is 0). */
  async read(offsetBytes: number, lengthBytes: number): Promise<{ errno: number; data: Uint8Array | null }> {
    const token = this.token();
    const lease = await this.buffer(p.kCmdRead, lengthBytes, token);
    try {
      const errno = await this.run(p.kCmdRead, 0, offsetBytes, lengthBytes, lease.view, token, undefined, lease.handle);
      return { errno, data: errno === 0 ? lease.view.slice() : null };
    } finally {
      this.mirror.releaseBuffer(lease.handle);
    }
  }

  async flush(offsetBytes = 0, lengthBytes = 0): Promise<number> {
    return await this.run(p.kCmdFlush, 0, offsetBytes, lengthBytes, null, this.token());
  }

  async trim(offsetBytes: number, lengthBytes: number, flags = 0, onSubmit?: () => void): Promise<number> {
    return await this.run(p.kCmdTrim, flags, offsetBytes, lengthBytes, null, this.token(), onSubmit);
  }

  async zero(offsetBytes: number, lengthBytes: number, flags = 0, onSubmit?: () => void): Promise<number> {
    return await this.run(p.kCmdWriteZeroes, flags, offsetBytes, lengthBytes, null, this.token(), onSubmit);
  }
}

/** Polls `predicate` every few ms until it holds or `deadlineMs` passed; returns whether it held. */
export async function waitFor(predicate: () => boolean, deadlineMs: number, stepMs = 5): Promise<boolean> {
  const deadline = Date.now() + deadlineMs;
  while (!predicate()) {
    if (Date.now() > deadline) return false;
    await new Promise((resolve) => setTimeout(resolve, stepMs));
  }
  return true;
}

/**
 * `request` was started while `store` hangs: waits `waitMs` (is it still unanswered?), then
 * lets the store answer what it holds and returns both facts for the caller to assert.
 */
/**
 * `promise`, or a rejection naming `what` (and `context()`) after `deadlineMs`: a request the
 * engine lost then fails its test with the steps that led there instead of hanging it until the
 * runner's timeout kills the file.
 */
export async function within<T>(promise: Promise<T>, deadlineMs: number, what: string, context: () => string = () => ''): Promise<T> {
  let timer: NodeJS.Timeout | null = null;
  const expired = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not settled after ${deadlineMs} ms${context()}`)), deadlineMs);
  });
  try {
    return await Promise.race([promise, expired]);
  } finally {
    if (timer !== null) clearTimeout(timer);
  }
}

export async function answeredAfterRelease(store: FaultStore, request: Promise<number>, waitMs = 200): Promise<{ heldBack: boolean; errno: number }> {
  let answered = false;
  const settled = request.then((errno) => {
    answered = true;
    return errno;
  });
  const heldBack = !(await waitFor(() => answered, waitMs));
  store.hang = false;
  store.release();
  return { heldBack, errno: await settled };
}

/** Waits until leg `leg` is in one of `states`; fails with the states it saw otherwise. */
export async function waitLegState(mirror: MirrorDevice, leg: number, states: readonly string[], what: string, deadlineMs: number): Promise<void> {
  const stateOf = (): string => legStates(mirror)[leg] ?? 'missing';
  const ok = await waitFor(() => states.includes(stateOf()), deadlineMs);
  assert.ok(ok, `${what}: leg ${leg} reached ${states.join('/')} (it is ${stateOf()}; legs ${legStates(mirror).join(', ')})`);
}

// ---- a mirror over fault legs ---------------------------------------------------------------

/**
 * Engine options of the issue-10 rules, passed through whether or not this engine build knows
 * them yet (spread, so tsc does not reject a name the engine has not grown).
 */
export interface FaultMirrorTuning {
  legTimeoutMs?: number;
  reconnectMinMs?: number;
  reconnectMaxMs?: number;
  probeTimeoutMs?: number;
  fenceTimeoutMs?: number;
  legMaxFailures?: number;
  legFailureWindowMs?: number;
  legStableMs?: number;
  idleProbeMs?: number;
  /**
   * With on-leg metadata: `enbd create --assume-clean` on the stores, then assembly (as `enbd
   * mirror` does), then the mirror with its keeper. The export is the data area.
   */
  metadata?: boolean;
}

export interface FaultMirror {
  mirror: MirrorDevice;
  driver: MirrorDriver;
  stores: FaultStore[];
  /** Every leg-state event, in order. */
  events: MirrorEvent[];
  close(): Promise<void>;
}

/** Stores named fault-leg-0.. of `sizeBytes` each. */
/** `lengthBytes` of a non-trivial pattern that differs per `seed` (data for writes in tests). */
export function filled(lengthBytes: number, seed: number): Uint8Array {
  const data = new Uint8Array(lengthBytes);
  for (let index = 0; index < lengthBytes; index += 1) data[index] = (seed * 131 + index * 7 + (index >> 9)) & 0xff;
  return data;
}

export function makeStores(count: number, sizeBytes: number): FaultStore[] {
  return Array.from({ length: count }, (_, index) => new FaultStore(`fault-leg-${index}`, sizeBytes));
}

/** Opens an inline MirrorDevice over `stores` (small ring, 4 KiB bitmap chunks, tiny timeouts). */
export async function openFaultMirror(stores: FaultStore[], tuning: FaultMirrorTuning = {}, extra: Partial<MirrorOptions> = {}): Promise<FaultMirror> {
  const level = process.env['ENBD_TEST_LOG_LEVEL'] ?? 'silent';
  const { metadata, ...numbers } = tuning;
  if (metadata === true) extra = { ...extra, metadata: await createAndAssemble(stores) };
  const engineTuning: Record<string, number> = {
    legTimeoutMs: 80,
    reconnectMinMs: 10,
    reconnectMaxMs: 40,
    probeTimeoutMs: 80,
    fenceTimeoutMs: 200,
    legMaxFailures: 1000,
    legFailureWindowMs: 60_000,
    legStableMs: 50,
    idleProbeMs: 0,
    ...(numbers as Record<string, number>),
  };
  const mirror = await MirrorDevice.open({
    legs: stores.map((store) => store.name),
    logger: createLogger({ level, pretty: false }),
    logLevel: level,
    placement: 'inline',
    openDevice: faultOpener(stores),
    ring: { slotCount: 32, slotBytes: 64 * 1024 },
    bitmapChunkBytes: 4096,
    connectTimeoutMs: 1000,
    ...engineTuning,
    ...extra,
  });
  const events: MirrorEvent[] = [];
  const unsubscribe = mirror.on((event) => events.push(event));
  const driver = new MirrorDriver(mirror);
  let closed = false;
  return {
    mirror,
    driver,
    stores,
    events,
    close: async () => {
      if (closed) return;
      closed = true;
      unsubscribe();
      for (const store of stores) {
        store.heal();
        store.release();
      }
      await mirror.close();
    },
  };
}

/** Fresh metadata on every store (assumed clean), then an assembly over them. */
export async function createAndAssemble(stores: FaultStore[]): Promise<AssembledArray> {
  const opener = faultOpener(stores);
  const connect = async (): Promise<BlockDevice[]> => await Promise.all(stores.map(async (store, index) => await opener(index, store.name, { requestTimeoutMs: 0, connectTimeoutMs: 1000 })));
  const devices = await connect();
  try {
    await createArray(devices.map((device, index) => ({ uri: stores[index]?.name ?? '', meta: new LegMeta(device) })), { name: 'fault', assumeClean: true, force: false });
  } finally {
    await Promise.allSettled(devices.map(async (device) => await device.close()));
  }
  return await assembleArray(stores.map((store) => store.name), await connect(), { forceSource: null, degraded: false });
}

/** Leg states by index. */
export function legStates(mirror: MirrorDevice): string[] {
  return mirror.legStatus().map((leg) => leg.state);
}
