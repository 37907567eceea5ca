/**
 * Session master of a mirror: a BlockDevice (served by the NBD server) that mirrors every
 * change across N legs and reads from one up-to-date leg. Owns the shared request ring, the
 * range lock, and one connection actor per leg (worker thread or inline, same code).
 *
 * Thread: main thread.
 *
 * Request path (shared copy mode)
 *   server parses WRITE header -> acquireBuffer: allocate a run of ring slots
 *   server copies the payload from the socket chunk into the slot (the one userspace copy)
 *   submit -> setRequest(slot) -> range lock (data-changing requests) -> dispatch: stage the
 *   slot index on each target leg's SPSC queue; one publish (+ notify if asleep) per leg per
 *   batch (microtask at the end of the current parse)
 *   actors -> stub I/O from/into the slot -> ackSlot (visited/failed masks); the completing
 *   actor stages the slot on its completion queue and rings the doorbell
 *   master (doorbell wake) -> drain completion queues -> onSlotComplete: leg failures,
 *   read retry, range-lock release, reply via the server's completion handler
 *   server -> releaseBuffer after the reply left -> ring.free
 *
 * Design notes
 * | request        | legs targeted                       | result                                 |
 * |----------------|-------------------------------------|----------------------------------------|
 * | READ           | one in-sync leg (fewest in flight)  | retried on another leg on error        |
 * | CACHE          | one in-sync leg                     | hint                                   |
 * | WRITE/TRIM/ZERO| every in-sync leg, range-locked     | ok if >= 1 leg ok; legs that failed    |
 * |                |                                     | while others succeeded leave in-sync   |
 * | FLUSH          | every in-sync leg                   | ok when every targeted leg flushed      |
 *
 * Invariants:
 * - A write is acknowledged only when every targeted leg answered, and successfully only if at
 *   least one in-sync leg holds it; a leg that missed a write it was sent is never read again
 *   (it leaves the in-sync set before the client hears success).
 * - Overlapping data-changing requests reach every leg in arrival order (RangeLock).
 * - A slot is freed exactly once: by releaseBuffer (slots handed to the server) or at
 *   completion (internal slots: FLUSH, TRIM, ZERO, CACHE, shutdown flushes).
 */
import { Worker, MessageChannel, type MessagePort } from 'node:worker_threads';
import * as Comlink from 'comlink';
import type { BlockDevice, BlockSizes, CompletionHandler, DeviceFeatures, Extent } from '../core/block-device.js';
import type { Logger } from '../core/log.js';
import { assert } from '../core/assert.js';
import { EnbdError } from '../core/errors.js';
import { portEndpoint } from '../core/comlink-endpoint.js';
import * as p from '../nbd/protocol.js';
import { RequestRing } from '../ring/request-ring.js';
import { kMaxLegs, type RingOptions } from '../ring/layout.js';
import { Doorbell, SpscQueue } from '../ring/spsc-queue.js';
import { abandonLeg } from '../ring/visited-mask.js';
import { parseLegUri } from '../stubs/open-leg.js';
import { RangeLock } from './range-lock.js';
import { LegActor } from './leg-actor.js';
import type { CopyMode, LegActorApi, LegActorInit, LegInfo, LegStats, Placement } from './messages.js';

export interface MirrorOptions {
  legs: string[];
  /** Export size; default: the legs' common size. Every leg must hold at least this much. */
  sizeBytes?: number;
  ring?: Partial<RingOptions>;
  copyMode?: CopyMode;
  placement?: Placement;
  logger: Logger;
  logLevel?: string;
  connectTimeoutMs?: number;
  /** A leg request older than this fails that leg's connection (0 = never). */
  legTimeoutMs?: number;
}

export type LegState = 'in-sync' | 'failed';

export interface LegStatus {
  index: number;
  uri: string;
  kind: string;
  state: LegState;
  inFlight: number;
  failureReason: string | null;
}

export interface MirrorStats {
  requests: Record<string, number>;
  writeRequests: number;
  /** Userspace copies of write payloads (socket -> ring, plus per-leg copies). */
  writeCopies: number;
  writeBytesCopied: number;
  ringSlotsInUse: number;
  legs: LegStatus[];
}

const kInternalTokenBase = 0x4000_0000;
const kWorkerUrl = new URL('../../actors/connection-actor.js', import.meta.url);

class Leg {
  state: LegState = 'in-sync';
  inFlight = 0;
  failureReason: string | null = null;
  info: LegInfo | null = null;
  worker: Worker | null = null;
  inline: LegActor | null = null;
  copyPort: MessagePort | null = null;
  constructor(
    readonly index: number,
    readonly uri: string,
    readonly dispatch: SpscQueue,
    readonly completion: SpscQueue,
    readonly api: LegActorApi,
  ) {}
  get bit(): number {
    return 1 << this.index;
  }
}

interface PendingSubmit {
  command: number;
  flags: number;
  offsetBytes: number;
  lengthBytes: number;
  token: number;
}

function nextPowerOfTwo(value: number): number {
  let result = 2;
  while (result < value) result *= 2;
  return result;
}

function isDataChanging(command: number): boolean {
  return command === p.kCmdWrite || command === p.kCmdTrim || command === p.kCmdWriteZeroes;
}

export class MirrorDevice implements BlockDevice {
  sizeBytes = 0;
  features: DeviceFeatures;
  blockSizes: BlockSizes = { minimumBytes: 1, preferredBytes: 4096, maximumBytes: p.kDefaultPayloadBytesMax };
  readonly description: string;
  onBufferAvailable: (() => void) | null = null;
  readonly ring: RequestRing;
  readonly legs: Leg[] = [];
  private readonly doorbell: Doorbell;
  private readonly rangeLock: RangeLock;
  private readonly granted: Int32Array;
  private handler: CompletionHandler = () => undefined;
  private readonly copyMode: CopyMode;
  private readonly placement: Placement;
  private readonly logger: Logger;
  /** Server token of each slot's request; which slots are internal (freed at completion). */
  private readonly tokenOfSlot: Int32Array;
  private readonly internalSlot: Uint8Array;
  private readonly spanOfSlot: Int32Array;
  private readonly triedMask: Int32Array;
  private slotOfToken = new Int32Array(1 << 16).fill(-1);
  private readonly pendingSubmits: PendingSubmit[] = [];
  private readonly internalWaiters = new Map<number, (errno: number) => void>();
  private nextInternalToken = kInternalTokenBase;
  private bufferWanted = false;
  private publishScheduled = false;
  private readonly publishBound = (): void => this.publishDispatches();
  private readonly onSlotCompleteBound = (slot: number): void => this.onSlotComplete(slot);
  private readonly pumpBound = (): void => this.pumpCompletions();
  private readSpread = 0;
  private closed = false;
  private readonly counters = { requests: new Map<number, number>(), writeCopies: 0, writeBytesCopied: 0, writeRequests: 0 };
  inFlight = 0;

  private constructor(options: MirrorOptions) {
    this.logger = options.logger;
    this.copyMode = options.copyMode ?? 'shared';
    this.placement = options.placement ?? 'workers';
    this.ring = RequestRing.create(options.ring ?? {});
    this.doorbell = Doorbell.create();
    this.rangeLock = new RangeLock(this.ring.slotCount);
    this.granted = new Int32Array(this.ring.slotCount);
    this.tokenOfSlot = new Int32Array(this.ring.slotCount).fill(-1);
    this.internalSlot = new Uint8Array(this.ring.slotCount);
    this.spanOfSlot = new Int32Array(this.ring.slotCount).fill(1);
    this.triedMask = new Int32Array(this.ring.slotCount);
    this.description = `mirror of ${options.legs.length} legs`;
    this.features = {
      readOnly: false, flush: true, fua: true, trim: true, writeZeroes: true, fastZero: true,
      cache: true, multiConn: true, rotational: false, blockStatus: true,
    };
  }

  /** Starts one actor per leg, opens every leg, and checks they can be mirrored. */
  static async open(options: MirrorOptions): Promise<MirrorDevice> {
    if (options.legs.length === 0) throw new EnbdError('ENBD_ERR_CONFIG', 'a mirror needs at least one leg (--leg URI)');
    if (options.legs.length > kMaxLegs) throw new EnbdError('ENBD_ERR_CONFIG', `a mirror has at most ${kMaxLegs} legs`);
    for (const uri of options.legs) parseLegUri(uri); // clear URI errors before any thread starts
    const mirror = new MirrorDevice(options);
    try {
      await mirror.startLegs(options);
    } catch (error) {
      await mirror.close();
      throw error;
    }
    return mirror;
  }

  private async startLegs(options: MirrorOptions): Promise<void> {
    const capacity = nextPowerOfTwo(this.ring.slotCount);
    for (const [index, uri] of options.legs.entries()) {
      const dispatch = SpscQueue.create(capacity);
      const completion = SpscQueue.create(capacity);
      const init: LegActorInit = {
        legIndex: index,
        uri,
        ring: this.ring.buffers,
        dispatch: dispatch.buffer,
        completion: completion.buffer,
        doorbell: this.doorbell.buffer,
        logLevel: options.logLevel ?? 'info',
        connectTimeoutMs: options.connectTimeoutMs ?? 10_000,
        requestTimeoutMs: options.legTimeoutMs ?? 0,
      };
      this.legs.push(this.startLeg(init, dispatch, completion));
    }
    const infos = await Promise.all(this.legs.map((leg) => leg.api.open()));
    const problems: string[] = [];
    for (const [index, info] of infos.entries()) {
      const leg = this.legs[index] as Leg;
      if ('error' in info) problems.push(`leg ${index} (${leg.uri}): ${info.error.message}`);
      else leg.info = info;
    }
    if (problems.length > 0) throw new EnbdError('ENBD_ERR_LEG', `cannot open leg(s): ${problems.join('; ')}`);
    this.settleGeometry(options.sizeBytes);
    this.pumpCompletions();
  }

  private startLeg(init: LegActorInit, dispatch: SpscQueue, completion: SpscQueue): Leg {
    if (this.placement === 'inline') {
      const actor = new LegActor(init, this.logger.child({ leg: init.legIndex }));
      const leg = new Leg(init.legIndex, init.uri, dispatch, completion, actor);
      leg.inline = actor;
      return leg;
    }
    const channel = new MessageChannel();
    const worker = new Worker(kWorkerUrl, {
      workerData: { ...init, copyPort: channel.port2 },
      transferList: [channel.port2],
    });
    const api = Comlink.wrap<LegActorApi>(portEndpoint(worker)) as unknown as LegActorApi;
    const leg = new Leg(init.legIndex, init.uri, dispatch, completion, api);
    leg.worker = worker;
    leg.copyPort = channel.port1;
    worker.on('error', (error) => this.onActorGone(leg, `actor crashed: ${error.message}`));
    worker.on('exit', (code) => {
      if (!this.closed) this.onActorGone(leg, `actor exited with code ${code}`);
    });
    return leg;
  }

  /** Size and features of the export from the legs' own; refuses legs that cannot mirror. */
  private settleGeometry(sizeBytesAsked: number | undefined): void {
    const infos = this.legs.map((leg) => leg.info as LegInfo);
    const sizes = infos.map((info, index) => `leg ${index} (${this.legs[index]?.uri}) has ${info.sizeBytes} bytes`);
    const smallest = Math.min(...infos.map((info) => info.sizeBytes));
    if (sizeBytesAsked !== undefined) {
      if (sizeBytesAsked > smallest) {
        throw new EnbdError('ENBD_ERR_CONFIG', `--size ${sizeBytesAsked} is larger than a leg: ${sizes.join(', ')}`);
      }
      this.sizeBytes = sizeBytesAsked;
    } else {
      if (infos.some((info) => info.sizeBytes !== smallest)) {
        throw new EnbdError('ENBD_ERR_CONFIG', `legs differ in size: ${sizes.join(', ')}; use --size N (N <= ${smallest}) to mirror the first N bytes`);
      }
      this.sizeBytes = smallest;
    }
    for (const [index, info] of infos.entries()) {
      if (info.features.readOnly) throw new EnbdError('ENBD_ERR_CONFIG', `leg ${index} (${info.uri}) is read-only and cannot be mirrored to`);
    }
    const all = (key: keyof DeviceFeatures): boolean => infos.every((info) => info.features[key]);
    this.features = {
      readOnly: false,
      flush: all('flush'),
      fua: all('fua'),
      trim: all('trim'),
      writeZeroes: all('writeZeroes'),
      fastZero: all('fastZero'),
      cache: true,
      multiConn: all('multiConn'),
      rotational: infos.some((info) => info.features.rotational),
      blockStatus: all('blockStatus'),
    };
    this.blockSizes = {
      minimumBytes: Math.max(...infos.map((info) => info.blockSizes.minimumBytes)),
      preferredBytes: Math.max(...infos.map((info) => info.blockSizes.preferredBytes)),
      maximumBytes: Math.min(this.ring.maxRequestBytes, ...infos.map((info) => info.blockSizes.maximumBytes)),
    };
    this.logger.info({ sizeBytes: this.sizeBytes, legs: infos.map((info) => info.uri), features: this.features }, 'mirror assembled');
  }

  setCompletionHandler(handler: CompletionHandler): void {
    this.handler = handler;
  }

  // ---- submission -------------------------------------------------------------------------

  acquireBuffer(_command: number, lengthBytes: number, token: number): Uint8Array | null {
    const span = this.ring.slotsFor(lengthBytes);
    const slot = this.ring.allocate(span);
    if (slot < 0) {
      this.bufferWanted = true;
      return null;
    }
    this.bindToken(slot, token, false);
    this.spanOfSlot[slot] = span;
    return this.ring.dataView(slot, lengthBytes);
  }

  releaseBuffer(token: number): void {
    const slot = this.slotOfToken[token] ?? -1;
    assert(slot >= 0, 'release a buffer that was acquired');
    this.slotOfToken[token] = -1;
    this.tokenOfSlot[slot] = -1;
    this.ring.free(slot);
    this.afterFree();
  }

  private bindToken(slot: number, token: number, internal: boolean): void {
    // Only slots handed to the server are found by token (submit, releaseBuffer).
    if (!internal) {
      assert(token < kInternalTokenBase, 'server tokens are below the internal range');
      while (token >= this.slotOfToken.length) {
        const grown = new Int32Array(this.slotOfToken.length * 2).fill(-1);
        grown.set(this.slotOfToken);
        this.slotOfToken = grown;
      }
      this.slotOfToken[token] = slot;
    }
    this.tokenOfSlot[slot] = token;
    this.internalSlot[slot] = internal ? 1 : 0;
  }

  private afterFree(): void {
    while (this.pendingSubmits.length > 0) {
      const slot = this.ring.allocate(1);
      if (slot < 0) return;
      const next = this.pendingSubmits.shift() as PendingSubmit;
      this.bindToken(slot, next.token, true);
      this.spanOfSlot[slot] = 1;
      this.start(slot, next.command, next.flags, next.offsetBytes, next.lengthBytes);
    }
    if (this.bufferWanted) {
      this.bufferWanted = false;
      this.onBufferAvailable?.();
    }
  }

  submit(command: number, flags: number, offsetBytes: number, lengthBytes: number, data: Uint8Array | null, token: number): void {
    this.inFlight += 1;
    this.counters.requests.set(command, (this.counters.requests.get(command) ?? 0) + 1);
    let slot = token < kInternalTokenBase ? this.slotOfToken[token] ?? -1 : -1;
    if (slot >= 0) {
      assert(data !== null, 'READ/WRITE data lives in an acquired ring slot');
    } else {
      // Requests without a payload buffer (FLUSH, TRIM, ZERO, CACHE, zero-length WRITE).
      slot = this.ring.allocate(1);
      if (slot < 0) {
        this.pendingSubmits.push({ command, flags, offsetBytes, lengthBytes, token });
        return;
      }
      this.bindToken(slot, token, true);
      this.spanOfSlot[slot] = 1;
    }
    if (command === p.kCmdWrite) {
      this.counters.writeRequests += 1;
      this.counters.writeCopies += 1; // socket chunk -> ring slot, done by the server
      this.counters.writeBytesCopied += lengthBytes;
    }
    this.start(slot, command, flags, offsetBytes, lengthBytes);
  }

  /** Describes the request in its slot and dispatches it (after the range lock if needed). */
  private start(slot: number, command: number, flags: number, offsetBytes: number, lengthBytes: number): void {
    const target = this.targetFor(command);
    if (target === 0) {
      this.ring.setRequest(slot, command, flags, offsetBytes, lengthBytes, this.spanOfSlot[slot] ?? 1, 1);
      setImmediate(() => this.finishSlot(slot, p.kEIo));
      return;
    }
    if (command === p.kCmdTrim && this.features.writeZeroes) {
      // Legs differ in what a trimmed range reads back as (a file leg keeps the data, nbdkit
      // memory zeroes it). Zeroing without NO_HOLE still lets a leg punch holes, and keeps every
      // leg byte-identical, so reads stay the same whichever leg serves them.
      command = p.kCmdWriteZeroes;
      flags &= p.kCmdFlagFua;
    }
    this.ring.setRequest(slot, command, flags, offsetBytes, lengthBytes, this.spanOfSlot[slot] ?? 1, target);
    this.triedMask[slot] = target;
    if (command === p.kCmdRead || command === p.kCmdCache) this.ring.setReadLeg(slot, 31 - Math.clz32(target));
    if (isDataChanging(command) && !this.rangeLock.acquire(slot, offsetBytes, lengthBytes)) return;
    this.dispatch(slot);
  }


  /** Legs a new request goes to: every in-sync leg, or one for READ/CACHE. 0 = none left. */
  private targetFor(command: number): number {
    if (command === p.kCmdRead || command === p.kCmdCache) {
      const leg = this.pickReadLeg(0);
      return leg === null ? 0 : leg.bit;
    }
    let mask = 0;
    for (const leg of this.legs) if (leg.state === 'in-sync') mask |= leg.bit;
    return mask;
  }

  /** The in-sync leg with the fewest requests in flight, not in `excludeMask`. */
  private pickReadLeg(excludeMask: number): Leg | null {
    let best: Leg | null = null;
    const count = this.legs.length;
    this.readSpread = (this.readSpread + 1) % count;
    for (let step = 0; step < count; step += 1) {
      const leg = this.legs[(this.readSpread + step) % count] as Leg;
      if (leg.state !== 'in-sync' || (leg.bit & excludeMask) !== 0) continue;
      if (best === null || leg.inFlight < best.inFlight) best = leg;
    }
    return best;
  }

  private dispatch(slot: number): void {
    const ring = this.ring;
    if (ring.state(slot) !== 2) ring.markDispatched(slot);
    const target = ring.targetMask(slot);
    const perLegCopy = this.copyMode === 'per-leg' && ring.command(slot) === p.kCmdWrite;
    for (const leg of this.legs) {
      if ((target & leg.bit) === 0) continue;
      leg.inFlight += 1;
      if (perLegCopy) {
        this.postCopy(leg, slot);
        continue;
      }
      const staged = leg.dispatch.stage(slot);
      assert(staged, 'a dispatch queue holds every slot');
    }
    if (!this.publishScheduled) {
      this.publishScheduled = true;
      queueMicrotask(this.publishBound);
    }
  }

  /** Per-leg copy mode: each leg gets its own copy of the payload by message. */
  private postCopy(leg: Leg, slot: number): void {
    const lengthBytes = this.ring.lengthBytes(slot);
    const copy = new Uint8Array(lengthBytes);
    copy.set(this.ring.dataView(slot, lengthBytes));
    this.counters.writeCopies += 1;
    this.counters.writeBytesCopied += lengthBytes;
    if (leg.inline !== null) leg.inline.onCopyMessage({ slot, data: copy });
    else leg.copyPort?.postMessage({ slot, data: copy }, [copy.buffer]);
  }

  private publishDispatches(): void {
    this.publishScheduled = false;
    for (const leg of this.legs) leg.dispatch.publish();
  }

  // ---- completion -------------------------------------------------------------------------

  /** Drains every completion queue, then sleeps on the doorbell until an actor rings it. */
  private pumpCompletions(): void {
    if (this.closed) return;
    const snapshot = this.doorbell.snapshot();
    for (const leg of this.legs) leg.completion.drain(this.onSlotCompleteBound, this.ring.slotCount);
    const wait = this.doorbell.waitAsync(snapshot);
    if (wait === null) setImmediate(this.pumpBound);
    else void wait.then(this.pumpBound);
  }

  private onSlotComplete(slot: number): void {
    const ring = this.ring;
    const target = ring.targetMask(slot);
    const failed = ring.failedMask(slot);
    for (const leg of this.legs) if ((target & leg.bit) !== 0) leg.inFlight -= 1;
    const command = ring.command(slot);
    if (failed !== 0 && (command === p.kCmdRead || command === p.kCmdCache)) {
      this.retryRead(slot, failed);
      return;
    }
    let errno = 0;
    if (failed === target) {
      errno = ring.errno(slot) || p.kEIo;
      // Every leg refused the same request: a request-level answer (EINVAL, ENOSPC, ENOTSUP
      // for FAST_ZERO...), not a divergence. Legs stay in sync; the client gets the error.
    } else if (failed !== 0) {
      for (const leg of this.legs) {
        if ((failed & leg.bit) !== 0) this.failLeg(leg, `${p.commandNames[command] ?? command} failed with ${p.errnoNames[ring.legErrno(slot, leg.index)] ?? 'an error'} while other legs succeeded`);
      }
    }
    if (isDataChanging(command)) this.releaseRange(slot);
    this.finishSlot(slot, errno);
  }

  private retryRead(slot: number, failed: number): void {
    const ring = this.ring;
    const errno = ring.errno(slot) || p.kEIo;
    const failedLeg = this.legs[31 - Math.clz32(failed)] as Leg;
    if (errno === p.kEIo || errno === p.kEShutdown) {
      this.failLeg(failedLeg, `READ failed with ${p.errnoNames[errno] ?? errno}`);
    }
    const next = this.pickReadLeg(this.triedMask[slot] ?? 0);
    if (next === null || errno === p.kEInval) {
      this.finishSlot(slot, errno);
      return;
    }
    this.triedMask[slot] = (this.triedMask[slot] ?? 0) | next.bit;
    ring.resetMasks(slot, next.bit);
    ring.setReadLeg(slot, next.index);
    this.dispatch(slot);
  }

  private releaseRange(slot: number): void {
    const count = this.rangeLock.release(slot, this.granted);
    for (let index = 0; index < count; index += 1) this.dispatch(this.granted[index] ?? 0);
  }

  private finishSlot(slot: number, errno: number): void {
    const token = this.tokenOfSlot[slot] ?? -1;
    assert(token >= 0, 'finished slot has a token');
    this.inFlight -= 1;
    if (this.internalSlot[slot] === 1) {
      this.tokenOfSlot[slot] = -1;
      this.internalSlot[slot] = 0;
      this.ring.free(slot);
      this.deliver(token, errno);
      this.afterFree();
      return;
    }
    this.deliver(token, errno);
  }

  private deliver(token: number, errno: number): void {
    if (token >= kInternalTokenBase) {
      const waiter = this.internalWaiters.get(token);
      this.internalWaiters.delete(token);
      waiter?.(errno);
      return;
    }
    this.handler(token, errno);
  }

  // ---- leg failures -------------------------------------------------------------------------

  private failLeg(leg: Leg, reason: string): void {
    if (leg.state === 'failed') return;
    leg.state = 'failed';
    leg.failureReason = reason;
    const left = this.legs.filter((other) => other.state === 'in-sync').length;
    this.logger.error({ leg: leg.index, uri: leg.uri, reason, inSyncLegs: left }, 'leg failed; it no longer receives requests');
  }

  /** The actor's thread is gone: ack on its behalf every slot it had not acked. */
  private onActorGone(leg: Leg, reason: string): void {
    this.failLeg(leg, reason);
    for (let slot = 0; slot < this.ring.slotCount; slot += 1) {
      if (this.ring.state(slot) !== 2) continue;
      if (abandonLeg(this.ring, slot, leg.index, p.kEIo)) this.onSlotComplete(slot);
    }
  }

  // ---- internal requests, info, shutdown -------------------------------------------------

  /** Runs a request for the engine itself (shutdown flush); resolves with its errno. */
  runInternal(command: number, flags: number, offsetBytes: number, lengthBytes: number): Promise<number> {
    const token = this.nextInternalToken;
    this.nextInternalToken = this.nextInternalToken >= 0x7fff_0000 ? kInternalTokenBase : this.nextInternalToken + 1;
    const done = new Promise<number>((resolve) => this.internalWaiters.set(token, resolve));
    this.submit(command, flags, offsetBytes, lengthBytes, null, token);
    return done;
  }

  async getExtents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    const leg = this.pickReadLeg(0);
    if (leg === null) throw new EnbdError('ENBD_ERR_IO', 'no in-sync leg to ask for block status', p.kEIo);
    return await leg.api.getExtents(offsetBytes, lengthBytes);
  }

  legStatus(): LegStatus[] {
    return this.legs.map((leg) => ({
      index: leg.index,
      uri: leg.uri,
      kind: leg.info?.kind ?? 'unknown',
      state: leg.state,
      inFlight: leg.inFlight,
      failureReason: leg.failureReason,
    }));
  }

  async legStats(): Promise<LegStats[]> {
    return await Promise.all(this.legs.map((leg) => leg.api.stats()));
  }

  stats(): MirrorStats {
    const requests: Record<string, number> = {};
    for (const [command, count] of this.counters.requests) requests[p.commandNames[command] ?? String(command)] = count;
    return {
      requests,
      writeRequests: this.counters.writeRequests,
      writeCopies: this.counters.writeCopies,
      writeBytesCopied: this.counters.writeBytesCopied,
      ringSlotsInUse: this.ring.slotCount - this.ring.freeCount,
      legs: this.legStatus(),
    };
  }

  /** Flushes every in-sync leg (used on shutdown); resolves with the errno (0 = ok). */
  async flushAll(): Promise<number> {
    if (!this.features.flush || this.legs.every((leg) => leg.state !== 'in-sync')) return 0;
    return await this.runInternal(p.kCmdFlush, 0, 0, 0);
  }

  /** Stops the actors and their threads. The server must have drained first. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.all(this.legs.map(async (leg) => {
      try {
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([leg.api.shutdown(), new Promise((resolve) => (timer = setTimeout(resolve, 5000)))]);
        clearTimeout(timer);
      } catch (error) {
        this.logger.warn({ leg: leg.index, err: error }, 'leg shutdown failed');
      }
      leg.copyPort?.close();
      await leg.worker?.terminate();
    }));
  }
}
