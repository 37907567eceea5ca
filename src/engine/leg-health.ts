/**
 * Leg health: the states a mirror leg can be in, the one table of allowed transitions, and the
 * bookkeeping that decides when a flapping leg is parked (failure window) and when its
 * reconnect backoff may start over (stable time). Every state change of a leg goes through
 * `LegHealth.move`, which asserts the transition is in the table and logs it: one line per
 * change, repeats of the same change within a minute counted and summarised.
 *
 * Thread: main thread (the session master).
 *
 * Design notes
 * - Only `in-sync` and `resyncing` legs are "admitted": they get client writes (and reads of
 *   ranges their dirty map shows clean). Every other state is out: writes are marked in the
 *   leg's dirty map instead.
 * - The way back for a leg that failed is fixed: fencing (its old connection drained) ->
 *   degraded (waiting for the reconnect timer) -> reconnecting -> probation (probe write and
 *   flush) -> resyncing / in-sync. Nothing skips the fence or the probation.
 * - `faulty` is md's "faulty" marking: a leg that failed `maxFailures` times within
 *   `failureWindowMs` is parked; only the operator (`enbd leg reconnect N`) brings it back.
 *
 * Invariants:
 * - A leg enters `probation` only from `reconnecting`, and `reconnecting` only from `degraded`
 *   or `faulty`/`failed` (operator): so every return was preceded by a completed fence.
 * - A leg enters `in-sync`/`resyncing` only from `probation`, or `resyncing` -> `in-sync`, or
 *   `in-sync` -> `resyncing` (a range it failed to read is rewritten: src/engine/read-repair.ts).
 */
import { assert } from '../core/assert.js';
import type { Logger } from '../core/log.js';

/**
 * in-sync: holds every acknowledged write; serves reads and takes writes.
 * resyncing: admitted again; takes writes; serves reads of ranges its dirty map shows clean;
 *   its dirty chunks are being copied from legs that hold them.
 * probation: reconnected; being probed (READ, WRITE back, FLUSH); no client I/O.
 * degraded: out; waiting for its reconnect timer (backoff).
 * fencing: out; its old connection is being drained (NBD_CMD_DISC, wait for the server's
 *   close) so no request of it can land later. Stays here until that is proven.
 * reconnecting: a reconnect attempt is under way.
 * faulty: parked after too many failures in the window; back only by `enbd leg reconnect`.
 * failed: out by the operator, or its actor thread died; back only by `enbd leg reconnect`.
 * removed: gone for good (its index may be reused by a new leg).
 */
export type LegState =
  | 'in-sync'
  | 'resyncing'
  | 'probation'
  | 'degraded'
  | 'fencing'
  | 'reconnecting'
  | 'faulty'
  | 'failed'
  | 'removed';

/** Every state, in display order (for metrics and status). */
export const kLegStates: readonly LegState[] = ['in-sync', 'resyncing', 'probation', 'degraded', 'fencing', 'reconnecting', 'faulty', 'failed', 'removed'];

/** The transition table: from -> the states it may move to. */
export const kLegTransitions: Readonly<Record<LegState, readonly LegState[]>> = {
  'in-sync': ['resyncing', 'fencing', 'failed', 'removed'],
  resyncing: ['in-sync', 'fencing', 'failed', 'removed'],
  probation: ['resyncing', 'in-sync', 'fencing', 'failed', 'removed'],
  degraded: ['reconnecting', 'fencing', 'failed', 'removed'],
  fencing: ['degraded', 'faulty', 'failed', 'removed'],
  reconnecting: ['probation', 'fencing', 'degraded', 'faulty', 'failed', 'removed'],
  faulty: ['reconnecting', 'fencing', 'failed', 'removed'],
  failed: ['reconnecting', 'fencing', 'removed'],
  removed: [],
};

export function isAdmitted(state: LegState): boolean {
  return state === 'in-sync' || state === 'resyncing';
}

export function canTransition(from: LegState, to: LegState): boolean {
  return kLegTransitions[from].includes(to);
}

export interface HealthPolicy {
  /** Failures within `failureWindowMs` that park a leg as faulty (0 = never). */
  maxFailures: number;
  failureWindowMs: number;
  /** Time in sync after which the reconnect backoff starts over. */
  stableMs: number;
}

export const kDefaultHealthPolicy: HealthPolicy = { maxFailures: 20, failureWindowMs: 3_600_000, stableMs: 30_000 };

const kRepeatWindowMs = 60_000;

/** What a leg's health needs to know of the leg (the engine's Leg satisfies it). */
export interface HealthSubject {
  readonly index: number;
  readonly uri: string;
  state: LegState;
  failureReason: string | null;
}

/** Per-leg health record: failure times, backoff attempts, log repeat counts. */
export class LegHealth {
  /** Reconnect attempts since the leg last stayed in sync for `stableMs`. */
  attempts = 0;
  private failureTimes: number[] = [];
  private inSyncSince = 0;
  private readonly repeats = new Map<string, { at: number; count: number }>();

  constructor(
    private readonly subject: HealthSubject,
    private readonly logger: Logger,
    private readonly policy: HealthPolicy,
  ) {}

  /**
   * The one way a leg's state changes: asserts the transition is allowed, records it, logs it
   * (repeats within a minute are counted, not logged, and summarised on the next line).
   */
  move(to: LegState, reason: string | null, fields: Record<string, unknown> = {}): void {
    const leg = this.subject;
    const from = leg.state;
    assert(canTransition(from, to), `leg ${leg.index}: no transition ${from} -> ${to}`);
    const now = Date.now();
    if (to === 'in-sync') this.inSyncSince = now;
    else if (from === 'in-sync') this.maybeStable(now);
    leg.state = to;
    // Back on the way in: no reason any more. Reconnecting keeps the reason it left with.
    if (to === 'in-sync' || to === 'resyncing' || to === 'probation') leg.failureReason = null;
    else if (to !== 'reconnecting' && reason !== null) leg.failureReason = reason;
    const key = `${from}>${to}`;
    const seen = this.repeats.get(key);
    if (seen !== undefined && now - seen.at < kRepeatWindowMs && to !== 'faulty' && to !== 'failed') {
      seen.count += 1;
      this.logger.debug({ leg: leg.index, from, to, reason, ...fields }, 'leg state (repeat)');
      return;
    }
    const repeated = seen?.count ?? 0;
    this.repeats.set(key, { at: now, count: 0 });
    const level = to === 'faulty' || to === 'failed' || to === 'fencing' ? 'warn' : 'info';
    this.logger[level]({ leg: leg.index, uri: leg.uri, from, to, reason, ...fields, ...(repeated > 0 ? { repeatsSinceLastLogged: repeated } : {}) }, `leg ${leg.index} ${to}`);
  }

  /** Records a failure; true when the leg failed too often and must be parked as faulty. */
  recordFailure(now = Date.now()): boolean {
    if (this.subject.state === 'in-sync') this.maybeStable(now);
    const windowStart = now - this.policy.failureWindowMs;
    this.failureTimes = this.failureTimes.filter((at) => at >= windowStart);
    this.failureTimes.push(now);
    return this.policy.maxFailures > 0 && this.failureTimes.length >= this.policy.maxFailures;
  }

  get recentFailures(): number {
    return this.failureTimes.length;
  }

  /** The operator brings the leg back: the slate is clean. */
  reset(): void {
    this.attempts = 0;
    this.failureTimes = [];
  }

  /** Leaving in-sync: if it stayed long enough, the backoff starts over. */
  private maybeStable(now: number): void {
    if (this.inSyncSince > 0 && now - this.inSyncSince >= this.policy.stableMs) this.attempts = 0;
    this.inSyncSince = 0;
  }

  /** Backoff delay for the next reconnect: min x 2^attempts, capped, jittered +-20 %. */
  nextDelayMs(minMs: number, maxMs: number): number {
    const base = Math.min(maxMs, minMs * 2 ** Math.min(this.attempts, 20));
    return Math.round(base * (0.8 + 0.4 * Math.random()));
  }
}
