/**
 * The engine's face towards the control plane and the metrics: `MirrorView`, the one narrow
 * interface through which src/control and src/metrics read a running mirror, and
 * `MirrorOperations`, the operator's actions on it. MirrorDevice implements both; the ring,
 * the legs and their dirty maps stay private to the engine. The snapshots are plain data,
 * copied out when asked (src/engine/snapshots.ts), so a reader can keep them.
 *
 * Thread: main thread (every method is called on the session master's event loop).
 *
 * Design notes
 * | method            | what the reader gets                                           |
 * |-------------------|----------------------------------------------------------------|
 * | stats, legStatus  | engine counters and each leg's state, dirty bytes, resync      |
 * | legState(i)       | one leg's state ('removed' included), null for no such leg     |
 * | legStats(ms)      | each leg actor's counters, null for a leg that is removed or   |
 * |                   | does not answer within ms (a dead actor answers zeros at once) |
 * | ringCounters      | slot count and size, free slots, live requests                 |
 * | slotsSnapshot(n)  | the first n slots holding a request (allocated or dispatched)  |
 * | bitmapSnapshot    | a leg's dirty-map counters and its first dirty runs            |
 * | metadataStatus    | the on-leg metadata keeper's status (null: --metadata none)    |
 * | debugHandles      | the live objects, for the REPL only (see MirrorDebugHandles)   |
 *
 * Invariants:
 * - Nothing returned by a MirrorView method aliases engine state: snapshots are copies, and
 *   reading them never changes the engine (debugHandles is the one deliberate exception).
 * - legStats(ms) settles within about ms whatever the actors do.
 */
import type { LatencySnapshot } from '../core/latency.js';
import type { KeeperStatus } from '../core/status-types.js';
import type { LegState } from './leg-health.js';
import type { LegStats } from './messages.js';
import type { LegStatus, MirrorEvent, MirrorStats } from './mirror.js';
import type { ResyncRates } from './resync.js';
import type { CheckpointOperations } from './checkpoints.js';
import type { BitmapSnapshot, MirrorDebugHandles, RingCounters, SlotsSnapshot } from './snapshots.js';

export { kMaxLegs } from '../ring/layout.js';
export type { BitmapSnapshot, MirrorDebugHandles, RingCounters, SlotSnapshot, SlotsSnapshot } from './snapshots.js';
export type { LegStatus, MirrorEvent, MirrorStats } from './mirror.js';
export type { LegStats } from './messages.js';
export type { LegState } from './leg-health.js';
export type { CheckpointInfo, CheckpointOperations } from './checkpoints.js';

/** Request latency histograms by kind (core/latency.ts LatencyHistograms, read side). */
export interface LatencyReader {
  readonly kinds: readonly string[];
  snapshot(kind: number): LatencySnapshot;
  /** Mean in ms over everything recorded for `kind` (0 when none). */
  meanMs(kind: number): number;
}

/** What control and metrics read from a running mirror. */
export interface MirrorView {
  /** Export size in bytes. */
  readonly sizeBytes: number;
  /** Requests inside the engine (client requests and resync copies). */
  readonly inFlight: number;
  readonly latency: LatencyReader;
  stats(): MirrorStats;
  /** Every leg but removed ones. */
  legStatus(): LegStatus[];
  /** Leg `index`'s state ('removed' included), or null when there is no such leg. */
  legState(index: number): LegState | null;
  /**
   * Each leg actor's counters, indexed by leg index: null for a removed leg and for one whose
   * actor failed or did not answer within `timeoutMs`; a leg without a live actor (its thread
   * died) answers at once with zero counters (connected false).
   */
  legStats(timeoutMs: number): Promise<Array<LegStats | null>>;
  ringCounters(): RingCounters;
  /** The first `limit` slots holding a request. */
  slotsSnapshot(limit: number): SlotsSnapshot;
  /** Leg `index`'s dirty map and first `runsMax` dirty runs; null when it never opened. Throws for no such leg. */
  bitmapSnapshot(index: number, runsMax: number): BitmapSnapshot | null;
  /** The on-leg metadata, or null with --metadata none. */
  metadataStatus(): KeeperStatus | null;
  resyncSettings(): { rates: ResyncRates; paused: boolean };
  /** Subscribes to leg events; returns the unsubscribe function. */
  on(listener: (event: MirrorEvent) => void): () => void;
}

/** The operator's actions (control plane), with the view, and the REPL's debug handles. */
export interface MirrorOperations extends MirrorView {
  failLegByHand(index: number, reason?: string): void;
  reconnectLegNow(index: number): Promise<LegState>;
  addLeg(uri: string): Promise<number>;
  removeLeg(index: number): Promise<void>;
  pauseResync(paused: boolean): void;
  setResyncRates(rates: Partial<ResyncRates>): ResyncRates;
  setLogLevel(level: string): Promise<void>;
  /** Checkpoints (changed-block tracking): create, remove, freeze, list, changed runs. */
  checkpointOperations(): CheckpointOperations;
  /** Debug only (enbd repl): see MirrorDebugHandles. */
  debugHandles(): MirrorDebugHandles;
}
