/**
 * The control methods of a running mirror (`enbd mirror`): status, leg and resync controls,
 * log level, REPL evaluation; and the events pushed to subscribers (leg state changes from
 * MirrorDevice.on, resync progress once a second while a leg resyncs).
 *
 * Thread: the daemon's main thread. Every method is a few engine calls; the slow ones (leg.add,
 * leg.remove, leg.reconnect) await the engine without blocking the event loop.
 *
 * Reads the engine only through its face, src/engine/view.ts (MirrorOperations: plain-data
 * snapshots, leg stats with a timeout, the operator's actions; kMaxLegs), and the NBD server
 * as a type; the live objects come from runMirror. The REPL's live objects come from the
 * view's one debug export, debugHandles(). nbd/protocol-names.ts names the commands.
 *
 * Design notes
 * | method         | params          | engine call                                  |
 * |----------------|-----------------|----------------------------------------------|
 * | status         |                 | stats, latency, ringCounters, legStats(1 s)  |
 * | leg.fail       | leg             | failLegByHand (refused for the last in-sync) |
 * | leg.reconnect  | leg             | reconnectLegNow                              |
 * | leg.remove     | leg             | removeLeg (refused for the last in-sync)     |
 * | leg.add        | uri             | addLeg (full resync)                         |
 * | leg.bitmap     | leg             | bitmapSnapshot(leg, kBitmapRunsMax)          |
 * | ring.slots     |                 | slotsSnapshot(kSlotsListedMax)               |
 * | resync.pause   |                 | pauseResync(true) (kept for later resyncs)   |
 * | resync.resume  |                 | pauseResync(false)                           |
 * | resync.rate    | min?, max?      | setResyncRates                               |
 * | verify.start   | offset?, length?, rate?, repair? | startVerify (refused while one runs) |
 * | verify.stop    |                 | stopVerify (units in flight finish)          |
 * | log.level      | level           | logger.level; mirror.setLogLevel (actors)    |
 * | repl.eval      | code            | ReplEvaluator over debugHandles() (one vm    |
 * |                |                 | context per session)                         |
 */
import { assert } from '../core/assert.js';
import { isLogLevel, type Logger } from '../core/log.js';
import { kMaxLegs, type BitmapSnapshot, type MirrorEvent, type MirrorOperations } from '../engine/view.js';
import type { VerifyStartOptions } from '../engine/verify.js';
import type { NbdServer } from '../nbd/server/server.js';
import { commandNames } from '../nbd/protocol-names.js';
import {
  kBitmapRunsMax,
  kControlErrorCodes,
  kSlotsListedMax,
  type BitmapResult,
  type CheckpointMethod,
  type ControlResults,
  type LatencyView,
  type LegActionResult,
  type LegView,
  type SlotView,
  type SlotsResult,
  type StatusResult,
} from './protocol.js';
import { ReplEvaluator } from './repl-eval.js';
import { checkpointHandlers } from './checkpoint-handlers.js';
import { ControlRequestError, type ControlSession, type MethodHandler } from './server.js';

const kLegStatsTimeoutMs = 1000;
const kUriCharsMax = 4096;
export const kProgressIntervalMs = 1000;
const kReplStateKey = 'repl';

export interface MirrorControlOptions {
  /** The engine's face (a MirrorDevice). */
  mirror: MirrorOperations;
  server: NbdServer;
  /** The daemon's root logger (log.level changes it, and with it every child logger). */
  logger: Logger;
  controlPath: string;
  /** Pushes an event to every subscribed session. */
  broadcast: (event: string, data: unknown) => void;
}

function badParams(message: string): ControlRequestError {
  return new ControlRequestError(kControlErrorCodes.badParams, message);
}

/** params.leg: a leg index, or a string the engine resolves (a name, digits, or a URI). */
function legParam(params: Record<string, unknown>): number | string {
  const leg = params['leg'];
  if (typeof leg === 'string' && leg.length > 0 && leg.length <= kUriCharsMax) return leg;
  if (typeof leg !== 'number' || !Number.isInteger(leg) || leg < 0 || leg >= kMaxLegs) {
    throw badParams(`params.leg must be a leg index from 0 to ${kMaxLegs - 1}, or a leg name or URI`);
  }
  return leg;
}

function rateParam(params: Record<string, unknown>, key: 'min' | 'max'): number | undefined {
  const value = params[key];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw badParams(`params.${key} must be a rate in bytes/s (a non-negative integer)`);
  }
  return value;
}

function byteParam(params: Record<string, unknown>, key: string): number | undefined {
  const value = params[key];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw badParams(`params.${key} must be a non-negative integer (bytes)`);
  }
  return value;
}

/** verify.start's params: offset, length (bytes), rate (bytes/s, 0 = unlimited), repair. */
function verifyStartParams(params: Record<string, unknown>): VerifyStartOptions {
  const repair = params['repair'];
  if (repair !== undefined && typeof repair !== 'boolean') throw badParams('params.repair must be a boolean');
  const offsetBytes = byteParam(params, 'offset');
  const lengthBytes = byteParam(params, 'length');
  const rateBytesPerSecond = byteParam(params, 'rate');
  return {
    ...(offsetBytes !== undefined ? { offsetBytes } : {}),
    ...(lengthBytes !== undefined ? { lengthBytes } : {}),
    ...(rateBytesPerSecond !== undefined ? { rateBytesPerSecond } : {}),
    repair: repair === true,
    reason: 'operator',
  };
}

const kLevelOrder = ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'];
/** Whether a logger at `level` shows messages at `wanted`. */
function isLevelShowing(level: string, wanted: string): boolean {
  return kLevelOrder.indexOf(level) <= kLevelOrder.indexOf(wanted);
}

/** The methods and event sources of one mirror's control plane. */
export class MirrorControl {
  private readonly mirror: MirrorOperations;
  private readonly server: NbdServer;
  private readonly logger: Logger;
  private readonly controlPath: string;
  private readonly broadcast: (event: string, data: unknown) => void;
  private readonly startedAt = Date.now();
  private resyncPaused = false;
  private unsubscribe: (() => void) | null = null;
  private progressTimer: NodeJS.Timeout | null = null;

  constructor(options: MirrorControlOptions) {
    this.mirror = options.mirror;
    this.server = options.server;
    this.logger = options.logger;
    this.controlPath = options.controlPath;
    this.broadcast = options.broadcast;
    this.unsubscribe = this.mirror.on((event) => this.onMirrorEvent(event));
  }

  handlers(): ReadonlyMap<string, MethodHandler> {
    const table: { [M in Exclude<keyof ControlResults, 'subscribe' | CheckpointMethod>]: (params: Record<string, unknown>, session: ControlSession) => ControlResults[M] | Promise<ControlResults[M]> } = {
      status: async () => await this.status(),
      'leg.fail': (params) => this.failLeg(this.legIndex(params)),
      'leg.reconnect': async (params) => await this.reconnectLeg(this.legIndex(params)),
      'leg.remove': async (params) => await this.removeLeg(this.legIndex(params)),
      'leg.add': async (params) => await this.addLeg(params['uri'], params['name']),
      'leg.bitmap': (params) => this.bitmap(this.legIndex(params)),
      'ring.slots': () => this.slots(),
      'resync.pause': () => this.pauseResync(true),
      'resync.resume': () => this.pauseResync(false),
      'resync.rate': (params) => this.setRates(rateParam(params, 'min'), rateParam(params, 'max')),
      'verify.start': (params) => this.mirror.startVerify(verifyStartParams(params)),
      'verify.stop': async () => await this.mirror.stopVerify(),
      'log.level': (params) => this.setLogLevel(params['level']),
      'repl.eval': async (params, session) => await this.replEval(params['code'], session),
    };
    return new Map<string, MethodHandler>([...Object.entries(table), ...checkpointHandlers(this.mirror)]);
  }

  /** Starts or stops the 1 s resync-progress ticker (only while someone listens). */
  onSubscribersChanged(count: number): void {
    assert(count >= 0, 'subscriber count is non-negative');
    if (count > 0 && this.progressTimer === null) {
      this.progressTimer = setInterval(() => this.tickProgress(), kProgressIntervalMs);
      this.progressTimer.unref();
    } else if (count === 0 && this.progressTimer !== null) {
      clearInterval(this.progressTimer);
      this.progressTimer = null;
    }
  }

  close(): void {
    this.unsubscribe?.();
    this.unsubscribe = null;
    this.onSubscribersChanged(0);
  }

  private onMirrorEvent(event: MirrorEvent): void {
    this.broadcast(event.type, event);
    // pauseResync reaches only resyncs that exist: keep a pause for resyncs started later.
    // The engine creates the leg's Resync right after this event, hence setImmediate.
    if (this.resyncPaused && (event.type === 'leg-added' || (event.type === 'leg-state' && event.state === 'resyncing'))) {
      setImmediate(() => {
        if (this.resyncPaused) this.mirror.pauseResync(true);
      });
    }
  }

  private tickProgress(): void {
    for (const leg of this.mirror.legStatus()) {
      if (leg.resync === null || leg.state !== 'resyncing') continue;
      this.broadcast('resync-progress', { ...leg.resync, name: leg.name, uri: leg.uri, state: leg.state });
    }
  }

  private async status(): Promise<StatusResult> {
    // Each leg actor's counters; a leg that does not answer in time (or is removed) gets null.
    const actorStats = await this.mirror.legStats(kLegStatsTimeoutMs);
    const stats = this.mirror.stats();
    const legs: LegView[] = stats.legs.map((leg) => {
      const counters = actorStats[leg.index] ?? null;
      return {
        index: leg.index,
        name: leg.name,
        uri: leg.uri,
        kind: leg.kind,
        state: leg.state,
        failureReason: leg.failureReason,
        inFlight: leg.inFlight,
        latencyMeanMs: counters === null || counters.latencyCount === 0 ? null : counters.latencySumMs / counters.latencyCount,
        requests: counters?.requests ?? null,
        errors: counters?.errors ?? null,
        connected: counters?.connected ?? null,
        dirtyBytes: leg.dirtyBytes,
        reconnectAttempts: leg.reconnectAttempts,
        failures: leg.failures,
        recentFailures: leg.recentFailures,
        resync: leg.resync,
        resyncedBytes: leg.resyncedBytes,
        member: leg.member ?? null,
        reads: leg.reads ?? 0,
        readLatencyMs: leg.readLatencyMs ?? null,
        readRepairs: leg.readRepairs ?? 0,
        writeMostly: leg.writeMostly ?? false,
        behindBytes: leg.behindBytes ?? 0,
        deferredWrites: leg.deferredWrites ?? 0,
        boundHits: leg.boundHits ?? 0,
      };
    });
    const latency: Record<string, LatencyView> = {};
    for (const [kind, name] of this.mirror.latency.kinds.entries()) {
      latency[name] = { count: this.mirror.latency.snapshot(kind).count, meanMs: this.mirror.latency.meanMs(kind) };
    }
    const payload = this.server.payloadStats();
    return {
      export: { name: this.server.exportDescriptor.name, sizeBytes: this.mirror.sizeBytes, clients: this.server.connectionCount },
      daemon: { pid: process.pid, uptimeSeconds: Math.round((Date.now() - this.startedAt) / 1000), logLevel: this.logger.level, control: this.controlPath },
      legs,
      metadata: this.mirror.metadataStatus(),
      verify: this.mirror.verifyStatus(),
      resync: { paused: this.resyncPaused, ...this.resyncRates() },
      stats: {
        requests: stats.requests,
        writeRequests: stats.writeRequests,
        writeCopies: stats.writeCopies,
        writeBytesCopied: stats.writeBytesCopied,
        ringSlotsInUse: stats.ringSlotsInUse,
        ringSlots: this.mirror.ringCounters().slotCount,
        payloadBytesCopied: payload.bytesCopied,
        payloadBytesDirect: payload.bytesDirect,
      },
      latency,
    };
  }

  private legIndex(params: Record<string, unknown>): number {
    return this.mirror.legIndexOf(legParam(params));
  }

  private stateOf(index: number): string {
    return this.mirror.legState(index) ?? 'unknown';
  }

  private nameOf(index: number): string {
    return this.mirror.legName(index) ?? String(index);
  }

  private failLeg(index: number): LegActionResult {
    this.mirror.failLegByHand(index, 'failed by the operator (enbd leg fail)');
    return { leg: index, name: this.nameOf(index), state: this.stateOf(index) };
  }

  private async reconnectLeg(index: number): Promise<LegActionResult> {
    const state = await this.mirror.reconnectLegNow(index);
    return { leg: index, name: this.nameOf(index), state };
  }

  private async removeLeg(index: number): Promise<LegActionResult> {
    const name = this.nameOf(index);
    await this.mirror.removeLeg(index);
    return { leg: index, name, state: this.stateOf(index) };
  }

  private async addLeg(uri: unknown, name: unknown): Promise<LegActionResult> {
    if (typeof uri !== 'string' || uri.length === 0 || uri.length > kUriCharsMax) throw badParams(`params.uri must be a leg URI of 1..${kUriCharsMax} characters`);
    if (name !== undefined && name !== null && typeof name !== 'string') throw badParams('params.name must be a leg name (a string) or absent');
    const index = await this.mirror.addLeg(uri, typeof name === 'string' ? name : null);
    if (this.resyncPaused) this.mirror.pauseResync(true);
    return { leg: index, name: this.nameOf(index), state: this.stateOf(index) };
  }

  private bitmap(index: number): BitmapResult {
    const snapshot: BitmapSnapshot | null = this.mirror.bitmapSnapshot(index, kBitmapRunsMax);
    if (snapshot === null) throw new ControlRequestError('ENBD_ERR_LEG', `leg ${index} has no dirty map (it never opened)`);
    assert(snapshot.firstRuns.length <= kBitmapRunsMax, 'the snapshot lists at most the runs asked for');
    return snapshot;
  }

  private slots(): SlotsResult {
    const snapshot = this.mirror.slotsSnapshot(kSlotsListedMax);
    assert(snapshot.requests.length <= kSlotsListedMax, 'the snapshot lists at most the slots asked for');
    const requests: SlotView[] = snapshot.requests.map((request) => ({
      ...request,
      command: commandNames[request.command] ?? String(request.command),
    }));
    return { slotCount: snapshot.slotCount, slotBytes: snapshot.slotBytes, freeCount: snapshot.freeCount, inUse: snapshot.inUse, requests };
  }

  private pauseResync(paused: boolean): { paused: boolean } {
    this.resyncPaused = paused;
    this.mirror.pauseResync(paused);
    this.logger.info({ paused }, paused ? 'resync paused by the operator' : 'resync resumed by the operator');
    return { paused };
  }

  /** Read from the engine each time: a SIGHUP reload of the config may have changed them. */
  private resyncRates(): ControlResults['resync.rate'] {
    const rates = this.mirror.resyncSettings().rates;
    return { minBytesPerSecond: rates.minBytesPerSecond, maxBytesPerSecond: rates.maxBytesPerSecond };
  }

  private setRates(min: number | undefined, max: number | undefined): ControlResults['resync.rate'] {
    const current = this.resyncRates();
    const minBytesPerSecond = min ?? current.minBytesPerSecond;
    const maxBytesPerSecond = max ?? current.maxBytesPerSecond;
    if (maxBytesPerSecond !== 0 && maxBytesPerSecond < minBytesPerSecond) {
      throw badParams(`resync rate max (${maxBytesPerSecond} B/s) is below min (${minBytesPerSecond} B/s); max 0 means unlimited`);
    }
    if (min === undefined && max === undefined) return { ...current };
    this.mirror.setResyncRates({ minBytesPerSecond, maxBytesPerSecond });
    const rates = this.resyncRates();
    this.logger.info({ ...rates }, 'resync rates set by the operator');
    return rates;
  }

  private async setLogLevel(level: unknown): Promise<ControlResults['log.level']> {
    if (typeof level !== 'string' || !isLogLevel(level)) throw badParams('params.level must be one of fatal, error, warn, info, debug, trace, silent');
    const previous = this.logger.level;
    // Logged at info under whichever of the two levels shows it ('level' is pino's own key).
    const note = (): void => this.logger.info({ newLevel: level, previousLevel: previous }, 'log level changed by the operator');
    if (this.logger.isLevelEnabled('info')) note();
    this.logger.level = level;
    await this.mirror.setLogLevel(level); // the leg actors on workers have their own loggers
    if (!isLevelShowing(previous, 'info')) note();
    this.broadcast('log-level', { level, previous });
    return { level, previous };
  }

  private async replEval(code: unknown, session: ControlSession): Promise<ControlResults['repl.eval']> {
    if (typeof code !== 'string') throw badParams('params.code must be a string');
    let evaluator = session.state.get(kReplStateKey) as ReplEvaluator | undefined;
    if (evaluator === undefined) {
      const mirror = this.mirror;
      // The one use of the engine's debug handles: the REPL shows the live objects.
      evaluator = new ReplEvaluator({
        ...mirror.debugHandles(),
        server: this.server,
        stats: () => mirror.stats(),
        status: async () => await this.status(),
      });
      session.state.set(kReplStateKey, evaluator);
      this.logger.info({ controlConnection: session.id }, 'REPL session attached');
    }
    return await evaluator.evaluate(code);
  }
}
