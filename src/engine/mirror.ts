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
import { DirtyMap } from '../bitmap/dirty-map.js';
import { LatencyHistograms } from '../core/latency.js';
import { RangeLock } from './range-lock.js';
import { Resync, type CopyOutcome, type ResyncHost, type ResyncProgress, type ResyncRates } from './resync.js';
import { LegActor } from './leg-actor.js';
import type { CopyMode, LegActorApi, LegActorInit, LegDeviceOpener, LegInfo, LegStats, Placement } from './messages.js';

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
  /** Bytes per dirty-map bit (power of two, default 4096). */
  bitmapChunkBytes?: number;
  /** Pool pages of each leg's dirty map (default 64 pages of 4 KiB = 8 GiB of device each). */
  bitmapPoolPages?: number;
  /** Reconnect backoff of a degraded leg: first delay and ceiling (ms, jittered +-20 %). */
  reconnectMinMs?: number;
  reconnectMaxMs?: number;
  /** Resync rate floor and ceiling in bytes/s (ceiling 0 = unlimited). */
  resyncRates?: Partial<ResyncRates>;
  /** Resync copies in flight per leg (default 16) and the largest copy (default 1 MiB). */
  resyncLanes?: number;
  resyncCopyBytes?: number;
  /**
   * Record writes since each leg's last flush (default true). Off only for the bench, to
   * measure what the record costs: a dropped leg's unflushed writes then go unmarked.
   */
  flushTracking?: boolean;
  /**
   * Opens each leg's device instead of the URI's server stub (tests: fault-injecting legs).
   * Needs `placement: 'inline'` (a function cannot cross to a worker).
   */
  openDevice?: LegDeviceOpener;
}

/**
 * in-sync: holds every acknowledged write, serves reads and writes.
 * degraded: missed writes (or its connection is down); waits for its next reconnect attempt.
 * reconnecting: a reconnect attempt is under way.
 * resyncing: connected again and receiving writes; its dirty chunks are being copied back.
 *   Reads go to it only for ranges its dirty map shows clean.
 * failed: out for good (its actor thread died, or the daemon is stopping).
 */
export type LegState = 'in-sync' | 'degraded' | 'reconnecting' | 'resyncing' | 'failed' | 'removed';

/** What the mirror tells its listeners (control plane, metrics). */
export type MirrorEvent =
  | { type: 'leg-state'; leg: number; uri: string; state: LegState; reason: string | null }
  | { type: 'leg-added'; leg: number; uri: string }
  | { type: 'leg-removed'; leg: number; uri: string };

export interface LegStatus {
  index: number;
  uri: string;
  kind: string;
  state: LegState;
  inFlight: number;
  failureReason: string | null;
  dirtyBytes: number;
  reconnectAttempts: number;
  resync: ResyncProgress | null;
  /** Times this leg left the in-sync/resyncing states since start. */
  failures: number;
  /** Bytes copied to this leg by resyncs since start. */
  resyncedBytes: number;
}

export interface MirrorStats {
  requests: Record<string, number>;
  /** Payload bytes by command (READ, WRITE) and range bytes (TRIM, WRITE_ZEROES, CACHE). */
  bytes: Record<string, number>;
  writeRequests: number;
  /** Userspace copies of write payloads (socket -> ring, plus per-leg copies). */
  writeCopies: number;
  writeBytesCopied: number;
  ringSlotsInUse: number;
  legs: LegStatus[];
}

const kInternalTokenBase = 0x4000_0000;
/** Latency histogram kinds, by NBD command (index = kind). */
export const kLatencyKinds = ['read', 'write', 'flush', 'trim', 'write_zeroes', 'cache'] as const;
function latencyKind(command: number): number {
  switch (command) {
    case p.kCmdRead: return 0;
    case p.kCmdWrite: return 1;
    case p.kCmdFlush: return 2;
    case p.kCmdTrim: return 3;
    case p.kCmdWriteZeroes: return 4;
    case p.kCmdCache: return 5;
    default: return -1;
  }
}
const kUnflushedChunkBytes = 64 * 1024;
const kUnflushedPoolPages = 16;
/** Errors that answer the request itself (every leg would say the same), not the leg's health. */
const kRequestLevelErrnos = new Set([p.kEInval, p.kENoSpc, p.kENotSup, p.kEPerm, p.kEOverflow]);

const kWorkerUrl = new URL('../../actors/connection-actor.js', import.meta.url);

class Leg {
  state: LegState = 'in-sync';
  inFlight = 0;
  failureReason: string | null = null;
  info: LegInfo | null = null;
  worker: Worker | null = null;
  inline: LegActor | null = null;
  copyPort: MessagePort | null = null;
  /** Chunks this leg missed: set before any client hears success for them. */
  dirty: DirtyMap | null = null;
  /**
   * Chunks written to this leg since its last good flush, in two halves: writes mark
   * unflushed[current]; a FLUSH sent to the leg swaps halves, and its success clears the other.
   */
  unflushed: [DirtyMap, DirtyMap] | null = null;
  unflushedCurrent = 0;
  /** The FLUSH slot whose success clears unflushed[1 - current], or -1. */
  flushSlot = -1;
  /** The connection dropped or a flush failed: unflushed writes may be lost. */
  mayHaveLostUnflushed = false;
  /** Was in sync when the last in-sync leg went: holds every acknowledged write. */
  lastStanding = false;
  dropsSeen = 0;
  reconnectAttempts = 0;
  reconnectTimer: NodeJS.Timeout | null = null;
  resync: Resync | null = null;
  /** Bumped whenever the leg fails: a resync copy clears bits only within one epoch. */
  epoch = 0;
  failures = 0;
  resyncedBytes = 0;
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
  get currentUnflushed(): DirtyMap | null {
    return this.unflushed?.[this.unflushedCurrent] ?? null;
  }
  /** The half a pending FLUSH covers. */
  get flushingUnflushed(): DirtyMap | null {
    return this.unflushed?.[this.unflushedCurrent ^ 1] ?? null;
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
  get bufferCapacityBytes(): number { return this.ring.slotCount * this.ring.slotBytes; }
  onBufferAvailable: (() => void) | null = null;
  readonly ring: RequestRing;
  readonly legs: Leg[] = [];
  private readonly doorbell: Doorbell;
  private readonly rangeLock: RangeLock;
  private readonly granted: Int32Array;
  private readonly grantQueue: number[] = [];
  private grantHead = 0;
  private drainingGrants = false;
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
  /** Per-leg drop counters bumped by the actors (see LegActorInit.events). */
  private readonly events: Int32Array;
  /** Resync copies: phase of each slot, and the leg it copies to. */
  private readonly copyPhase: Uint8Array;
  private readonly copyTarget: Int8Array;
  private readonly copyEpoch: Int32Array;
  private readonly copyDone = new Map<number, (outcome: CopyOutcome) => void>();
  private readonly slotWaiters: Array<() => void> = [];
  private readonly options: MirrorOptions;
  private resyncRates: ResyncRates;
  private clientRequests = 0;
  private clientRequestsSeen = 0;
  private clientBusyAt = 0;
  private readonly resyncHost: ResyncHost;
  private flushTracking = true;
  private readonly listeners = new Set<(event: MirrorEvent) => void>();
  private resyncPaused = false;
  /** Client request latency (arrival at the engine to completion), by kind (kLatencyKinds). */
  readonly latency = new LatencyHistograms(kLatencyKinds);
  private readonly startedAt: Float64Array;
  private readonly kindOfSlot: Int8Array;
  private readonly counters = { requests: new Map<number, number>(), bytes: new Map<number, number>(), writeCopies: 0, writeBytesCopied: 0, writeRequests: 0 };
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
    this.events = new Int32Array(new SharedArrayBuffer(kMaxLegs * 4));
    this.copyPhase = new Uint8Array(this.ring.slotCount);
    this.copyTarget = new Int8Array(this.ring.slotCount).fill(-1);
    this.copyEpoch = new Int32Array(this.ring.slotCount);
    this.startedAt = new Float64Array(this.ring.slotCount);
    this.kindOfSlot = new Int8Array(this.ring.slotCount).fill(-1);
    this.options = options;
    this.resyncRates = {
      minBytesPerSecond: options.resyncRates?.minBytesPerSecond ?? 32 * 1024 * 1024,
      maxBytesPerSecond: options.resyncRates?.maxBytesPerSecond ?? 0,
    };
    this.resyncHost = {
      copyRange: (legIndex, offsetBytes, lengthBytes) => this.copyRange(legIndex, offsetBytes, lengthBytes),
      stillResyncing: (legIndex) => !this.closed && this.legs[legIndex]?.state === 'resyncing',
      clientBusy: (windowMs) => this.clientBusy(windowMs),
      resyncDone: (legIndex) => this.onResyncDone(this.legs[legIndex] as Leg),
    };
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
    if (options.openDevice !== undefined && options.placement !== 'inline') {
      throw new EnbdError('ENBD_ERR_CONFIG', 'openDevice needs placement "inline"');
    }
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

  /** A new leg object with its queues and actor (not opened yet). */
  private createLeg(index: number, uri: string): Leg {
    const capacity = nextPowerOfTwo(this.ring.slotCount);
    const dispatch = SpscQueue.create(capacity);
    const completion = SpscQueue.create(capacity);
    const init: LegActorInit = {
      legIndex: index,
      uri,
      ring: this.ring.buffers,
      dispatch: dispatch.buffer,
      completion: completion.buffer,
      doorbell: this.doorbell.buffer,
      events: this.events.buffer as SharedArrayBuffer,
      logLevel: this.options.logLevel ?? 'info',
      connectTimeoutMs: this.options.connectTimeoutMs ?? 10_000,
      requestTimeoutMs: this.options.legTimeoutMs ?? 0,
    };
    const leg = this.startLeg(init, dispatch, completion);
    leg.dropsSeen = Atomics.load(this.events, index);
    return leg;
  }

  private createMaps(leg: Leg): void {
    leg.dirty = DirtyMap.create({
      deviceBytes: this.sizeBytes,
      chunkBytes: this.options.bitmapChunkBytes ?? 4096,
      poolPages: this.options.bitmapPoolPages ?? 64,
    });
    const unflushed = (): DirtyMap => DirtyMap.create({
      deviceBytes: this.sizeBytes,
      chunkBytes: Math.max(kUnflushedChunkBytes, leg.dirty?.chunkBytes ?? 0),
      poolPages: kUnflushedPoolPages,
    });
    leg.unflushed = [unflushed(), unflushed()];
  }

  private async startLegs(options: MirrorOptions): Promise<void> {
    for (const [index, uri] of options.legs.entries()) this.legs.push(this.createLeg(index, uri));
    const infos = await Promise.all(this.legs.map((leg) => leg.api.open()));
    const problems: string[] = [];
    for (const [index, info] of infos.entries()) {
      const leg = this.legs[index] as Leg;
      if ('error' in info) problems.push(`leg ${index} (${leg.uri}): ${info.error.message}`);
      else leg.info = info;
    }
    if (problems.length > 0) throw new EnbdError('ENBD_ERR_LEG', `cannot open leg(s): ${problems.join('; ')}`);
    this.settleGeometry(options.sizeBytes);
    this.flushTracking = this.features.flush && options.flushTracking !== false;
    for (const leg of this.legs) this.createMaps(leg);
    this.pumpCompletions();
  }

  private startLeg(init: LegActorInit, dispatch: SpscQueue, completion: SpscQueue): Leg {
    if (this.placement === 'inline') {
      const actor = new LegActor(init, this.logger.child({ leg: init.legIndex }), this.options.openDevice ?? null);
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
    // Resync copies wait behind client requests for slots: wake every waiting copy (each one
    // retries and waits again if its run of slots is still not free), so none is left asleep
    // once the ring drains.
    if (this.slotWaiters.length > 0 && this.ring.freeCount > 0) for (const wake of this.slotWaiters.splice(0)) wake();
  }

  submit(command: number, flags: number, offsetBytes: number, lengthBytes: number, data: Uint8Array | null, token: number): void {
    this.inFlight += 1;
    this.clientRequests += 1;
    this.counters.requests.set(command, (this.counters.requests.get(command) ?? 0) + 1);
    if (lengthBytes > 0) this.counters.bytes.set(command, (this.counters.bytes.get(command) ?? 0) + lengthBytes);
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
    this.startedAt[slot] = performance.now();
    this.kindOfSlot[slot] = latencyKind(command);
    const target = this.targetFor(command, offsetBytes, lengthBytes);
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
    if (command === p.kCmdFlush) this.beginFlush(slot, target);
    // Data-changing requests: the target set is settled again at dispatch, under the range lock
    // (see settleWriteTarget).
    if (isDataChanging(command) && !this.rangeLock.acquire(slot, offsetBytes, lengthBytes)) return;
    this.dispatch(slot);
  }

  private clientBusy(windowMs: number): boolean {
    const now = Date.now();
    if (this.clientRequests !== this.clientRequestsSeen) {
      this.clientRequestsSeen = this.clientRequests;
      this.clientBusyAt = now;
    }
    return now - this.clientBusyAt < windowMs;
  }

  /**
   * Under the range lock, just before a data-changing request leaves: it goes to every leg
   * that is in sync or resyncing, and every other leg has the range marked in its dirty map
   * now, before any leg can answer (so before the client can hear success). Settling here and
   * not at arrival keeps marks and resync clears of one range strictly ordered by the lock.
   * Returns false (request finished with EIO) when no leg is in sync.
   */
  private settleWriteTarget(slot: number): boolean {
    let target = 0;
    let inSync = false;
    for (const leg of this.legs) {
      if (leg.state === 'in-sync') inSync = true;
      if (leg.state === 'in-sync' || leg.state === 'resyncing') target |= leg.bit;
    }
    if (!inSync) {
      this.releaseRange(slot);
      this.finishSlot(slot, p.kEIo);
      return false;
    }
    const ring = this.ring;
    if (target !== ring.targetMask(slot)) ring.resetMasks(slot, target);
    if (target !== this.allLegsMask) {
      const offsetBytes = ring.offsetBytes(slot);
      const lengthBytes = ring.lengthBytes(slot);
      for (const leg of this.legs) {
        if ((target & leg.bit) === 0 && leg.state !== 'removed') leg.dirty?.markRange(offsetBytes, lengthBytes);
      }
    }
    return true;
  }

  /** FLUSH sent to a leg swaps its unflushed halves (unless a flush is already pending there). */
  private beginFlush(slot: number, target: number): void {
    for (const leg of this.legs) {
      if ((target & leg.bit) === 0 || leg.flushSlot !== -1) continue;
      leg.flushSlot = slot;
      leg.unflushedCurrent ^= 1;
    }
  }

  /** FLUSH answered: a leg that flushed forgets the writes the flush covered. */
  private settleFlush(slot: number, target: number, failed: number): void {
    for (const leg of this.legs) {
      if ((target & leg.bit) === 0 || leg.flushSlot !== slot) continue;
      leg.flushSlot = -1;
      if ((failed & leg.bit) === 0) leg.flushingUnflushed?.clearAll();
      else leg.mayHaveLostUnflushed = true;
    }
  }

  private get allLegsMask(): number {
    return (1 << this.legs.length) - 1;
  }


  /**
   * Legs a new request goes to: one up-to-date leg for READ/CACHE; every in-sync or resyncing
   * leg otherwise (for data-changing requests settled again at dispatch). 0 = none: EIO, since
   * no leg that holds every acknowledged write is there.
   */
  private targetFor(command: number, offsetBytes: number, lengthBytes: number): number {
    if (command === p.kCmdRead || command === p.kCmdCache) {
      const leg = this.pickReadLeg(0, offsetBytes, lengthBytes);
      return leg === null ? 0 : leg.bit;
    }
    let mask = 0;
    let inSync = false;
    for (const leg of this.legs) {
      if (leg.state === 'in-sync') inSync = true;
      if (leg.state === 'in-sync' || leg.state === 'resyncing') mask |= leg.bit;
    }
    return inSync ? mask : 0;
  }

  /**
   * The leg with the fewest requests in flight, not in `excludeMask`, that is up to date for
   * the range: in sync, or resyncing with the range clean in its dirty map.
   */
  private pickReadLeg(excludeMask: number, offsetBytes: number, lengthBytes: number): Leg | null {
    let best: Leg | null = null;
    const count = this.legs.length;
    this.readSpread = (this.readSpread + 1) % count;
    for (let step = 0; step < count; step += 1) {
      const leg = this.legs[(this.readSpread + step) % count] as Leg;
      if ((leg.bit & excludeMask) !== 0) continue;
      if (leg.state !== 'in-sync') {
        if (leg.state !== 'resyncing' || leg.dirty === null || leg.dirty.testRange(offsetBytes, lengthBytes)) continue;
      }
      if (best === null || leg.inFlight < best.inFlight) best = leg;
    }
    return best;
  }

  /** A source for a resync copy: an in-sync leg other than the target, fewest in flight. */
  private pickSourceLeg(excludeMask: number): Leg | null {
    let best: Leg | null = null;
    for (const leg of this.legs) {
      if (leg.state !== 'in-sync' || (leg.bit & excludeMask) !== 0) continue;
      if (best === null || leg.inFlight < best.inFlight) best = leg;
    }
    return best;
  }

  private dispatch(slot: number): void {
    const ring = this.ring;
    if (ring.state(slot) !== 2) {
      const phase = this.copyPhase[slot];
      if (phase === 1) {
        if (!this.prepareCopyRead(slot)) return;
      } else if (phase === 0 && isDataChanging(ring.command(slot)) && !this.settleWriteTarget(slot)) {
        return;
      }
      ring.markDispatched(slot);
    }
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
    for (const leg of this.legs) {
      const drops = Atomics.load(this.events, leg.index);
      if (drops !== leg.dropsSeen) {
        leg.dropsSeen = drops;
        this.onLegDropped(leg);
      }
    }
    const wait = this.doorbell.waitAsync(snapshot);
    if (wait === null) setImmediate(this.pumpBound);
    else void wait.then(this.pumpBound);
  }

  private onSlotComplete(slot: number): void {
    const ring = this.ring;
    const target = ring.targetMask(slot);
    const failed = ring.failedMask(slot);
    for (const leg of this.legs) if ((target & leg.bit) !== 0) leg.inFlight -= 1;
    const phase = this.copyPhase[slot] ?? 0;
    if (phase !== 0) {
      this.onCopyPhaseComplete(slot, phase, failed);
      return;
    }
    const command = ring.command(slot);
    if (failed !== 0 && (command === p.kCmdRead || command === p.kCmdCache)) {
      this.retryRead(slot, failed);
      return;
    }
    if (command === p.kCmdFlush) this.settleFlush(slot, target, failed);
    let errno = 0;
    if (failed !== 0) {
      if (failed === target && this.allRequestLevel(slot, failed)) {
        // Every leg refused the same request: a request-level answer (EINVAL, ENOSPC, ENOTSUP
        // for FAST_ZERO...), not a divergence. Legs stay in sync; the client gets the error.
        errno = ring.errno(slot) || p.kEIo;
      } else {
        if (failed === target) errno = p.kEIo;
        this.onLegFailures(slot, command, target, failed);
      }
    }
    if (isDataChanging(command)) {
      if (this.flushTracking && (ring.flags(slot) & p.kCmdFlagFua) === 0) this.recordUnflushed(slot, target & ~failed);
      this.releaseRange(slot);
    }
    this.finishSlot(slot, errno);
  }

  private allRequestLevel(slot: number, failed: number): boolean {
    for (const leg of this.legs) {
      if ((failed & leg.bit) !== 0 && !kRequestLevelErrnos.has(this.ring.legErrno(slot, leg.index))) return false;
    }
    return true;
  }

  /** Writes that reached a leg and are not yet known durable there (see Leg.unflushed). */
  private recordUnflushed(slot: number, okMask: number): void {
    if (okMask === 0) return;
    const offsetBytes = this.ring.offsetBytes(slot);
    const lengthBytes = this.ring.lengthBytes(slot);
    for (const leg of this.legs) {
      if ((okMask & leg.bit) !== 0) leg.currentUnflushed?.markRange(offsetBytes, lengthBytes);
    }
  }

  /**
   * Legs failed a request that others completed (or all failed it with a leg-level error).
   * A data-changing request's range is marked on each failed leg before the client is
   * answered; when every targeted leg failed, the lowest-index one stays unmarked as the
   * reference copy for that range (the client gets EIO; the legs converge on the reference).
   */
  private onLegFailures(slot: number, command: number, target: number, failed: number): void {
    const ring = this.ring;
    const offsetBytes = ring.offsetBytes(slot);
    const lengthBytes = ring.lengthBytes(slot);
    const reference = failed === target ? (this.legs[31 - Math.clz32(failed & -failed)] as Leg) : null;
    const name = p.commandNames[command] ?? String(command);
    for (const leg of this.legs) {
      if ((failed & leg.bit) === 0 || leg === reference) continue;
      if (isDataChanging(command)) leg.dirty?.markRange(offsetBytes, lengthBytes);
      const errnoName = p.errnoNames[ring.legErrno(slot, leg.index)] ?? 'an error';
      this.failLeg(leg, failed === target ? `${name} failed on every leg (${errnoName} here)` : `${name} failed with ${errnoName} while other legs succeeded`);
    }
    if (reference !== null) {
      const errnoName = p.errnoNames[ring.legErrno(slot, reference.index)] ?? 'an error';
      this.failLeg(reference, `${name} failed on every leg (${errnoName} here)`);
    }
  }

  private retryRead(slot: number, failed: number): void {
    const ring = this.ring;
    const errno = ring.errno(slot) || p.kEIo;
    const failedLeg = this.legs[31 - Math.clz32(failed)] as Leg;
    const offsetBytes = ring.offsetBytes(slot);
    const lengthBytes = ring.lengthBytes(slot);
    if (!kRequestLevelErrnos.has(errno)) {
      // The leg could not read what it should hold: that range needs a copy from a good leg.
      failedLeg.dirty?.markRange(offsetBytes, lengthBytes);
      this.failLeg(failedLeg, `${p.commandNames[ring.command(slot)] ?? 'READ'} failed with ${p.errnoNames[errno] ?? errno}`);
    }
    const next = this.pickReadLeg(this.triedMask[slot] ?? 0, offsetBytes, lengthBytes);
    if (next === null || errno === p.kEInval) {
      // A leg's own trouble (a drop's ESHUTDOWN...) reaches the client as EIO.
      this.finishSlot(slot, kRequestLevelErrnos.has(errno) ? errno : p.kEIo);
      return;
    }
    this.triedMask[slot] = (this.triedMask[slot] ?? 0) | next.bit;
    ring.resetMasks(slot, next.bit);
    ring.setReadLeg(slot, next.index);
    this.dispatch(slot);
  }

  /** Releases the slot's range and dispatches what it unblocked (re-entrant: queued). */
  private releaseRange(slot: number): void {
    const count = this.rangeLock.release(slot, this.granted);
    for (let index = 0; index < count; index += 1) this.grantQueue.push(this.granted[index] ?? 0);
    if (this.drainingGrants) return;
    this.drainingGrants = true;
    while (this.grantHead < this.grantQueue.length) this.dispatch(this.grantQueue[this.grantHead++] ?? 0);
    this.grantQueue.length = 0;
    this.grantHead = 0;
    this.drainingGrants = false;
  }

  private finishSlot(slot: number, errno: number): void {
    const token = this.tokenOfSlot[slot] ?? -1;
    assert(token >= 0, 'finished slot has a token');
    this.inFlight -= 1;
    const kind = this.kindOfSlot[slot] ?? -1;
    if (kind >= 0) {
      this.kindOfSlot[slot] = -1;
      if (token < kInternalTokenBase) this.latency.record(kind, performance.now() - (this.startedAt[slot] ?? 0));
    }
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

  // ---- resync copies ------------------------------------------------------------------------

  /**
   * One resync copy: a ring slot, range-locked for [offset, offset+length), READ from an in-sync
   * leg into the slot, then WRITE from the slot to the resyncing leg; the leg's bits for the
   * range are cleared when that WRITE succeeds within the same leg epoch, still under the lock.
   */
  private async copyRange(legIndex: number, offsetBytes: number, lengthBytes: number): Promise<CopyOutcome> {
    const target = this.legs[legIndex] as Leg;
    const span = this.ring.slotsFor(lengthBytes);
    let slot = this.ring.allocate(span);
    while (slot < 0) {
      await new Promise<void>((resolve) => this.slotWaiters.push(resolve));
      if (this.closed || target.state !== 'resyncing') return 'stopped';
      slot = this.ring.allocate(span);
    }
    if (this.closed || target.state !== 'resyncing') {
      this.ring.free(slot);
      this.afterFree();
      return 'stopped';
    }
    const source = this.pickSourceLeg(target.bit);
    if (source === null) {
      this.ring.free(slot);
      this.afterFree();
      return 'no-source';
    }
    const token = this.nextInternalToken;
    this.nextInternalToken = this.nextInternalToken >= 0x7fff_0000 ? kInternalTokenBase : this.nextInternalToken + 1;
    this.bindToken(slot, token, true);
    this.spanOfSlot[slot] = span;
    this.inFlight += 1;
    this.ring.setRequest(slot, p.kCmdRead, 0, offsetBytes, lengthBytes, span, source.bit);
    this.ring.setReadLeg(slot, source.index);
    this.copyPhase[slot] = 1;
    this.copyTarget[slot] = legIndex;
    this.copyEpoch[slot] = target.epoch;
    const done = new Promise<CopyOutcome>((resolve) => this.copyDone.set(slot, resolve));
    if (this.rangeLock.acquire(slot, offsetBytes, lengthBytes)) this.dispatch(slot);
    return await done;
  }

  /** At dispatch of a copy's READ (maybe later, after the range lock): a source still in sync. */
  private prepareCopyRead(slot: number): boolean {
    const target = this.legs[this.copyTarget[slot] ?? 0] as Leg;
    if (target.state !== 'resyncing' || target.epoch !== this.copyEpoch[slot]) {
      this.endCopy(slot, 'stopped');
      return false;
    }
    const current = this.legs[this.ring.readLeg(slot)];
    let source: Leg | null = current !== undefined && current.state === 'in-sync' ? current : null;
    source ??= this.pickSourceLeg(target.bit);
    if (source === null) {
      this.endCopy(slot, 'no-source');
      return false;
    }
    this.ring.resetMasks(slot, source.bit);
    this.ring.setReadLeg(slot, source.index);
    return true;
  }

  private onCopyPhaseComplete(slot: number, phase: number, failed: number): void {
    const ring = this.ring;
    const target = this.legs[this.copyTarget[slot] ?? 0] as Leg;
    const offsetBytes = ring.offsetBytes(slot);
    const lengthBytes = ring.lengthBytes(slot);
    if (phase === 1) {
      if (failed !== 0) {
        const source = this.legs[ring.readLeg(slot)] as Leg;
        const errno = ring.legErrno(slot, source.index);
        source.dirty?.markRange(offsetBytes, lengthBytes);
        this.failLeg(source, `READ for a resync failed with ${p.errnoNames[errno] ?? errno}`);
        this.endCopy(slot, 'source-failed');
        return;
      }
      if (target.state !== 'resyncing' || target.epoch !== this.copyEpoch[slot]) {
        this.endCopy(slot, 'stopped');
        return;
      }
      this.copyPhase[slot] = 2;
      ring.rephase(slot, p.kCmdWrite, 0, target.bit);
      this.dispatch(slot);
      return;
    }
    if (failed !== 0) {
      const errno = ring.legErrno(slot, target.index);
      this.failLeg(target, `WRITE for a resync failed with ${p.errnoNames[errno] ?? errno}`);
      this.endCopy(slot, 'target-failed');
      return;
    }
    if (target.state !== 'resyncing' || target.epoch !== this.copyEpoch[slot]) {
      this.endCopy(slot, 'stopped');
      return;
    }
    target.dirty?.clearRange(offsetBytes, lengthBytes);
    target.resyncedBytes += lengthBytes;
    if (this.features.flush) target.currentUnflushed?.markRange(offsetBytes, lengthBytes);
    this.endCopy(slot, 'copied');
  }

  private endCopy(slot: number, outcome: CopyOutcome): void {
    this.copyPhase[slot] = 0;
    this.copyTarget[slot] = -1;
    const resolve = this.copyDone.get(slot);
    this.copyDone.delete(slot);
    this.releaseRange(slot);
    this.finishSlot(slot, 0);
    resolve?.(outcome);
  }

  // ---- leg failures, reconnect, return ------------------------------------------------------

  /**
   * The leg stops being up to date: it gets no more requests and every write it misses from
   * now on is marked at dispatch. Its connection is closed and reconnected with backoff.
   */
  private failLeg(leg: Leg, reason: string, final = false): void {
    if (leg.state === 'failed' || leg.state === 'removed') return;
    leg.failures += 1;
    if (final) {
      leg.state = 'failed';
      leg.failureReason = reason;
      leg.epoch += 1;
      this.clearReconnect(leg);
      leg.resync?.nudge();
      this.logger.error({ leg: leg.index, uri: leg.uri, reason }, 'leg failed; it stays out until reconnected by hand');
      this.emitState(leg);
      if (leg.worker === null || leg.worker.threadId >= 0) void leg.api.disconnect().catch(() => undefined);
      return;
    }
    if (leg.state === 'degraded' || leg.state === 'reconnecting') return;
    const wasInSync = leg.state === 'in-sync';
    leg.state = 'degraded';
    leg.failureReason = reason;
    leg.epoch += 1;
    const inSync = this.legs.filter((other) => other.state === 'in-sync').length;
    if (wasInSync && inSync === 0) leg.lastStanding = true;
    leg.resync?.nudge();
    this.logger.error({ leg: leg.index, uri: leg.uri, reason, inSyncLegs: inSync }, 'leg degraded; it will be reconnected and resynced');
    this.emitState(leg);
    if (this.closed) return;
    void leg.api.disconnect().catch(() => undefined);
    this.scheduleReconnect(leg);
  }

  private scheduleReconnect(leg: Leg): void {
    if (this.closed || leg.reconnectTimer !== null) return;
    const minMs = this.options.reconnectMinMs ?? 250;
    const maxMs = this.options.reconnectMaxMs ?? 30_000;
    const base = Math.min(maxMs, minMs * 2 ** Math.min(leg.reconnectAttempts, 20));
    const delayMs = Math.round(base * (0.8 + 0.4 * Math.random()));
    leg.reconnectTimer = setTimeout(() => void this.reconnectLeg(leg), delayMs);
  }

  private clearReconnect(leg: Leg): void {
    if (leg.reconnectTimer !== null) clearTimeout(leg.reconnectTimer);
    leg.reconnectTimer = null;
  }

  private async reconnectLeg(leg: Leg): Promise<void> {
    leg.reconnectTimer = null;
    if (this.closed || leg.state !== 'degraded') return;
    leg.state = 'reconnecting';
    leg.reconnectAttempts += 1;
    this.emitState(leg);
    let info: LegInfo | { error: { message: string } };
    try {
      info = await leg.api.reconnect();
    } catch (error) {
      info = { error: { message: error instanceof Error ? error.message : String(error) } };
    }
    if (this.closed || leg.state !== 'reconnecting') return;
    let problem: string | null = null;
    if ('error' in info) problem = info.error.message;
    else if (info.sizeBytes < this.sizeBytes) problem = `it has ${info.sizeBytes} bytes now, fewer than the export's ${this.sizeBytes}`;
    else if (info.features.readOnly) problem = 'it is read-only now';
    if (problem !== null) {
      leg.state = 'degraded';
      leg.failureReason = `reconnect failed: ${problem}`;
      const log = leg.reconnectAttempts <= 3 || leg.reconnectAttempts % 10 === 0 ? 'warn' : 'debug';
      this.logger[log]({ leg: leg.index, uri: leg.uri, attempt: leg.reconnectAttempts, problem }, 'leg reconnect failed');
      this.emitState(leg);
      if (!('error' in info)) void leg.api.disconnect().catch(() => undefined);
      this.scheduleReconnect(leg);
      return;
    }
    leg.info = info as LegInfo;
    this.legReturned(leg);
  }

  /** Merges every dirty chunk of `from` into `into` (maps of one device, any chunk sizes). */
  private static mergeMap(into: DirtyMap, from: DirtyMap): void {
    const run = { firstChunk: 0, chunkCount: 0 };
    let chunk = 0;
    while (from.nextDirtyRunInto(chunk, 1 << 20, run)) {
      const offsetBytes = run.firstChunk * from.chunkBytes;
      into.markRange(offsetBytes, Math.min(run.chunkCount * from.chunkBytes, from.deviceBytes - offsetBytes));
      chunk = run.firstChunk + run.chunkCount;
    }
  }

  /**
   * A degraded leg is connected again. With an in-sync leg around it resyncs (or is in sync at
   * once when it missed nothing). With none, a leg that holds every acknowledged write (it was
   * among the last in sync, or missed nothing) becomes the reference: every other leg is marked
   * wherever it may differ from it. Any other leg waits, connected, for a source.
   */
  private legReturned(leg: Leg): void {
    const dirty = leg.dirty as DirtyMap;
    const unflushed = leg.unflushed as [DirtyMap, DirtyMap];
    leg.flushSlot = -1;
    leg.epoch += 1;
    const source = this.legs.some((other) => other !== leg && other.state === 'in-sync');
    if (!source && (leg.lastStanding || dirty.dirtyChunkCount() === 0)) {
      for (const other of this.legs) {
        if (other === leg || other.dirty === null) continue;
        MirrorDevice.mergeMap(other.dirty, dirty);
        if (leg.mayHaveLostUnflushed) for (const half of unflushed) MirrorDevice.mergeMap(other.dirty, half);
        other.lastStanding = false;
      }
      dirty.clearAll();
      for (const half of unflushed) half.clearAll();
      leg.mayHaveLostUnflushed = false;
      this.setInSync(leg, 'it holds every acknowledged write; the other legs resync from it');
      return;
    }
    if (leg.mayHaveLostUnflushed) for (const half of unflushed) MirrorDevice.mergeMap(dirty, half);
    for (const half of unflushed) half.clearAll();
    leg.mayHaveLostUnflushed = false;
    leg.lastStanding = false;
    if (source && dirty.dirtyChunkCount() === 0) {
      this.setInSync(leg, 'it missed no writes');
      return;
    }
    leg.state = 'resyncing';
    leg.failureReason = null;
    leg.reconnectAttempts = 0;
    this.logger.info({ leg: leg.index, uri: leg.uri, dirtyBytes: dirty.dirtyBytes(), source }, source ? 'leg reconnected; resyncing' : 'leg reconnected; waiting for an up-to-date leg to resync from');
    this.emitState(leg);
    this.startResync(leg);
  }

  private setInSync(leg: Leg, why: string): void {
    leg.state = 'in-sync';
    leg.failureReason = null;
    leg.reconnectAttempts = 0;
    leg.lastStanding = false;
    this.logger.info({ leg: leg.index, uri: leg.uri, why }, 'leg in sync');
    this.emitState(leg);
    for (const other of this.legs) if (other.state === 'resyncing') this.startResync(other);
  }

  private startResync(leg: Leg): void {
    // Copies take at most half of the ring, so client requests always find slots.
    const copyBytes = Math.min(this.options.resyncCopyBytes ?? 1024 * 1024, this.ring.maxRequestBytes);
    const lanes = Math.max(1, Math.min(this.options.resyncLanes ?? 16, Math.floor(this.ring.slotCount / 2 / this.ring.slotsFor(copyBytes))));
    leg.resync ??= new Resync(leg.index, leg.dirty as DirtyMap, this.resyncHost, this.resyncRates, this.logger, lanes, copyBytes);
    leg.resync.setRates(this.resyncRates);
    if (this.resyncPaused) leg.resync.pause();
    if (leg.resync.isRunning) leg.resync.nudge();
    else void leg.resync.start();
  }

  private onResyncDone(leg: Leg): void {
    if (leg.state !== 'resyncing' || (leg.dirty?.dirtyChunkCount() ?? 0) !== 0) return;
    this.setInSync(leg, 'resync complete');
  }

  /** The actor reported that the leg's connection dropped on its own. */
  private onLegDropped(leg: Leg): void {
    leg.mayHaveLostUnflushed = true;
    this.failLeg(leg, 'connection dropped');
  }

  /** The actor's thread is gone: ack on its behalf every slot it had not acked. */
  private onActorGone(leg: Leg, reason: string): void {
    this.failLeg(leg, reason, true);
    for (let slot = 0; slot < this.ring.slotCount; slot += 1) {
      if (this.ring.state(slot) !== 2) continue;
      if (abandonLeg(this.ring, slot, leg.index, p.kEIo)) this.onSlotComplete(slot);
    }
  }

  // ---- operator controls (control plane, bench, tests) ------------------------------------

  /** Subscribes to leg state changes; returns the unsubscribe function. */
  on(listener: (event: MirrorEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  private emit(event: MirrorEvent): void {
    for (const listener of this.listeners) {
      try {
        listener(event);
      } catch (error) {
        this.logger.warn({ err: error }, 'mirror event listener failed');
      }
    }
  }

  private emitState(leg: Leg): void {
    this.emit({ type: 'leg-state', leg: leg.index, uri: leg.uri, state: leg.state, reason: leg.failureReason });
  }

  private legAt(index: number): Leg {
    const leg = this.legs[index];
    if (leg === undefined) throw new EnbdError('ENBD_ERR_CONFIG', `no leg ${index} (legs are 0..${this.legs.length - 1})`);
    return leg;
  }

  /**
   * Takes a leg out by hand: it gets no requests and is not reconnected until reconnectLeg().
   * Refused for the last in-sync leg (the export would lose its only up-to-date copy).
   */
  failLegByHand(index: number, reason = 'failed by the operator'): void {
    const leg = this.legAt(index);
    if (leg.state === 'in-sync' && !this.legs.some((other) => other !== leg && other.state === 'in-sync')) {
      throw new EnbdError('ENBD_ERR_CONFIG', `leg ${index} is the last in-sync leg; refusing to fail it`);
    }
    this.failLeg(leg, reason, true);
  }

  /** Reconnects a failed or degraded leg now (then resync); resolves after this attempt. */
  async reconnectLegNow(index: number): Promise<LegState> {
    const leg = this.legAt(index);
    if (leg.state !== 'failed' && leg.state !== 'degraded') return leg.state;
    if (leg.worker !== null && leg.worker.threadId < 0) throw new EnbdError('ENBD_ERR_LEG', `leg ${index}'s actor thread is gone`);
    this.clearReconnect(leg);
    leg.state = 'degraded';
    leg.reconnectAttempts = 0;
    await this.reconnectLeg(leg);
    return leg.state;
  }

  /**
   * Adds a leg to the running mirror: it must hold the export's size and offer what the export
   * already promised its clients. Its map starts all dirty: a full resync from an in-sync leg.
   * Resolves with its index (a removed leg's index is reused).
   */
  async addLeg(uri: string): Promise<number> {
    if (this.closed) throw new EnbdError('ENBD_ERR_CONFIG', 'the mirror is shutting down');
    parseLegUri(uri);
    if (this.legs.some((leg) => leg.state !== 'removed' && leg.uri === uri)) throw new EnbdError('ENBD_ERR_CONFIG', `${uri} is already a leg`);
    let index = this.legs.findIndex((leg) => leg.state === 'removed' && leg.worker === null && leg.inline === null);
    if (index < 0) index = this.legs.length;
    if (index >= kMaxLegs) throw new EnbdError('ENBD_ERR_CONFIG', `a mirror has at most ${kMaxLegs} legs`);
    const leg = this.createLeg(index, uri);
    const info = await leg.api.open();
    let problem: string | null = null;
    if ('error' in info) problem = info.error.message;
    else if (info.sizeBytes < this.sizeBytes) problem = `it has ${info.sizeBytes} bytes, fewer than the export's ${this.sizeBytes}`;
    else if (info.features.readOnly) problem = 'it is read-only';
    else {
      const missing = (['flush', 'fua', 'trim', 'writeZeroes'] as const).filter((key) => this.features[key] && !info.features[key]);
      if (missing.length > 0) problem = `it lacks ${missing.join(', ')}, which the export offers`;
    }
    if (problem !== null || this.closed) {
      await this.stopActor(leg);
      throw new EnbdError('ENBD_ERR_LEG', `cannot add leg ${uri}: ${problem ?? 'the mirror is shutting down'}`);
    }
    leg.info = info as LegInfo;
    this.createMaps(leg);
    leg.dirty?.markAll();
    leg.state = 'resyncing';
    this.legs[index] = leg;
    this.logger.info({ leg: index, uri }, 'leg added; full resync');
    this.emit({ type: 'leg-added', leg: index, uri });
    this.emitState(leg);
    this.startResync(leg);
    return index;
  }

  /**
   * Removes a leg for good (its actor stops once its requests drained). Refused for the last
   * in-sync leg.
   */
  async removeLeg(index: number): Promise<void> {
    const leg = this.legAt(index);
    if (leg.state === 'removed') throw new EnbdError('ENBD_ERR_CONFIG', `leg ${index} is already removed`);
    if (leg.state === 'in-sync' && !this.legs.some((other) => other !== leg && other.state === 'in-sync')) {
      throw new EnbdError('ENBD_ERR_CONFIG', `leg ${index} is the last in-sync leg; refusing to remove it`);
    }
    this.clearReconnect(leg);
    leg.state = 'removed';
    leg.failureReason = 'removed by the operator';
    leg.epoch += 1;
    leg.resync?.nudge();
    this.logger.warn({ leg: index, uri: leg.uri }, 'leg removed');
    this.emit({ type: 'leg-removed', leg: index, uri: leg.uri });
    const deadline = Date.now() + 30_000;
    while (leg.inFlight > 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
    await this.stopActor(leg);
  }

  private async stopActor(leg: Leg): Promise<void> {
    try {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([leg.api.shutdown(), new Promise((resolve) => (timer = setTimeout(resolve, 5000)))]);
      clearTimeout(timer);
    } catch (error) {
      this.logger.warn({ leg: leg.index, err: error }, 'leg shutdown failed');
    }
    leg.copyPort?.close();
    const worker = leg.worker;
    leg.worker = null;
    leg.inline = null;
    await worker?.terminate();
  }

  /** Marks a leg's range (default: all of it) as missed, e.g. for a full resync. Not for an in-sync leg. */
  markLegDirty(index: number, offsetBytes = 0, lengthBytes = this.sizeBytes - offsetBytes): void {
    const leg = this.legAt(index);
    if (leg.state === 'in-sync') throw new EnbdError('ENBD_ERR_CONFIG', `leg ${index} is in sync; fail it first`);
    if (offsetBytes === 0 && lengthBytes === this.sizeBytes) leg.dirty?.markAll();
    else leg.dirty?.markRange(offsetBytes, lengthBytes);
  }

  /**
   * Legs the mirror may read [offset, offset+length) from right now: admitted (in-sync,
   * resyncing) and clean in their dirty map for the whole range. Tests check the promise with
   * it: every acknowledged write reads the same from each of these.
   */
  readableLegs(offsetBytes: number, lengthBytes: number): number[] {
    const legs: number[] = [];
    for (const leg of this.legs) {
      if (leg.state === 'in-sync' || (leg.state === 'resyncing' && leg.dirty !== null && !leg.dirty.testRange(offsetBytes, lengthBytes))) legs.push(leg.index);
    }
    return legs;
  }

  dirtyMap(index: number): DirtyMap | null {
    return this.legAt(index).dirty;
  }

  setResyncRates(rates: Partial<ResyncRates>): ResyncRates {
    this.resyncRates = { ...this.resyncRates, ...rates };
    for (const leg of this.legs) leg.resync?.setRates(this.resyncRates);
    return this.resyncRates;
  }

  /** Pauses or resumes every resync, including ones that start later. */
  pauseResync(paused: boolean): void {
    this.resyncPaused = paused;
    for (const leg of this.legs) {
      if (paused) leg.resync?.pause();
      else leg.resync?.resume();
    }
  }

  resyncSettings(): { rates: ResyncRates; paused: boolean } {
    return { rates: { ...this.resyncRates }, paused: this.resyncPaused };
  }

  /** Changes the log level of the engine and of every leg actor (workers have their own logger). */
  async setLogLevel(level: string): Promise<void> {
    this.logger.level = level;
    await Promise.all(this.legs.filter((leg) => leg.state !== 'removed' && (leg.inline !== null || leg.worker !== null))
      .map(async (leg) => await leg.api.setLogLevel(level).catch(() => undefined)));
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
    const leg = this.pickReadLeg(0, offsetBytes, Math.min(lengthBytes, this.sizeBytes - offsetBytes));
    if (leg === null) throw new EnbdError('ENBD_ERR_IO', 'no up-to-date leg to ask for block status', p.kEIo);
    return await leg.api.getExtents(offsetBytes, lengthBytes);
  }

  /** Every leg but removed ones. */
  legStatus(): LegStatus[] {
    return this.legs.filter((leg) => leg.state !== 'removed').map((leg) => ({
      index: leg.index,
      uri: leg.uri,
      kind: leg.info?.kind ?? 'unknown',
      state: leg.state,
      inFlight: leg.inFlight,
      failureReason: leg.failureReason,
      dirtyBytes: leg.dirty?.dirtyBytes() ?? 0,
      reconnectAttempts: leg.reconnectAttempts,
      resync: leg.resync !== null && (leg.state === 'resyncing' || leg.resync.isRunning) ? leg.resync.progress() : null,
      failures: leg.failures,
      resyncedBytes: leg.resyncedBytes,
    }));
  }

  /**
   * Per-leg actor counters, by position in `legs` (`index` says which leg). A leg without a
   * live actor (removed, or its thread died) answers at once with zero counters.
   */
  async legStats(): Promise<LegStats[]> {
    return await Promise.all(this.legs.map(async (leg) => {
      const live = leg.state !== 'removed' && (leg.inline !== null || (leg.worker !== null && leg.worker.threadId >= 0));
      if (!live) {
        return { index: leg.index, requests: 0, bytesRead: 0, bytesWritten: 0, errors: 0, inFlight: 0, connected: false, latencySumMs: 0, latencyCount: 0 };
      }
      return { ...(await leg.api.stats()), index: leg.index };
    }));
  }

  stats(): MirrorStats {
    const requests: Record<string, number> = {};
    for (const [command, count] of this.counters.requests) requests[p.commandNames[command] ?? String(command)] = count;
    const bytes: Record<string, number> = {};
    for (const [command, count] of this.counters.bytes) bytes[p.commandNames[command] ?? String(command)] = count;
    return {
      requests,
      bytes,
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
    for (const leg of this.legs) {
      this.clearReconnect(leg);
      leg.resync?.nudge();
    }
    for (const wake of this.slotWaiters.splice(0)) wake();
    await Promise.all(this.legs.filter((leg) => leg.worker !== null || leg.inline !== null).map(async (leg) => await this.stopActor(leg)));
  }
}
