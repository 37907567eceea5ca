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
 *   WRITE: its slot returns to the ring at completion (writeBuffersReturnAtCompletion: the
 *   server never reads a WRITE's payload after submit); READ: server -> releaseBuffer(handle)
 *   after the reply left -> ring.free
 *   The lease handle acquireBuffer returns is the slot index: the server keeps it in its
 *   request record and passes it to submit/releaseBuffer, so the master keeps no
 *   token-to-slot table. A full ring: every waiter waits in SlotWaiters (slot-waiters.ts),
 *   which hands freed slots out in one order (payload-less client requests, the server's
 *   buffers, the engine's own runs).
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
 * - A slot is freed exactly once: by releaseBuffer (READ slots lent to the server) or at
 *   completion (lent WRITE slots, and internal slots: FLUSH, TRIM, ZERO, CACHE, shutdown
 *   flushes).
 */
import { Worker, MessageChannel } from 'node:worker_threads';
import * as Comlink from 'comlink';
import type { BlockDevice, BlockSizes, BufferLease, CompletionHandler, DeviceFeatures, Extent } from '../core/block-device.js';
import type { Logger } from '../core/log.js';
import { assert } from '../core/assert.js';
import { EnbdError } from '../core/errors.js';
import { portEndpoint } from '../core/comlink-endpoint.js';
import * as p from '../nbd/protocol.js';
import { commandNames, errnoNames } from '../nbd/protocol-names.js';
import { RequestRing } from '../ring/request-ring.js';
import { kMaxLegs, type RingOptions } from '../ring/layout.js';
import { Doorbell, SpscQueue } from '../ring/spsc-queue.js';
import { abandonLeg } from '../ring/visited-mask.js';
import { parseLegUri } from '../stubs/open-leg.js';
import { DirtyMap } from '../bitmap/dirty-map.js';
import { LatencyHistograms } from '../core/latency.js';
import { withTimeout } from '../core/timeout.js';
import { RangeLock } from './range-lock.js';
import { defaultWakePolicy, SpinWindow, type WakePolicy } from './wake-policy.js';
import { LegHealth, kDefaultHealthPolicy, type HealthPolicy, type LegState } from './leg-health.js';
import { Leg } from './leg.js';
import { SlotTable } from './slot-table.js';
import { SlotWaiters, type QueuedSubmit, type SlotGiver } from './slot-waiters.js';
import { ResyncCopier } from './resync-copy.js';
import { ChainInboxes } from '../ring/chain-inbox.js';
import { LegLifecycle, checkOf } from './leg-lifecycle.js';
import { Resync, type ResyncHost, type ResyncProgress, type ResyncRates } from './resync.js';
import { resyncWindow } from './resync-window.js';
import { LegActor } from './leg-actor.js';
import type { CopyMode, LegActorApi, LegActorInit, LegDeviceOpener, LegInfo, LegStats, Placement } from './messages.js';
import { MetaKeeper, type KeeperStatus } from './meta-keeper.js';
import { CheckpointSet, checkpointOperations, type CheckpointOperations } from './checkpoints.js';
import type { AssembledArray } from '../meta/assemble.js';
import { bitmapTest } from '../meta/leg-meta.js';
import { Verifier, intersectRanges, type VerifyHost, type VerifyOptions, type VerifyProgress, type VerifyStartOptions, type VerifyStatus } from './verify.js';
import { assignLegNames, legNameProblem, nextAutoLegName, resolveLegRef } from './leg-names.js';
import { ReadChooser, type ReadPolicyName } from './read-policy.js';
import { ReadRepair } from './read-repair.js';
import { WriteBehind, kShadowPhase, shadowRingOptions } from './write-behind.js';
import { bitmapSnapshotOf, legStatsWithin, ringCountersOf, slotsSnapshotOf, type BitmapSnapshot, type MirrorDebugHandles, type RingCounters, type SlotsSnapshot } from './snapshots.js';

export interface MirrorOptions {
  legs: string[];
  /** Each leg's name (src/engine/leg-names.ts); missing ones get automatic names a, b, ... */
  legNames?: ReadonlyArray<string | null>;
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
  /** Connections per NBD leg with multi-conn (default 1; a leg URI's connections=N wins). */
  legConnections?: number;
  /** Spin budgets of the actors and the master before they sleep; default defaultWakePolicy(). */
  wakePolicy?: WakePolicy;
  /** Bytes per dirty-map bit (power of two, default 4096). */
  bitmapChunkBytes?: number;
  /** Pool pages of each leg's dirty map (default 64 pages of 4 KiB = 8 GiB of device each). */
  bitmapPoolPages?: number;
  /** Reconnect backoff of a degraded leg: first delay and ceiling (ms, jittered +-20 %). */
  reconnectMinMs?: number;
  reconnectMaxMs?: number;
  /** Resync rate floor and ceiling in bytes/s (ceiling 0 = unlimited). */
  resyncRates?: Partial<ResyncRates>;
  /**
   * Resync copies in flight per leg (default 192; their slots never more than three quarters of the ring),
   * the largest copy (default 1 MiB), and the clean gap between dirty runs copied with them
   * (default 64 KiB), see resync-window.ts.
   */
  resyncLanes?: number;
  /**
   * Chained resync copies (default on): the READ leg's actor hands a copy straight to the target
   * leg's actor as a WRITE (src/ring/chain-inbox.ts); off: every phase goes through the master.
   */
  resyncChain?: boolean;
  resyncCopyBytes?: number;
  resyncGapBytes?: number;
  /**
   * Record writes since each leg's last flush (default true). Off only for the bench, to
   * measure what the record costs: a dropped leg's unflushed writes then go unmarked.
   */
  flushTracking?: boolean;
  /** A returning leg's probation probe (READ, WRITE back, FLUSH) must finish within this (ms). */
  probeTimeoutMs?: number;
  /** How long one fence attempt waits for a failed leg's old connection to close (ms). */
  fenceTimeoutMs?: number;
  /** Probe an idle leg every this many ms (0 = never). */
  idleProbeMs?: number;
  /** Failures within legFailureWindowMs that park a leg as faulty (0 = never). */
  legMaxFailures?: number;
  legFailureWindowMs?: number;
  /** Time in sync after which a leg's reconnect backoff starts over (ms). */
  legStableMs?: number;
  /**
   * Opens each leg's device instead of the URI's server stub (tests: fault-injecting legs).
   * Needs `placement: 'inline'` (a function cannot cross to a worker).
   */
  openDevice?: LegDeviceOpener;
  /**
   * The assembled array (src/meta/assemble.ts): the export is its data size, legs start in the
   * roles the plan gave them, and a MetaKeeper keeps the on-leg metadata current. Absent: no
   * on-leg metadata (`--metadata none`).
   */
  metadata?: AssembledArray;
  /** Metadata heartbeat and lazy bitmap clearing period (ms, default 5000). */
  heartbeatMs?: number;
  /** Online verify: hash pool, piece size, scheduled interval (src/engine/verify.ts). */
  verify?: VerifyOptions;
  /** Checksum resync: compare a piece on source and target first, copy only what differs. */
  resyncVerify?: boolean;
  /** Which up-to-date leg serves a read (src/engine/read-policy.ts; default least-pending). */
  readPolicy?: ReadPolicyName;
  /** Leg indexes that serve reads only when no other leg can (write-mostly). */
  writeMostly?: number[];
  /**
   * Rewrite a range a leg failed to read with EIO from another leg, the leg staying admitted
   * (default true; src/engine/read-repair.ts). Off: the leg fails, as before read repair.
   */
  readRepair?: boolean;
  /**
   * Write-behind bound per write-mostly leg, in bytes (0 or absent: off): a WRITE is acknowledged
   * once the other admitted legs hold it (src/engine/write-behind.ts).
   */
  writeBehindBytes?: number;
  /** Checkpoint (changed-block tracking) granularity in bytes; default 64 KiB. */
  checkpointGranularityBytes?: number;
  /**
   * The connection actor's worker entry (`placement: 'workers'`, needed then): the caller
   * knows where the build put it (src/cli/actor-entry.ts kConnectionActorEntry).
   */
  actorEntry?: URL;
}

export type { LegState } from './leg-health.js';

/** What the mirror tells its listeners (control plane, metrics). */
export type MirrorEvent =
  | { type: 'leg-state'; leg: number; name: string; uri: string; state: LegState; reason: string | null }
  | { type: 'leg-added'; leg: number; name: string; uri: string }
  | { type: 'leg-removed'; leg: number; name: string; uri: string };

export interface LegStatus {
  index: number;
  /** Its stable name (src/engine/leg-names.ts). */
  name: string;
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
  /** Failures within the faulty window (--leg-failure-window). */
  recentFailures: number;
  /** Bytes copied to this leg by resyncs since start. */
  resyncedBytes: number;
  /** Reconnect attempts since start (never reset). */
  reconnects?: number;
  /** Its member slot and leg UUID in the on-leg metadata (null or absent: --metadata none). */
  member?: { slotIndex: number; legUuid: string } | null;
  /** Client reads this leg served since start (src/engine/read-policy.ts). */
  reads?: number;
  /** Recent read completion time (EWMA, ms; null before its first read). */
  readLatencyMs?: number | null;
  /** Serves reads only when no other leg can. */
  writeMostly?: boolean;
  /** Read errors of this leg repaired by rewriting the range (started) since start. */
  readRepairs?: number;
  /** Write-behind: bytes acknowledged to clients that this leg does not hold yet. */
  behindBytes?: number;
  /** Write-behind: writes acknowledged before this leg had them, since start. */
  deferredWrites?: number;
  /** Write-behind: writes sent to this leg synchronously because the bound was reached. */
  boundHits?: number;
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
  /** Resync copy WRITEs since start: all of them, and those the READ leg's actor chained. */
  resyncWrites?: { total: number; chained: number };
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


/** A lent buffer: one reused object (the caller copies its fields out at once). */
class SlotLease implements BufferLease {
  handle = -1;
  view: Uint8Array = new Uint8Array(0);
}

function nextPowerOfTwo(value: number): number {
  let result = 2;
  while (result < value) result *= 2;
  return result;
}

/** Flags each command may carry to a leg (DF and the like are the server's business). */
const kLegFlags: readonly number[] = (() => {
  const flags: number[] = [];
  flags[p.kCmdRead] = 0;
  flags[p.kCmdWrite] = p.kCmdFlagFua;
  flags[p.kCmdFlush] = 0;
  flags[p.kCmdTrim] = p.kCmdFlagFua;
  flags[p.kCmdWriteZeroes] = p.kCmdFlagFua | p.kCmdFlagNoHole | p.kCmdFlagFastZero;
  flags[p.kCmdCache] = 0;
  return flags;
})();

function isDataChanging(command: number): boolean {
  return command === p.kCmdWrite || command === p.kCmdTrim || command === p.kCmdWriteZeroes;
}

export class MirrorDevice implements BlockDevice {
  sizeBytes = 0;
  features: DeviceFeatures;
  blockSizes: BlockSizes = { minimumBytes: 1, preferredBytes: 4096, maximumBytes: p.kDefaultPayloadBytesMax };
  readonly description: string;
  /** The ring's size and slot size: the NBD server shares buffers fairly between connections. */
  get bufferCapacityBytes(): number {
    return this.ring.slotCount * this.ring.slotBytes;
  }
  get bufferUnitBytes(): number {
    return this.ring.slotBytes;
  }
  onBufferAvailable: (() => void) | null = null;
  /** A WRITE's lent slot goes back to the ring when the WRITE completes (no releaseBuffer). */
  readonly writeBuffersReturnAtCompletion = true;
  private readonly lease = new SlotLease();
  private readonly ring: RequestRing;
  private readonly legs: Leg[] = [];
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
  /** Per-slot request table (src/engine/slot-table.ts). */
  readonly slots: SlotTable;
  /** Everything waiting for ring slots, and the order freed slots go out in. */
  private readonly waiters = new SlotWaiters();
  private readonly slotGiver: SlotGiver;
  private readonly internalWaiters = new Map<number, (errno: number) => void>();
  private nextInternalToken = kInternalTokenBase;
  private publishScheduled = false;
  private readonly publishBound = (): void => this.publishDispatches();
  private readonly onSlotCompleteBound = (slot: number): void => this.onSlotComplete(slot);
  private readonly pumpBound = (): void => this.pumpCompletions();
  /** Spin budgets (src/engine/wake-policy.ts). */
  private readonly wake: WakePolicy;
  /** The master's poll window over its completion queues (wake.masterSpinMicros). */
  private readonly spin: SpinWindow;
  /** Read policy, write-mostly legs, per-leg read counters and latency. */
  readonly reads: ReadChooser;
  /** Read-error repair: a leg's READ EIO rewrites the range on it (src/engine/read-repair.ts). */
  private readonly repair: ReadRepair;
  /** Write-behind of write-mostly legs (null: off). */
  private readonly behind: WriteBehind | null = null;
  private closed = false;
  /** Per-leg drop counters bumped by the actors (see LegActorInit.events). */
  private readonly events: Int32Array;
  /** Chained resync copies: every leg's inbox (src/ring/chain-inbox.ts); null with resyncChain off. */
  private readonly chain: ChainInboxes | null;
  /** Legs whose gone actor's inbox the master drains (adoptInbox). */
  private readonly adoptedInboxes = new WeakSet<Leg>();
  private readonly copier: ResyncCopier;
  private readonly lifecycle: LegLifecycle;
  private readonly options: MirrorOptions;
  private resyncRates: ResyncRates;
  private clientRequests = 0;
  /** performance.now() when the last request started (clientBusy). */
  private lastRequestAt = 0;
  private readonly resyncHost: ResyncHost;
  private flushTracking = true;
  private readonly healthPolicy: HealthPolicy;
  private readonly listeners = new Set<(event: MirrorEvent) => void>();
  private resyncPaused = false;
  /** Every name a leg held in this run: automatic names skip them (src/engine/leg-names.ts). */
  private readonly retiredLegNames = new Set<string>();
  /** Client request latency (arrival at the engine to completion), by kind (kLatencyKinds). */
  readonly latency = new LatencyHistograms(kLatencyKinds);
  private readonly counters = { requests: new Map<number, number>(), bytes: new Map<number, number>(), writeCopies: 0, writeBytesCopied: 0, writeRequests: 0 };
  inFlight = 0;
  /** The on-leg metadata keeper (null: --metadata none). */
  private keeper: MetaKeeper | null = null;
  /** Changed-block tracking (src/engine/checkpoints.ts); set once the geometry is known. */
  private checkpointSet: CheckpointSet | null = null;
  /** The keeper's reserved ring run (metadata I/O, one request at a time), -1 when none. */
  private metaSlot = -1;
  private metaDone: ((failed: number) => void) | null = null;
  private metaTarget: Uint8Array | null = null;
  /** Online verify and checksum resync (src/engine/verify.ts); slot phases 4 (I/O) and 5 (lock). */
  private readonly verifier: Verifier;

  private constructor(options: MirrorOptions) {
    this.logger = options.logger;
    this.copyMode = options.copyMode ?? 'shared';
    this.placement = options.placement ?? 'workers';
    this.ring = RequestRing.create({ ...options.ring, ...shadowRingOptions(options) });
    this.doorbell = Doorbell.create();
    this.wake = options.wakePolicy ?? defaultWakePolicy();
    this.spin = new SpinWindow(this.wake.masterSpinMicros);
    this.rangeLock = new RangeLock(this.ring.descriptorCount);
    this.granted = new Int32Array(this.ring.descriptorCount);
    this.slots = new SlotTable(this.ring.descriptorCount);
    this.chain = options.resyncChain === false ? null : ChainInboxes.create(this.ring.slotCount);
    this.events = new Int32Array(new SharedArrayBuffer(kMaxLegs * 4));
    this.options = options;
    this.reads = new ReadChooser(options.readPolicy ?? 'least-pending', options.writeMostly ?? []);
    this.healthPolicy = {
      maxFailures: options.legMaxFailures ?? kDefaultHealthPolicy.maxFailures,
      failureWindowMs: options.legFailureWindowMs ?? kDefaultHealthPolicy.failureWindowMs,
      stableMs: options.legStableMs ?? kDefaultHealthPolicy.stableMs,
    };
    this.resyncRates = {
      minBytesPerSecond: options.resyncRates?.minBytesPerSecond ?? 32 * 1024 * 1024,
      maxBytesPerSecond: options.resyncRates?.maxBytesPerSecond ?? 0,
    };
    this.slotGiver = {
      allocateOne: () => this.ring.allocate(1),
      freeCount: () => this.ring.freeCount,
      start: (slot, queued) => this.startQueued(slot, queued),
      notifyServer: () => this.onBufferAvailable?.(),
    };
    this.copier = new ResyncCopier({
      ring: this.ring,
      slots: this.slots,
      legs: this.legs,
      isClosed: () => this.closed,
      flushes: () => this.features.flush,
      slotsFreed: () => this.waiters.internalWait(),
      freeUnused: (slot) => {
        this.ring.free(slot);
        this.afterFree();
      },
      bindInternal: (slot, span) => {
        this.bindToken(slot, this.takeInternalToken(), true);
        this.slots.span[slot] = span;
        this.inFlight += 1;
      },
      lockAndDispatch: (slot, offsetBytes, lengthBytes) => {
        if (this.rangeLock.acquire(slot, offsetBytes, lengthBytes)) this.dispatch(slot);
      },
      dispatch: (slot) => this.dispatch(slot),
      releaseAndFinish: (slot) => {
        this.releaseRange(slot);
        this.finishSlot(slot, 0);
      },
      upToDateFor: (leg, offsetBytes, lengthBytes) => this.upToDateFor(leg, offsetBytes, lengthBytes),
      failLeg: (leg, reason) => this.lifecycle.failLeg(leg, reason),
      markUnlessSole: (leg, offsetBytes, lengthBytes) => this.markUnlessSole(leg, offsetBytes, lengthBytes),
      chains: () => this.chain !== null && this.copyMode !== 'per-leg',
      ...(options.resyncVerify === true ? {
        checksum: (leg: Leg, offsetBytes: number, lengthBytes: number) => this.verifier.compareForResync(leg.index, leg.epoch, offsetBytes, lengthBytes),
      } : {}),
    });
    this.verifier = new Verifier(this.verifyHost(), this.logger, options.verify ?? {});
    this.lifecycle = new LegLifecycle({
      legs: this.legs,
      isClosed: () => this.closed,
      sizeBytes: () => this.sizeBytes,
      emitState: (leg) => this.emitState(leg),
      startResync: (leg) => this.startResync(leg),
      flushLegs: () => this.flushLegs(),
      markUnlessSole: (leg, offsetBytes, lengthBytes) => this.markUnlessSole(leg, offsetBytes, lengthBytes),
      admit: async (leg) => this.keeper === null ? true : await this.keeper.admit(leg),
    }, options, this.healthPolicy, this.logger);
    this.repair = new ReadRepair({
      markUnlessSole: (leg, offsetBytes, lengthBytes) => this.markUnlessSole(leg, offsetBytes, lengthBytes),
      move: (leg, to, reason, fields) => this.lifecycle.move(leg, to, reason, fields),
      startResync: (leg) => this.startResync(leg),
    }, this.logger);
    if ((options.writeBehindBytes ?? 0) > 0 && this.reads.writeMostlyMask !== 0) {
      this.behind = new WriteBehind({
        ring: this.ring,
        slots: this.slots,
        legs: this.legs,
        bindInternal: (slot, span) => {
          this.bindToken(slot, this.takeInternalToken(), true);
          this.slots.span[slot] = span;
          this.inFlight += 1;
        },
        queueNext: (slot, offsetBytes, lengthBytes) => {
          this.lockChunks(slot, offsetBytes, lengthBytes, true);
        },
        dispatch: (slot) => this.dispatch(slot),
        releaseAndFinish: (slot) => {
          this.releaseRange(slot);
          this.finishSlot(slot, 0);
        },
        failLeg: (leg, reason) => this.lifecycle.failLeg(leg, reason),
        move: (leg, to, reason, fields) => this.lifecycle.move(leg, to, reason, fields),
        startResync: (leg) => this.startResync(leg),
        recordUnflushed: (slot, mask) => {
          if (this.flushTracking) this.recordUnflushed(slot, mask);
        },
        chunkBytes: () => this.chunkBytes,
        sizeBytes: () => this.sizeBytes,
        anyClean: (offsetBytes, lengthBytes) => this.firstCleanLeg(this.allLegsMask, offsetBytes, lengthBytes) !== null,
      }, options.writeBehindBytes ?? 0, this.reads.writeMostlyMask, this.logger);
    }
    this.resyncHost = {
      copyRange: (legIndex, offsetBytes, lengthBytes) => this.copier.copyRange(this.legs[legIndex] as Leg, offsetBytes, lengthBytes),
      stillResyncing: (legIndex) => !this.closed && this.legs[legIndex]?.state === 'resyncing',
      clientBusy: (windowMs) => this.clientBusy(windowMs),
      resyncDone: (legIndex) => this.lifecycle.onResyncDone(this.legs[legIndex] as Leg),
      footprintBytes: (lengthBytes) => this.ring.slotsFor(lengthBytes) * this.ring.slotBytes,
    };
    this.description = `mirror of ${options.legs.length} legs`;
    this.features = {
      readOnly: false, flush: true, fua: true, trim: true, writeZeroes: true, fastZero: true,
      cache: true, multiConn: true, rotational: false, blockStatus: true,
    };
  }

  /** What the verifier may do with the ring, the range lock and the legs (verify.ts). */
  private verifyHost(): VerifyHost {
    const legAt = (index: number): Leg => this.legs[index] as Leg;
    return {
      sizeBytes: () => this.sizeBytes,
      isClosed: () => this.closed,
      legs: () => this.legs,
      slotsFor: (lengthBytes) => this.ring.slotsFor(lengthBytes),
      slotsMax: () => this.ring.slotCount - (this.metaSlot >= 0 ? (this.slots.span[this.metaSlot] ?? 1) : 0),
      allocate: (span) => this.ring.allocate(span),
      slotsFreed: () => this.waiters.internalWait(),
      bindInternal: (slot, span) => {
        this.bindToken(slot, this.takeInternalToken(), true);
        this.slots.span[slot] = span;
        this.inFlight += 1;
      },
      dataView: (slot, lengthBytes) => this.ring.dataView(slot, lengthBytes),
      lock: (slot, offsetBytes, lengthBytes) => {
        this.slots.phase[slot] = 5;
        return this.rangeLock.acquire(slot, offsetBytes, lengthBytes);
      },
      read: (slot, legIndex, offsetBytes, lengthBytes) => {
        this.slots.phase[slot] = 4;
        this.ring.setRequest(slot, p.kCmdRead, 0, offsetBytes, lengthBytes, this.slots.span[slot] ?? 1, legAt(legIndex).bit);
        this.ring.setReadLeg(slot, legIndex);
        this.dispatch(slot);
      },
      write: (slot, mask) => {
        // A repair changes what a read of the range may answer (the leg was readable there):
        // every active checkpoint counts it as changed, before the leg gets the bytes.
        this.checkpointSet?.mark(this.ring.offsetBytes(slot), this.ring.lengthBytes(slot));
        this.ring.rephase(slot, p.kCmdWrite, this.features.fua ? p.kCmdFlagFua : 0, mask);
        // Not durable until the next FLUSH (without FUA): recorded unflushed on the legs it
        // rewrites before they get it (v9), so a leg that drops and loses it resyncs the unit.
        if (this.flushTracking) this.recordUnflushed(slot, mask);
        // Write intent, as for a client write (v8): the unit's bits are durable on the legs
        // before the leg gets the bytes, so a crash mid-repair resyncs the unit, and after that
        // unclean stop the checkpoints mark it from the bitmap (their in-memory mark is lost).
        // The keeper resumes the slot through dispatch (phase 4 goes straight to the legs).
        if (this.parkedForIntent(slot)) return;
        this.dispatch(slot);
      },
      finish: (slot, locked) => {
        this.slots.phase[slot] = 0;
        if (locked) this.releaseRange(slot);
        this.finishSlot(slot, 0);
      },
      upToDateFor: (index, offsetBytes, lengthBytes) => this.upToDateFor(legAt(index), offsetBytes, lengthBytes),
      failLeg: (index, reason) => this.lifecycle.failLeg(legAt(index), reason),
      markUnlessSole: (index, offsetBytes, lengthBytes) => this.markUnlessSole(legAt(index), offsetBytes, lengthBytes),
      extents: (index, offsetBytes, lengthBytes) => legAt(index).api.getExtents(offsetBytes, lengthBytes),
      generation: (index) => {
        const member = this.keeper?.legMeta(index) ?? null;
        return member === null ? null : this.keeper?.status().members[member.slotIndex]?.events ?? null;
      },
      clearMatched: (index, epoch, offsetBytes, lengthBytes) => this.copier.clearMatched(legAt(index), epoch, offsetBytes, lengthBytes),
      errnoName: (index, slot) => errnoNames[this.ring.legErrno(slot, index)] ?? String(this.ring.legErrno(slot, index)),
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
    if (options.placement !== 'inline' && options.actorEntry === undefined) {
      throw new EnbdError('ENBD_ERR_CONFIG', 'placement "workers" needs actorEntry (the connection actor\'s worker entry)');
    }
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
    const capacity = nextPowerOfTwo(this.ring.descriptorCount);
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
      idleProbeMs: this.options.idleProbeMs ?? 5000,
      connections: this.options.legConnections ?? 1,
      ...(this.chain !== null ? { chain: this.chain.buffer } : {}),
      spinMicros: this.wake.actorSpinMicros,
    };
    const leg = this.startLeg(init, dispatch, completion);
    leg.health = new LegHealth(leg, this.logger, this.healthPolicy);
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
    const names = assignLegNames(options.legs.map((_, index) => options.legNames?.[index] ?? null));
    for (const [index, uri] of options.legs.entries()) {
      const leg = this.createLeg(index, uri);
      leg.name = names[index] ?? String(index);
      this.retiredLegNames.add(leg.name);
      this.legs.push(leg);
    }
    const infos = await Promise.all(this.legs.map((leg) => leg.api.open()));
    const problems: string[] = [];
    for (const [index, info] of infos.entries()) {
      const leg = this.legs[index] as Leg;
      if ('error' in info) problems.push(`leg ${index} (${leg.uri}): ${info.error.message}`);
      else leg.info = info;
    }
    if (problems.length > 0) throw new EnbdError('ENBD_ERR_LEG', `cannot open leg(s): ${problems.join('; ')}`);
    this.settleGeometry(options.metadata?.plan.layout.dataSizeBytes ?? options.sizeBytes);
    this.flushTracking = this.features.flush && options.flushTracking !== false;
    for (const leg of this.legs) this.createMaps(leg);
    this.checkpointSet = new CheckpointSet(this.sizeBytes, options.checkpointGranularityBytes);
    this.pumpCompletions();
    if (options.metadata !== undefined) await this.startKeeper(options.metadata);
  }

  /**
   * On-leg metadata: legs take the roles assembly gave them (a bitmap resync marks the chunks
   * the union bitmap holds; a full resync marks everything), a ring run is reserved for
   * metadata I/O, and the keeper starts (src/engine/meta-keeper.ts).
   */
  private async startKeeper(assembled: AssembledArray): Promise<void> {
    const { layout, bitmap } = assembled.plan;
    for (const [index, planned] of assembled.legs.entries()) {
      const leg = this.legs[index] as Leg;
      const dirty = leg.dirty as DirtyMap;
      if (planned.role === 'full-resync') dirty.markAll();
      else if (planned.role === 'bitmap-resync') {
        for (let chunk = 0; chunk < layout.chunkCount; chunk += 1) {
          if (bitmapTest(bitmap, chunk)) dirty.markRange(chunk * layout.bitmapChunkBytes, layout.bitmapChunkBytes);
        }
      }
      if (dirty.dirtyChunkCount() > 0) leg.state = 'resyncing';
      this.logger.info({ leg: index, uri: leg.uri, slot: planned.slotIndex, role: planned.role, why: planned.why, dirtyBytes: dirty.dirtyBytes() }, 'leg assembled');
    }
    for (const note of assembled.plan.notes) this.logger.warn({ note }, 'assembly');
    const span = this.ring.slotsFor(2 * 4096);
    this.metaSlot = this.ring.allocate(span);
    assert(this.metaSlot >= 0, 'the ring has room for the metadata run at start');
    this.slots.phase[this.metaSlot] = 3;
    this.slots.span[this.metaSlot] = span;
    this.keeper = new MetaKeeper({
      legs: this.legs,
      metaIo: (command, offsetBytes, bytes, mask) => this.metaIo(command, offsetBytes, bytes, mask),
      fua: () => this.features.fua,
      flushes: () => this.features.flush,
      failLeg: (leg, reason) => this.lifecycle.failLeg(leg, reason),
      resume: (slot) => this.dispatch(slot),
      release: (slot, errno) => this.finishSlot(slot, errno),
      forEachWriteInFlight: (visit) => this.forEachWriteInFlight(visit),
      contentsUnknown: (leg) => this.contentsUnknown(leg),
      isClosed: () => this.closed,
    }, assembled, { logger: this.logger, checkpoints: this.checkpoints, ...(this.options.heartbeatMs !== undefined ? { heartbeatMs: this.options.heartbeatMs } : {}) });
    const full = assembled.legs.flatMap((planned, index) => (planned.role === 'full-resync' ? [this.legs[index] as Leg] : []));
    if (full.length > 0) await this.skipZeroRanges(full);
    for (const leg of this.legs) {
      if (leg.state === 'resyncing' && leg.dirty?.dirtyChunkCount() === 0) leg.state = 'in-sync';
      this.keeper.onLegState(leg);
      if (leg.state === 'resyncing') this.startResync(leg);
    }
  }

  /**
   * Before a full resync (a new array without --assume-clean, a new member): ranges every leg
   * reports as reading zero (base:allocation) are the same everywhere, so the targets' bits there
   * are cleared and only the rest is copied. Runs before any client connects; gives up (copies
   * everything) when a leg cannot say, or after 10 s.
   */
  private async skipZeroRanges(targets: Leg[]): Promise<void> {
    if (!this.features.blockStatus) return;
    const deadline = Date.now() + 10_000;
    const kZero = 2;
    const zeroRuns = async (leg: Leg): Promise<Array<[number, number]>> => {
      const runs: Array<[number, number]> = [];
      let at = 0;
      while (at < this.sizeBytes && Date.now() < deadline) {
        const extents = await leg.api.getExtents(at, Math.min(this.sizeBytes - at, 2 ** 30));
        if (extents.length === 0) break;
        for (const extent of extents) {
          const length = Math.min(extent.lengthBytes, this.sizeBytes - at);
          if (length <= 0) break;
          if ((extent.flags & kZero) !== 0) runs.push([at, at + length]);
          at += length;
        }
      }
      return at >= this.sizeBytes ? runs : [];
    };
    let common: Array<[number, number]> | null = null;
    try {
      for (const leg of this.legs) {
        const runs = await zeroRuns(leg);
        common = common === null ? runs : intersectRanges(common, runs);
        if (common.length === 0) return;
      }
    } catch (error) {
      this.logger.info({ err: error }, 'block status unavailable: the full resync copies every chunk');
      return;
    }
    let skipped = 0;
    for (const [start, end] of common ?? []) {
      const chunk = this.chunkBytes;
      const from = Math.ceil(start / chunk) * chunk;
      const to = end >= this.sizeBytes ? this.sizeBytes : Math.floor(end / chunk) * chunk;
      if (to <= from) continue;
      for (const leg of targets) leg.dirty?.clearRange(from, to - from);
      skipped += to - from;
    }
    this.logger.info({ skippedBytes: skipped, sizeBytes: this.sizeBytes }, 'full resync skips the ranges every leg reads as zero');
  }

  /** One metadata request in the reserved run (the keeper sends one at a time): the failed mask. */
  private metaIo(command: number, offsetBytes: number, bytes: Uint8Array, mask: number): Promise<number> {
    const slot = this.metaSlot;
    let target = 0;
    for (const leg of this.legs) if ((mask & leg.bit) !== 0 && (leg.worker !== null || leg.inline !== null)) target |= leg.bit;
    if (this.closed || target === 0 || slot < 0) return Promise.resolve(mask);
    assert(this.metaDone === null, 'one metadata request at a time');
    assert(bytes.length <= this.ring.slotBytes * (this.slots.span[slot] ?? 1), 'metadata I/O fits the reserved run');
    if (command === p.kCmdRead) target &= -target; // one leg reads
    const flags = command === p.kCmdWrite && this.features.fua ? p.kCmdFlagFua : 0;
    this.ring.redescribe(slot, command, flags, offsetBytes, bytes.length, target);
    if (command === p.kCmdWrite) this.ring.dataView(slot, bytes.length).set(bytes);
    if (command === p.kCmdRead) this.ring.setReadLeg(slot, 31 - Math.clz32(target));
    this.metaTarget = command === p.kCmdRead ? bytes : null;
    const done = new Promise<number>((resolve) => {
      this.metaDone = (failed) => resolve(failed | (mask & ~target));
    });
    this.dispatch(slot);
    return done;
  }

  private onMetaComplete(slot: number, failed: number): void {
    const target = this.metaTarget;
    this.metaTarget = null;
    if (target !== null && failed === 0) target.set(this.ring.dataView(slot, target.length));
    const done = this.metaDone;
    this.metaDone = null;
    done?.(failed);
  }

  /**
   * A returning leg is not the one that left (blank, replaced): every chunk of it is marked. A
   * chunk the other legs all have marked too (each was thought to be held by this leg, e.g. an
   * unflushed write spilled when it left) would then have no source at all: there the first other
   * leg's copy, the best one left, becomes the reference (its bit is cleared), as for a failed write.
   */
  private contentsUnknown(leg: Leg): void {
    const others = this.legs.filter((other) => other !== leg && other.state !== 'removed' && other.dirty !== null);
    if (others.length === 0) {
      this.logger.error({ leg: leg.index }, 'the only leg came back without its data; nothing to copy from, serving what it holds');
      return;
    }
    const first = others[0] as Leg;
    const map = first.dirty as DirtyMap;
    let orphans = 0;
    map.forEachDirtyRun((firstChunk, chunkCount) => {
      for (let at = firstChunk; at < firstChunk + chunkCount; at += 1) {
        if (!others.every((other) => other.dirty?.isChunkDirty(at) === true)) continue;
        map.clearChunks(at, 1);
        orphans += 1;
      }
    });
    if (orphans > 0) this.logger.warn({ leg: leg.index, reference: first.index, chunks: orphans }, 'chunks no leg held: the reference leg\'s copy counts there');
    leg.dirty?.markAll();
  }

  /** Every data-changing client request dispatched and not yet released (lazy clearing). */
  private forEachWriteInFlight(visit: (offsetBytes: number, lengthBytes: number) => void): void {
    const ring = this.ring;
    for (let slot = 0; slot < ring.slotCount; slot += 1) {
      if (ring.state(slot) !== 2 || this.slots.phase[slot] !== 0 || (this.slots.token[slot] ?? -1) < 0) continue;
      if (isDataChanging(ring.command(slot))) visit(ring.offsetBytes(slot), ring.lengthBytes(slot));
    }
  }

  /** The checkpoints (changed-block tracking); available once the mirror is open. */
  get checkpoints(): CheckpointSet {
    assert(this.checkpointSet !== null, 'checkpoints exist once the mirror is open');
    return this.checkpointSet;
  }

  /** The operator's checkpoint actions (src/engine/checkpoints.ts), durable through the keeper. */
  checkpointOperations(): CheckpointOperations {
    const keeper = this.keeper;
    return checkpointOperations(this.checkpoints, (visit) => this.forEachWriteInFlight(visit), keeper === null ? null : async () => await keeper.persistCheckpoints());
  }

  /** The on-leg metadata, or null with --metadata none. */
  metadataStatus(): KeeperStatus | null {
    return this.keeper?.status() ?? null;
  }

  /** Online verify (src/engine/verify.ts): the running or last verify, totals. */
  verifyStatus(): VerifyStatus {
    return this.verifier.status();
  }

  /** Starts a verify of a range (default: the device); refused while one runs. */
  startVerify(options: VerifyStartOptions = {}): VerifyProgress {
    return this.verifier.start(options);
  }

  /** Stops the running verify (units in flight finish); resolves once it stopped. */
  async stopVerify(): Promise<{ stopped: boolean; verify: VerifyProgress | null }> {
    const stopped = this.verifier.running;
    return { stopped, verify: await this.verifier.stop() };
  }

  /** Resolves when the running verify (if any) ended (bench, tests). */
  async verifyDone(): Promise<void> {
    await this.verifier.done();
  }

  /** The scheduled verify period (ms, 0 = off), e.g. after a SIGHUP reload. */
  setVerifyInterval(intervalMs: number): void {
    this.verifier.setInterval(intervalMs);
  }

  private startLeg(init: LegActorInit, dispatch: SpscQueue, completion: SpscQueue): Leg {
    if (this.placement === 'inline') {
      const actor = new LegActor(init, this.logger.child({ leg: init.legIndex }), this.options.openDevice ?? null);
      const leg = new Leg(init.legIndex, init.uri, dispatch, completion, actor);
      leg.inline = actor;
      return leg;
    }
    const channel = new MessageChannel();
    const entry = this.options.actorEntry;
    assert(entry !== undefined, 'open() refuses placement workers without actorEntry');
    const worker = new Worker(entry, {
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
      // At most an eighth of the ring per request, so a few clients stalled mid-payload cannot
      // hold every slot (see the server's payload timeout and fair share).
      maximumBytes: Math.min(this.ring.maxRequestBytes, Math.max(this.ring.slotBytes, Math.floor(this.ring.slotCount / 8) * this.ring.slotBytes), ...infos.map((info) => info.blockSizes.maximumBytes)),
    };
    this.logger.info({ sizeBytes: this.sizeBytes, legs: infos.map((info) => info.uri), features: this.features }, 'mirror assembled');
  }

  setCompletionHandler(handler: CompletionHandler): void {
    this.handler = handler;
  }

  // ---- submission -------------------------------------------------------------------------

  acquireBuffer(_command: number, lengthBytes: number, token: number): BufferLease | null {
    const span = this.ring.slotsFor(lengthBytes);
    const slot = this.ring.allocate(span);
    if (slot < 0) {
      this.waiters.serverRefused();
      return null;
    }
    assert(token < kInternalTokenBase, 'server tokens are below the internal range');
    this.bindToken(slot, token, false);
    this.slots.span[slot] = span;
    const lease = this.lease;
    lease.handle = slot;
    lease.view = this.ring.dataView(slot, lengthBytes);
    return lease;
  }

  /** `handle`: the slot acquireBuffer lent (a READ's, or a WRITE's that was never submitted). */
  releaseBuffer(handle: number): void {
    assert(handle >= 0 && handle < this.ring.slotCount && (this.slots.token[handle] ?? -1) >= 0 && this.slots.internal[handle] === 0, 'release a lent buffer');
    this.slots.token[handle] = -1;
    this.ring.free(handle);
    this.afterFree();
  }

  /** The next token of the engine's own requests (above every server token; wraps). */
  private takeInternalToken(): number {
    const token = this.nextInternalToken;
    this.nextInternalToken = token >= 0x7fff_0000 ? kInternalTokenBase : token + 1;
    return token;
  }

  /** `internal` true: the engine frees the slot at completion (its own runs, payload-less client requests, lent WRITEs once submitted). */
  private bindToken(slot: number, token: number, internal: boolean): void {
    this.slots.token[slot] = token;
    this.slots.internal[slot] = internal ? 1 : 0;
  }

  private afterFree(): void {
    this.waiters.onFreed(this.slotGiver);
  }

  private startQueued(slot: number, queued: QueuedSubmit): void {
    this.bindToken(slot, queued.token, true);
    this.slots.span[slot] = 1;
    this.start(slot, queued.command, queued.flags, queued.offsetBytes, queued.lengthBytes);
  }

  submit(command: number, flags: number, offsetBytes: number, lengthBytes: number, data: Uint8Array | null, token: number, handle = -1): void {
    this.inFlight += 1;
    this.clientRequests += 1;
    this.counters.requests.set(command, (this.counters.requests.get(command) ?? 0) + 1);
    if (lengthBytes > 0) this.counters.bytes.set(command, (this.counters.bytes.get(command) ?? 0) + lengthBytes);
    let slot = handle;
    if (slot >= 0) {
      assert(data !== null && slot < this.ring.slotCount && this.slots.token[slot] === token && this.slots.internal[slot] === 0, 'READ/WRITE data lives in the ring slot lent for this token');
      // A WRITE's slot comes back at completion (writeBuffersReturnAtCompletion).
      if (command === p.kCmdWrite) this.slots.internal[slot] = 1;
    } else {
      // Requests without a payload buffer (FLUSH, TRIM, ZERO, CACHE, zero-length WRITE).
      slot = this.ring.allocate(1);
      if (slot < 0) {
        this.waiters.queueSubmit(command, flags, offsetBytes, lengthBytes, token);
        return;
      }
      this.bindToken(slot, token, true);
      this.slots.span[slot] = 1;
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
    const now = performance.now();
    this.slots.started[slot] = now;
    this.lastRequestAt = now;
    this.slots.kind[slot] = latencyKind(command);
    const early = this.answerWithoutLegs(command, offsetBytes, lengthBytes);
    if (early >= 0) {
      this.ring.setRequest(slot, command, 0, offsetBytes, lengthBytes, this.slots.span[slot] ?? 1, 1);
      setImmediate(() => this.finishSlot(slot, early));
      return;
    }
    if (command === p.kCmdFlush) {
      // FLUSH applies to the whole device: whatever offset/length the client sent, the legs
      // get 0/0 (a strict leg refuses anything else).
      offsetBytes = 0;
      lengthBytes = 0;
    }
    if (command === p.kCmdTrim && this.features.writeZeroes) {
      // Legs differ in what a trimmed range reads back as (a file leg keeps the data, nbdkit
      // memory zeroes it). Zeroing without NO_HOLE still lets a leg punch holes, and keeps every
      // leg byte-identical, so reads stay the same whichever leg serves them.
      command = p.kCmdWriteZeroes;
    }
    flags &= kLegFlags[command] ?? 0;
    const target = this.targetFor(command, offsetBytes, lengthBytes);
    if (target === 0) {
      this.ring.setRequest(slot, command, flags, offsetBytes, lengthBytes, this.slots.span[slot] ?? 1, 1);
      setImmediate(() => this.finishSlot(slot, p.kEIo));
      return;
    }
    this.ring.setRequest(slot, command, flags, offsetBytes, lengthBytes, this.slots.span[slot] ?? 1, target);
    this.slots.tried[slot] = target;
    if (command === p.kCmdRead || command === p.kCmdCache) this.ring.setReadLeg(slot, 31 - Math.clz32(target));
    if (command === p.kCmdFlush) this.beginFlush(slot, target);
    // Data-changing requests: the target set is settled again at dispatch, under the range lock
    // (see settleWriteTarget).
    if (isDataChanging(command) && !this.lockChunks(slot, offsetBytes, lengthBytes)) return;
    this.dispatch(slot);
  }

  /**
   * The range lock of a data-changing request covers the whole dirty-map chunks it touches:
   * two writes to different bytes of one chunk are ordered, so the up-to-date set one settled
   * at dispatch cannot be voided by the other's marks before it completes (the model test
   * found two such writes leaving a chunk dirty on every leg).
   */
  private lockChunks(slot: number, offsetBytes: number, lengthBytes: number, next = false): boolean {
    const chunk = this.chunkBytes;
    const start = Math.floor(offsetBytes / chunk) * chunk;
    const end = Math.min(this.sizeBytes, Math.ceil((offsetBytes + lengthBytes) / chunk) * chunk);
    if (next) {
      this.rangeLock.acquireNext(slot, start, Math.max(end - start, lengthBytes));
      return false;
    }
    return this.rangeLock.acquire(slot, start, Math.max(end - start, lengthBytes));
  }

  /** Bytes per dirty-map bit (every leg's map has the same, see createMaps). */
  private get chunkBytes(): number {
    return this.options.bitmapChunkBytes ?? 4096;
  }

  /**
   * What the engine answers by itself, never asking a leg (legs disagree on these, and one
   * refusing would look like a failing leg): -1 = send it to the legs, else the errno.
   * Zero-length requests succeed at once; ranges not aligned to the strictest leg's minimum
   * block are EINVAL (no leg is sent what one of them would refuse).
   */
  private answerWithoutLegs(command: number, offsetBytes: number, lengthBytes: number): number {
    if (command === p.kCmdFlush) return -1;
    if (lengthBytes === 0) return 0;
    const minimum = this.blockSizes.minimumBytes;
    if (minimum > 1 && (offsetBytes % minimum !== 0 || lengthBytes % minimum !== 0)) return p.kEInval;
    return -1;
  }

  /** A request started within the last `windowMs` (the resync's rate floor and busy window). */
  private clientBusy(windowMs: number): boolean {
    return this.clientRequests > 0 && performance.now() - this.lastRequestAt < windowMs;
  }

  /**
   * Under the range lock, just before a data-changing request leaves: it goes to every
   * admitted leg (in sync or resyncing), and every other leg has the range marked in its dirty
   * map now, before any leg can answer (so before the client can hear success). The legs clean
   * for the whole range are recorded (`upToDate`): the request can succeed only if one of them
   * holds it. With none, nothing up to date would hold it: EIO now. Settling here and not at
   * arrival keeps marks and resync clears of one range strictly ordered by the lock.
   */
  private settleWriteTarget(slot: number): boolean {
    const ring = this.ring;
    const offsetBytes = ring.offsetBytes(slot);
    const lengthBytes = ring.lengthBytes(slot);
    let target = 0;
    let upToDate = 0;
    let inSync = 0;
    for (const leg of this.legs) {
      if (!leg.admitted) continue;
      target |= leg.bit;
      if (leg.state === 'in-sync') inSync |= leg.bit;
      if (this.upToDateFor(leg, offsetBytes, lengthBytes)) upToDate |= leg.bit;
    }
    if (upToDate === 0) {
      this.releaseRange(slot);
      this.finishSlot(slot, p.kEIo);
      return false;
    }
    if (this.behind !== null) {
      // Write-mostly legs behind: taken out of the target, marked below like legs that missed it.
      target &= ~this.behind.defer(slot, target, upToDate);
      upToDate &= target;
      inSync &= target;
    }
    this.slots.upToDate[slot] = upToDate;
    this.slots.seq[slot] = this.lifecycle.failSeq;
    this.slots.inSync[slot] = inSync;
    if (target !== ring.targetMask(slot)) ring.resetMasks(slot, target);
    if (target !== this.allLegsMask) {
      for (const leg of this.legs) {
        if ((target & leg.bit) === 0 && leg.state !== 'removed') leg.dirty?.markRange(offsetBytes, lengthBytes);
      }
    }
    return true;
  }

  /** FLUSH sent to a leg swaps its unflushed halves (unless a flush is already pending there). */
  private beginFlush(slot: number, target: number): void {
    let inSync = 0;
    for (const leg of this.legs) {
      if ((target & leg.bit) === 0) continue;
      // A leg with writes behind does not hold every acknowledged write.
      if (leg.state === 'in-sync' && (this.behind?.behindBytes[leg.index] ?? 0) === 0) inSync |= leg.bit;
      if (leg.flushSlot !== -1) {
        leg.flushSkipped = true;
        continue;
      }
      leg.flushSlot = slot;
      leg.unflushedCurrent ^= 1;
    }
    this.slots.inSync[slot] = inSync;
    this.slots.seq[slot] = this.lifecycle.failSeq;
  }

  /** FLUSH answered: a leg that flushed forgets the writes the flush covered. */
  private settleFlush(slot: number, target: number, failed: number): void {
    let again = false;
    for (const leg of this.legs) {
      if ((target & leg.bit) === 0 || leg.flushSlot !== slot) continue;
      leg.flushSlot = -1;
      if ((failed & leg.bit) === 0) leg.flushingUnflushed?.clearAll();
      // A failed flush fails the leg (failLegsOf), which spills its unflushed record.
      // A FLUSH skipped meanwhile left its writes in the current half: one more FLUSH takes them.
      if (leg.flushSkipped) {
        leg.flushSkipped = false;
        if ((failed & leg.bit) === 0 && (leg.currentUnflushed?.dirtyChunkCount() ?? 0) > 0) again = true;
      }
    }
    if (again) queueMicrotask(() => this.flushLegs());
  }

  /** An engine FLUSH of every admitted leg (a resync's copies, writes a skipped FLUSH covered). */
  private flushLegs(): void {
    if (this.features.flush && !this.closed) void this.runInternal(p.kCmdFlush, 0, 0, 0);
  }

  private get allLegsMask(): number {
    return (1 << this.legs.length) - 1;
  }

  /**
   * Legs a new request goes to: one up-to-date leg for READ/CACHE; every admitted leg
   * otherwise (data-changing requests are settled again at dispatch). 0 = none: EIO.
   */
  private targetFor(command: number, offsetBytes: number, lengthBytes: number): number {
    if (command === p.kCmdRead || command === p.kCmdCache) {
      const leg = this.pickReadLeg(0, offsetBytes, lengthBytes);
      return leg === null ? 0 : leg.bit;
    }
    let mask = 0;
    for (const leg of this.legs) if (leg.admitted) mask |= leg.bit;
    return mask;
  }

  /** True when the leg is admitted and clean in its dirty map for the whole range. */
  private upToDateFor(leg: Leg, offsetBytes: number, lengthBytes: number): boolean {
    if (leg.state === 'in-sync') {
      // A write-mostly leg with write-behind may be behind (its map marks what it lags on).
      return this.behind === null || !this.behind.appliesTo(leg) || leg.dirty === null || !leg.dirty.testRange(offsetBytes, lengthBytes);
    }
    return leg.state === 'resyncing' && leg.dirty !== null && !leg.dirty.testRange(offsetBytes, lengthBytes);
  }

  /**
   * The leg with the fewest requests in flight, not in `excludeMask`, that is up to date for
   * the range: in sync, or resyncing with the range clean in its dirty map.
   */
  private pickReadLeg(excludeMask: number, offsetBytes: number, lengthBytes: number): Leg | null {
    return this.reads.pick(this.legs, (leg) => (leg.bit & excludeMask) === 0 && this.upToDateFor(leg, offsetBytes, lengthBytes));
  }

  /**
   * Write intent: true when the slot's chunks are not all durably marked yet and the keeper took
   * the slot (it resumes it through dispatch once they are). False: go on (no keeper, or covered).
   */
  private parkedForIntent(slot: number): boolean {
    const keeper = this.keeper;
    if (keeper === null || keeper.covers(this.ring.offsetBytes(slot), this.ring.lengthBytes(slot))) return false;
    keeper.park(slot, this.ring.offsetBytes(slot), this.ring.lengthBytes(slot));
    return true;
  }

  private dispatch(slot: number): void {
    const ring = this.ring;
    if (ring.state(slot) !== 2) {
      const phase = this.slots.phase[slot];
      if (phase === 5) {
        this.verifier.onGranted(slot); // a verify's range lock: its reads follow
        return;
      }
      if (phase === 1) {
        if (!this.copier.prepareRead(slot)) return;
      } else if (phase === kShadowPhase) {
        if (this.behind !== null && !this.behind.prepare(slot)) return;
      } else if (phase === 0 && isDataChanging(ring.command(slot))) {
        // Checkpoints are marked before any leg gets the data (so before the ack).
        this.checkpointSet?.mark(ring.offsetBytes(slot), ring.lengthBytes(slot));
        // A verify's zero-skip answer for the range's window is out of date from now on.
        this.verifier.noteWrite(ring.offsetBytes(slot), ring.lengthBytes(slot));
        // Write intent: the chunks' bits are durable on the legs before any leg gets the data.
        if (this.parkedForIntent(slot)) return;
        if (!this.settleWriteTarget(slot)) return;
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

  /**
   * Drains every completion queue; after a drain that found work it checks again on the next
   * turn when the master has a spin budget; once they run empty it polls them once per turn
   * for up to that budget (SpinWindow), then sleeps on the doorbell until an actor rings it.
   */
  private pumpCompletions(): void {
    if (this.closed) return;
    const snapshot = this.doorbell.snapshot();
    let drained = 0;
    for (const leg of this.legs) drained += leg.completion.drain(this.onSlotCompleteBound, this.ring.descriptorCount);
    for (const leg of this.legs) {
      const drops = Atomics.load(this.events, leg.index);
      if (drops !== leg.dropsSeen) {
        leg.dropsSeen = drops;
        this.lifecycle.onLegDropped(leg);
      }
    }
    const spin = this.spin;
    if (drained > 0) {
      if (spin.worked()) this.doorbell.noteSpinHit();
      if (spin.budgetMs > 0) {
        setImmediate(this.pumpBound);
        return;
      }
    } else if (spin.pollAgain()) {
      setImmediate(this.pumpBound);
      return;
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
    const phase = this.slots.phase[slot] ?? 0;
    if (phase === 3) {
      this.onMetaComplete(slot, failed);
      return;
    }
    if (phase === 4) {
      this.verifier.onComplete(slot, failed);
      return;
    }
    if (phase === kShadowPhase) {
      this.behind?.onShadowDone(slot, failed);
      return;
    }
    if (phase !== 0) {
      this.copier.onPhaseComplete(slot, phase, failed);
      return;
    }
    const command = ring.command(slot);
    if (failed !== 0 && (command === p.kCmdRead || command === p.kCmdCache)) {
      this.retryRead(slot, failed);
      return;
    }
    if (command === p.kCmdRead) {
      const readLeg = ring.readLeg(slot);
      this.reads.onReadDone(readLeg, performance.now() - (this.slots.started[slot] ?? 0), performance.now(), this.legs[readLeg]?.inFlight ?? 0);
    }
    if (command === p.kCmdFlush) this.settleFlush(slot, target, failed);
    let errno = 0;
    let lost = failed;
    if (isDataChanging(command) && (ring.flags(slot) & p.kCmdFlagFua) === 0 && this.lifecycle.failSeq !== this.slots.seq[slot]) {
      // A leg that took this (unflushed) write and then left before the request completed may
      // have lost it with its server: it does not count as holding it.
      lost |= this.leftSince(this.slots.seq[slot] ?? 0, target & ~failed);
    }
    if (failed !== 0 && failed === target && this.allRequestLevel(slot, failed)) {
      // Every leg refused the same request: a request-level answer (EINVAL, ENOSPC, ENOTSUP
      // for FAST_ZERO...), not a divergence. Legs stay in sync; the client gets the error.
      errno = ring.errno(slot) || p.kEIo;
    } else if (isDataChanging(command)) {
      const held = target & ~lost;
      // ...and still clean there now: a leg marked for the range while the request was in
      // flight (a read error's repair or mark, a leaving leg's spilled unflushed writes) is not
      // read there, so the write would be acknowledged on no readable leg.
      if (!this.cleanHolder(held & (this.slots.upToDate[slot] ?? 0), ring.offsetBytes(slot), ring.lengthBytes(slot))) errno = p.kEIo;
      // A failed write's shadows are cancelled before any leg's marks are settled: a shadow
      // that will never land must not count as holding the range (markUnlessSole).
      if (errno !== 0) this.behind?.onMainDone(slot, false);
      if (lost !== 0 || errno !== 0) this.onWriteFailures(slot, command, target, lost, errno === 0);
      if (errno !== 0) this.behind?.settleFailed(ring.offsetBytes(slot), ring.lengthBytes(slot));
    } else if (failed !== 0) {
      // FLUSH: durable if a leg that was in sync at dispatch (it holds every acknowledged
      // write) flushed; with none in sync, only if every targeted leg flushed. A leg that left
      // since dispatch does not count: its unflushed record was spilled (marked where a leg
      // that failed this FLUSH holds the range), so that leg's copy is the one that counts.
      // Nor does one no longer in sync (a read repair marked it: it no longer counts there).
      const inSync = this.slots.inSync[slot] ?? 0;
      if ((inSync & ~failed & ~this.leftSince(this.slots.seq[slot] ?? 0, inSync) & this.inSyncMask()) === 0) errno = p.kEIo;
      this.failLegsOf(slot, command, target, failed);
    }
    if (isDataChanging(command)) {
      if (this.flushTracking && (ring.flags(slot) & p.kCmdFlagFua) === 0) this.recordUnflushed(slot, target & ~lost);
      this.behind?.onMainDone(slot, errno === 0); // before the release grants its shadows
      this.releaseRange(slot);
      // A member-table change (a leg left) is not durable yet: the ack waits for it.
      if (errno === 0 && this.keeper !== null && this.keeper.holdCompletion(slot, errno)) return;
    }
    this.finishSlot(slot, errno);
  }

  /** The legs in sync now. */
  private inSyncMask(): number {
    let mask = 0;
    for (const leg of this.legs) if (leg.state === 'in-sync') mask |= leg.bit;
    return mask;
  }

  /** True when some leg of `mask` is clean in its dirty map for the range (or keeps none). */
  private cleanHolder(mask: number, offsetBytes: number, lengthBytes: number): boolean {
    if (mask === 0) return false;
    for (const leg of this.legs) {
      if ((mask & leg.bit) !== 0 && (leg.dirty === null || !leg.dirty.testRange(offsetBytes, lengthBytes))) return true;
    }
    return false;
  }

  /** Legs of `mask` that failed (left the mirror) after failure sequence number `seq`. */
  private leftSince(seq: number, mask: number): number {
    let left = 0;
    for (const leg of this.legs) if ((mask & leg.bit) !== 0 && leg.failedAtSeq > seq) left |= leg.bit;
    return left;
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
   * A data-changing request that some legs failed, or that no up-to-date leg holds. Before the
   * client is answered:
   * - succeeded (an up-to-date leg holds it): every leg that failed it has the range marked.
   * - failed (EIO to the client; the range may now hold either version on any leg): for each
   *   dirty-map chunk of the range one leg still clean there stays unmarked as the reference
   *   (preferably one that was up to date at dispatch and failed it), and every other leg,
   *   including legs that took the write, is marked, so all legs converge on the reference and
   *   no two readable legs can disagree. The reference follows what the legs hold now, never
   *   an index alone.
   */
  private onWriteFailures(slot: number, command: number, target: number, failed: number, succeeded: boolean): void {
    const ring = this.ring;
    const offsetBytes = ring.offsetBytes(slot);
    const lengthBytes = ring.lengthBytes(slot);
    if (!succeeded) {
      // Per dirty-map chunk of the range, the reference is a leg still clean there now (a leg
      // that left since dispatch spilled its unflushed record, which may have marked it):
      // preferably one that was up to date at dispatch, else any. Every other leg is marked
      // there. A chunk no leg is clean on is left as it is (nobody holds it to copy from).
      const candidates = (this.slots.upToDate[slot] ?? 0) & failed;
      const chunk = this.chunkBytes;
      const end = offsetBytes + lengthBytes;
      for (let at = Math.floor(offsetBytes / chunk) * chunk; at < end; at += chunk) {
        const pieceLength = Math.min(chunk, this.sizeBytes - at);
        const pick = this.firstCleanLeg(candidates, at, pieceLength) ?? this.firstCleanLeg(this.allLegsMask, at, pieceLength);
        if (pick === null) continue;
        for (const leg of this.legs) {
          if (leg !== pick && leg.state !== 'removed') leg.dirty?.markRange(at, pieceLength);
        }
      }
    } else {
      for (const leg of this.legs) if ((failed & leg.bit) !== 0) leg.dirty?.markRange(offsetBytes, lengthBytes);
    }
    this.failLegsOf(slot, command, target, failed);
  }

  /** Every leg that failed the request (with a leg-level error, or while others succeeded) fails. */
  private failLegsOf(slot: number, command: number, target: number, failed: number): void {
    const name = commandNames[command] ?? String(command);
    for (const leg of this.legs) {
      if ((failed & leg.bit) === 0) continue;
      const errnoName = errnoNames[this.ring.legErrno(slot, leg.index)] ?? 'an error';
      this.lifecycle.failLeg(leg, failed === target ? `${name} failed on every leg (${errnoName} here)` : `${name} failed with ${errnoName} while other legs succeeded`);
    }
  }

  private retryRead(slot: number, failed: number): void {
    const ring = this.ring;
    const errno = ring.errno(slot) || p.kEIo;
    const failedLeg = this.legs[31 - Math.clz32(failed)] as Leg;
    const offsetBytes = ring.offsetBytes(slot);
    const lengthBytes = ring.lengthBytes(slot);
    if (!kRequestLevelErrnos.has(errno) && !(this.options.readRepair !== false && this.repair.start(failedLeg, offsetBytes, lengthBytes, ring.legErrno(slot, failedLeg.index), p.kEIo))) {
      // The leg could not read what it should hold: that range needs a copy from a good leg.
      this.markUnlessSole(failedLeg, offsetBytes, lengthBytes);
      this.lifecycle.failLeg(failedLeg, `${commandNames[ring.command(slot)] ?? 'READ'} failed with ${errnoNames[errno] ?? errno}`);
    }
    const next = this.pickReadLeg(this.slots.tried[slot] ?? 0, offsetBytes, lengthBytes);
    if (next === null || errno === p.kEInval) {
      // A leg's own trouble (a drop's ESHUTDOWN...) reaches the client as EIO.
      this.finishSlot(slot, kRequestLevelErrnos.has(errno) ? errno : p.kEIo);
      return;
    }
    this.slots.tried[slot] = (this.slots.tried[slot] ?? 0) | next.bit;
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
    const token = this.slots.token[slot] ?? -1;
    assert(token >= 0, 'finished slot has a token');
    this.inFlight -= 1;
    const kind = this.slots.kind[slot] ?? -1;
    if (kind >= 0) {
      this.slots.kind[slot] = -1;
      if (token < kInternalTokenBase) this.latency.record(kind, performance.now() - (this.slots.started[slot] ?? 0));
    }
    if (this.slots.internal[slot] === 1) {
      this.slots.token[slot] = -1;
      this.slots.internal[slot] = 0;
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

  /** The first non-removed leg of `mask` whose dirty map is clean for the range, or null. */
  private firstCleanLeg(mask: number, offsetBytes: number, lengthBytes: number): Leg | null {
    for (const leg of this.legs) {
      if ((mask & leg.bit) !== 0 && leg.state !== 'removed' && leg.dirty !== null && !leg.dirty.testRange(offsetBytes, lengthBytes)) return leg;
    }
    return null;
  }

  /**
   * A leg failed to read a range it should hold: mark it there, so it gets a fresh copy, unless
   * no other leg holds the range (then its copy is the only one there is; marking would make
   * the range unreadable everywhere).
   */
  private markUnlessSole(leg: Leg, offsetBytes: number, lengthBytes: number): boolean {
    if (leg.dirty === null) return false;
    if (this.firstCleanLeg(this.allLegsMask & ~leg.bit, offsetBytes, lengthBytes) === null) {
      // With write-behind, a write-mostly leg's live shadow writes will hold what they cover:
      // each chunk held by another leg, clean or about to be, is enough.
      if (this.behind === null || !this.heldElsewhere(leg, offsetBytes, lengthBytes)) return false;
      this.behind.markedOnShadows(leg, offsetBytes, offsetBytes + lengthBytes);
    }
    leg.dirty.markRange(offsetBytes, lengthBytes);
    return true;
  }

  /** Every dirty-map chunk of the range is clean on, or covered by a live shadow of, a leg other than `leg`. */
  private heldElsewhere(leg: Leg, offsetBytes: number, lengthBytes: number): boolean {
    const behind = this.behind;
    if (behind === null) return false;
    const chunk = this.chunkBytes;
    const end = Math.min(this.sizeBytes, offsetBytes + lengthBytes);
    for (let at = Math.floor(offsetBytes / chunk) * chunk; at < end; at += chunk) {
      const piece = Math.min(chunk, this.sizeBytes - at);
      const held = this.legs.some((other) => other !== leg && other.state !== 'removed' && other.dirty !== null
        && (!other.dirty.testRange(at, piece) || (other.admitted && behind.shadowCovers(other, at))));
      if (!held) return false;
    }
    return true;
  }

  // ---- leg lifecycle hooks (the rules live in leg-lifecycle.ts) ---------------------------

  private startResync(leg: Leg): void {
    leg.resync ??= new Resync(leg.index, leg.dirty as DirtyMap, this.resyncHost, this.resyncRates, this.logger, resyncWindow(this.options, this.ring));
    leg.resync.setRates(this.resyncRates);
    if (this.resyncPaused) leg.resync.pause();
    if (leg.resync.isRunning) leg.resync.nudge();
    else void leg.resync.start();
  }

  /** The actor's thread is gone: ack on its behalf every slot it had not acked. */
  private onActorGone(leg: Leg, reason: string): void {
    this.lifecycle.failLeg(leg, reason, true);
    for (let slot = 0; slot < this.ring.descriptorCount; slot += 1) {
      if (this.ring.state(slot) !== 2) continue;
      if (abandonLeg(this.ring, slot, leg.index, p.kEIo)) this.onSlotComplete(slot);
    }
    this.adoptInbox(leg);
  }

  /**
   * A gone actor's chain inbox (src/ring/chain-inbox.ts): another actor may still hand it a
   * copy whose READ was in flight. The master takes over as the inbox's one consumer and acks
   * every such slot for the leg with EIO, until the leg's record is replaced (addLeg).
   */
  private adoptInbox(leg: Leg): void {
    const chain = this.chain;
    if (chain === null || this.adoptedInboxes.has(leg)) return;
    this.adoptedInboxes.add(leg);
    const drainOnce = (): void => {
      if (this.closed || this.legs[leg.index] !== leg) return;
      const snapshot = chain.snapshot(leg.index);
      chain.drain(leg.index, (slot) => {
        if (abandonLeg(this.ring, slot, leg.index, p.kEIo)) this.onSlotComplete(slot);
      });
      const wait = chain.waitAsync(leg.index, snapshot);
      if (wait === null) setImmediate(drainOnce);
      else void wait.then(drainOnce);
    };
    drainOnce();
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
    this.keeper?.onLegState(leg);
    this.emit({ type: 'leg-state', leg: leg.index, name: leg.name, uri: leg.uri, state: leg.state, reason: leg.failureReason });
  }

  /** A leg's index from its name, index or URI (src/engine/leg-names.ts). */
  legIndexOf(ref: string | number): number {
    return resolveLegRef(ref, this.legs.map((leg) => ({ index: leg.index, name: leg.name, uri: leg.uri, live: leg.state !== 'removed' })));
  }

  private legAt(index: number): Leg {
    const leg = this.legs[index];
    if (leg === undefined) throw new EnbdError('ENBD_ERR_REFUSED', `no leg ${index} (legs are 0..${this.legs.length - 1})`);
    return leg;
  }

  /**
   * Takes a leg out by hand: it gets no requests and is not reconnected until reconnectLeg().
   * Refused when the leg alone holds some range among the admitted legs (the export would lose
   * its only up-to-date copy of it).
   */
  failLegByHand(index: number, reason = 'failed by the operator'): void {
    const leg = this.legAt(index);
    this.refuseIfLastCopy(leg, 'fail', this.legs.filter((other) => other !== leg && other.admitted));
    this.lifecycle.failLeg(leg, reason, true);
  }

  /**
   * Refuses an operator command that would take away the last in-sync leg, or the only leg
   * among `others` that holds some range.
   */
  private refuseIfLastCopy(leg: Leg, verb: string, others: Leg[]): void {
    if (leg.state === 'in-sync' && !others.some((other) => other.state === 'in-sync')) {
      throw new EnbdError('ENBD_ERR_REFUSED', `leg ${leg.name} is the last in-sync leg; refusing to ${verb} it`);
    }
    if (this.lifecycle.soleHolder(leg, others)) {
      throw new EnbdError('ENBD_ERR_REFUSED', `leg ${leg.name} alone holds some of the device's acknowledged data; refusing to ${verb} it`);
    }
  }

  /**
   * Brings a leg back now: a failed, faulty, degraded or fencing leg is fenced (if it was not),
   * reconnected and put on probation; resolves with its state after this attempt.
   */
  async reconnectLegNow(index: number): Promise<LegState> {
    const leg = this.legAt(index);
    const state = leg.state;
    if (state !== 'failed' && state !== 'faulty' && state !== 'degraded' && state !== 'fencing') return state;
    if (leg.worker !== null && leg.worker.threadId < 0) throw new EnbdError('ENBD_ERR_LEG', `leg ${index}'s actor thread is gone`);
    this.lifecycle.clearReconnect(leg);
    leg.health.reset();
    leg.parkWhenFenced = false;
    if (state === 'failed' || state === 'faulty' || state === 'fencing') {
      if (state !== 'fencing') this.lifecycle.move(leg, 'fencing', 'reconnect by the operator: fencing the old connection first');
      await this.lifecycle.fenceLeg(leg);
      // Not proven: the fence's retry timer stays (else the leg stayed fencing forever).
      if (leg.state !== 'degraded') return leg.state;
      this.lifecycle.clearReconnect(leg);
    }
    await this.lifecycle.reconnectLeg(leg);
    return leg.state;
  }

  /**
   * Adds a leg to the running mirror: it must hold the export's size and offer what the export
   * already promised its clients. It goes through probation, then a full resync (its map starts
   * all dirty). Resolves with its index (a removed leg's index is reused). `name`: given, or
   * the next automatic one no leg held in this run.
   */
  async addLeg(uri: string, name: string | null = null): Promise<number> {
    if (this.closed) throw new EnbdError('ENBD_ERR_REFUSED', 'the mirror is shutting down');
    if (parseLegUri(uri).writeMostly === true) throw new EnbdError('ENBD_ERR_REFUSED', `${uri}: write-mostly applies to legs given at start (--leg or legs in the config), not to a leg added later`);
    if (this.legs.some((leg) => leg.state !== 'removed' && leg.uri === uri)) throw new EnbdError('ENBD_ERR_REFUSED', `${uri} is already a leg`);
    const live = new Set(this.legs.filter((leg) => leg.state !== 'removed').map((leg) => leg.name));
    const nameProblem = name === null ? null : legNameProblem(name);
    if (nameProblem !== null) throw new EnbdError('ENBD_ERR_REFUSED', `leg name "${name}" ${nameProblem}`);
    if (name !== null && live.has(name)) throw new EnbdError('ENBD_ERR_REFUSED', `a leg is already named ${name}`);
    const legName = name ?? nextAutoLegName(live, this.retiredLegNames);
    let index = this.legs.findIndex((leg) => leg.state === 'removed' && leg.worker === null && leg.inline === null);
    if (index < 0) index = this.legs.length;
    if (index >= kMaxLegs) throw new EnbdError('ENBD_ERR_REFUSED', `a mirror has at most ${kMaxLegs} legs`);
    const leg = this.createLeg(index, uri);
    leg.name = legName;
    this.reads.resetLeg(index);
    this.repair.resetLeg(index);
    leg.state = 'reconnecting'; // not admitted while it is checked; probation next
    const info = await leg.api.open();
    let problem: string | null = null;
    if ('error' in info) problem = info.error.message;
    else if (info.sizeBytes < this.sizeBytes) problem = `it has ${info.sizeBytes} bytes, fewer than the export's ${this.sizeBytes}`;
    else if (this.keeper !== null && !this.keeper.fits(info.sizeBytes)) problem = `its ${info.sizeBytes} bytes cannot hold the export's ${this.sizeBytes} bytes plus the enbd metadata at its end`;
    else if (info.features.readOnly) problem = 'it is read-only';
    else {
      const missing = (['flush', 'fua', 'trim', 'writeZeroes'] as const).filter((key) => this.features[key] && !info.features[key]);
      if (missing.length > 0) problem = `it lacks ${missing.join(', ')}, which the export offers`;
      else if (info.blockSizes.minimumBytes > this.blockSizes.minimumBytes) problem = `its minimum block size ${info.blockSizes.minimumBytes} is larger than the export's ${this.blockSizes.minimumBytes}`;
      else if (info.blockSizes.maximumBytes < this.blockSizes.maximumBytes) problem = `its maximum request ${info.blockSizes.maximumBytes} is smaller than the export's ${this.blockSizes.maximumBytes}`;
    }
    if (problem === null && !this.closed) {
      const check = await checkOf(leg.api.probe(this.lifecycle.probeTimeoutMs));
      if (!check.ok) problem = `its probe failed: ${check.reason}`;
    }
    if (problem !== null || this.closed) {
      await this.stopActor(leg);
      throw new EnbdError('ENBD_ERR_LEG', `cannot add leg ${uri}: ${problem ?? 'the mirror is shutting down'}`);
    }
    leg.info = info as LegInfo;
    this.createMaps(leg);
    leg.dirty?.markAll();
    const previous = this.legs[index];
    this.legs[index] = leg;
    if (this.keeper !== null) {
      // Fresh metadata (a new member slot and UUID) before it takes any client I/O.
      this.keeper.addLeg(leg, leg.info.sizeBytes);
      if (!(await this.keeper.admit(leg)) || this.closed) {
        this.keeper.forgetLeg(index);
        if (previous === undefined) this.legs.length = index;
        else this.legs[index] = previous;
        await this.stopActor(leg);
        throw new EnbdError('ENBD_ERR_LEG', `cannot add leg ${uri}: writing its metadata failed`);
      }
    }
    this.retiredLegNames.add(legName);
    this.emit({ type: 'leg-added', leg: index, name: legName, uri });
    leg.state = 'probation';
    this.lifecycle.move(leg, 'resyncing', null, { why: 'leg added; full resync' });
    this.startResync(leg);
    return index;
  }

  /**
   * Removes a leg for good (its actor stops once its requests drained). Refused when the leg
   * alone holds some range among the remaining legs (that data would be lost).
   */
  async removeLeg(index: number): Promise<void> {
    const leg = this.legAt(index);
    if (leg.state === 'removed') throw new EnbdError('ENBD_ERR_REFUSED', `leg ${index} is already removed`);
    if (leg.admitted) this.refuseIfLastCopy(leg, 'remove', this.legs.filter((other) => other !== leg && other.admitted));
    this.refuseIfLastCopy(leg, 'remove', this.legs.filter((other) => other !== leg && other.state !== 'removed'));
    this.lifecycle.clearReconnect(leg);
    leg.epoch += 1;
    this.lifecycle.move(leg, 'removed', 'removed by the operator');
    leg.resync?.nudge();
    this.emit({ type: 'leg-removed', leg: index, name: leg.name, uri: leg.uri });
    const deadline = Date.now() + 30_000;
    while (leg.inFlight > 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
    await this.stopActor(leg);
  }

  private async stopActor(leg: Leg): Promise<void> {
    try {
      await withTimeout(leg.api.shutdown(), 5000, undefined);
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
    if (leg.state === 'in-sync') throw new EnbdError('ENBD_ERR_REFUSED', `leg ${index} is in sync; fail it first`);
    if (offsetBytes === 0 && lengthBytes === this.sizeBytes) leg.dirty?.markAll();
    else leg.dirty?.markRange(offsetBytes, lengthBytes);
    this.keeper?.onLegState(leg);
  }

  /**
   * Legs the mirror may read [offset, offset+length) from right now: admitted (in-sync,
   * resyncing) and clean in their dirty map for the whole range. Tests check the promise with
   * it: every acknowledged write reads the same from each of these.
   */
  readableLegs(offsetBytes: number, lengthBytes: number): number[] {
    const legs: number[] = [];
    for (const leg of this.legs) {
      if (this.upToDateFor(leg, offsetBytes, lengthBytes)) legs.push(leg.index);
    }
    return legs;
  }

  dirtyMap(index: number): DirtyMap | null {
    return this.legAt(index).dirty;
  }

  /** Changes the read policy from the next read on (SIGHUP reload, control plane). */
  setReadPolicy(policy: ReadPolicyName): void {
    this.reads.policy = policy;
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
    const token = this.takeInternalToken();
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
      name: leg.name,
      uri: leg.uri,
      kind: leg.info?.kind ?? 'unknown',
      state: leg.state,
      inFlight: leg.inFlight,
      failureReason: leg.failureReason,
      dirtyBytes: leg.dirty?.dirtyBytes() ?? 0,
      reconnectAttempts: leg.reconnectAttempts,
      resync: leg.resync !== null && (leg.state === 'resyncing' || leg.resync.isRunning) ? leg.resync.progress() : null,
      failures: leg.failures,
      recentFailures: leg.health.recentFailures,
      resyncedBytes: leg.resyncedBytes,
      reconnects: leg.reconnects,
      member: this.keeper?.legMeta(leg.index) ?? null,
      reads: this.reads.reads[leg.index] ?? 0,
      readLatencyMs: (this.reads.latencyMs[leg.index] ?? 0) === 0 ? null : this.reads.latencyMs[leg.index] ?? null,
      writeMostly: this.reads.isWriteMostly(leg.index),
      readRepairs: this.repair.repairs[leg.index] ?? 0,
      behindBytes: this.behind?.behindBytes[leg.index] ?? 0,
      deferredWrites: this.behind?.deferredWrites[leg.index] ?? 0,
      boundHits: this.behind?.boundHits[leg.index] ?? 0,
    }));
  }

  /**
   * Per-leg actor counters by leg index (MirrorView.legStats): null for a removed leg or one
   * that does not answer within `timeoutMs` (default: no limit, for the REPL).
   */
  async legStats(timeoutMs = Number.POSITIVE_INFINITY): Promise<Array<LegStats | null>> {
    return await legStatsWithin(this.legs, timeoutMs);
  }

  stats(): MirrorStats {
    const requests: Record<string, number> = {};
    for (const [command, count] of this.counters.requests) requests[commandNames[command] ?? String(command)] = count;
    const bytes: Record<string, number> = {};
    for (const [command, count] of this.counters.bytes) bytes[commandNames[command] ?? String(command)] = count;
    return {
      requests,
      bytes,
      writeRequests: this.counters.writeRequests,
      writeCopies: this.counters.writeCopies,
      writeBytesCopied: this.counters.writeBytesCopied,
      ringSlotsInUse: this.ring.slotCount - this.ring.freeCount,
      legs: this.legStatus(),
      resyncWrites: this.copier.writeCounts(),
    };
  }

  // ---- MirrorView (src/engine/view.ts): plain-data reads for control and metrics ----------

  legState(index: number): LegState | null {
    return this.legs[index]?.state ?? null;
  }

  legName(index: number): string | null {
    return this.legs[index]?.name ?? null;
  }

  ringCounters(): RingCounters {
    return ringCountersOf(this.ring);
  }

  slotsSnapshot(limit: number): SlotsSnapshot {
    return slotsSnapshotOf(this.ring, limit);
  }

  bitmapSnapshot(index: number, runsMax: number): BitmapSnapshot | null {
    const map = this.legAt(index).dirty;
    return map === null ? null : bitmapSnapshotOf(index, map, runsMax);
  }

  /** Debug only (enbd repl): the live objects behind the view (MirrorDebugHandles). */
  debugHandles(): MirrorDebugHandles {
    return { mirror: this, ring: this.ring, legs: this.legs, dirtyMap: (index: number) => this.dirtyMap(index) };
  }

  /** Flushes every in-sync leg (used on shutdown); resolves with the errno (0 = ok). */
  async flushAll(): Promise<number> {
    await this.catchUp();
    if (!this.features.flush || this.legs.every((leg) => leg.state !== 'in-sync')) return 0;
    return await this.runInternal(p.kCmdFlush, 0, 0, 0);
  }

  /**
   * Waits (up to 30 s) for write-mostly legs to catch up with the writes they are behind on; a
   * leg still behind then is failed, so the metadata records it as needing a resync.
   */
  async catchUp(timeoutMs = 30_000): Promise<void> {
    const behind = this.behind;
    if (behind === null) return;
    const deadline = Date.now() + timeoutMs;
    while (!behind.idle && !this.closed && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 5));
    for (const leg of this.legs) {
      if ((behind.behindBytes[leg.index] ?? 0) > 0) this.lifecycle.failLeg(leg, `still ${behind.behindBytes[leg.index]} bytes behind at shutdown`);
    }
  }

  /**
   * Cross-thread wake-up counters since start (SAB statistics words of the queues and the
   * doorbell): what issue 15's wake-up work is measured by. Logged once at close.
   */
  wakeCounters(): { requests: number; dispatchNotifies: number; actorSleeps: number; actorSpinHits: number; doorbellNotifies: number; masterSleeps: number; masterSpinHits: number } {
    let requests = 0;
    for (const count of this.counters.requests.values()) requests += count;
    let dispatchNotifies = 0;
    let actorSleeps = 0;
    let actorSpinHits = 0;
    for (const leg of this.legs) {
      dispatchNotifies += leg.dispatch.notifyCount;
      actorSleeps += leg.dispatch.waitCount;
      actorSpinHits += leg.dispatch.spinHitCount;
    }
    return {
      requests, dispatchNotifies, actorSleeps, actorSpinHits,
      doorbellNotifies: this.doorbell.notifyCount, masterSleeps: this.doorbell.waitCount, masterSpinHits: this.doorbell.spinHitCount,
    };
  }

  /** Stops the actors and their threads. The server must have drained first. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.logger.info({ wake: this.wakeCounters(), spin: this.wake }, 'wake-ups since start');
    await this.verifier.close();
    await this.catchUp();
    if (this.keeper !== null) {
      try {
        await this.keeper.stop();
      } catch (error) {
        this.logger.error({ err: error }, 'writing the final metadata failed; the next start resyncs what the bitmap marks');
      }
    }
    this.closed = true;
    for (const leg of this.legs) {
      this.lifecycle.clearReconnect(leg);
      leg.resync?.nudge();
    }
    for (const queued of this.waiters.drainAll()) {
      this.inFlight -= 1;
      this.deliver(queued.token, p.kEIo);
    }
    await Promise.all(this.legs.filter((leg) => leg.worker !== null || leg.inline !== null).map(async (leg) => await this.stopActor(leg)));
  }
}
