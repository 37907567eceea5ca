/**
 * Which up-to-date leg serves a READ (or CACHE, or a block-status query): the read policy,
 * write-mostly legs, and the per-leg read counters and latency estimate the policies use.
 *
 * Thread: main thread (the session master calls `pick` for every read and `onReadDone` for
 * every read that completed).
 *
 * Design notes
 * | policy          | picks, among the eligible legs                                          |
 * |-----------------|--------------------------------------------------------------------------|
 * | least-pending   | the fewest requests in flight (ties: rotating start) — the default       |
 * | round-robin     | the next one after the last leg picked                                   |
 * | primary         | the lowest index (the first in-sync leg)                                 |
 * | latency         | the lowest expected completion time: the EWMA (alpha 1/8) of read        |
 * |                 | completion time scaled by the leg's queue now over its queue when the    |
 * |                 | samples were taken (EWMA of in flight + 1 at completion), so a burst     |
 * |                 | spreads per pick instead of all going to the leg that looked fastest     |
 * |                 | before its estimate could rise; legs within 1.25x of the lowest count as |
 * |                 | equal and the fewest in flight wins among them; a                        |
 * |                 | leg not sampled for 250 ms is picked once and that sample replaces its   |
 * |                 | estimate (a leg that got faster, or one measured under a burst, is seen  |
 * |                 | again); a leg without a sample yet counts as fastest; one                |
 * |                 | sample raises the estimate at most 4x (a GC pause is not a slow leg)     |
 * "Eligible" is decided by the caller (up to date for the whole range, not excluded by an earlier
 * attempt). Write-mostly legs are eligible only when no other leg is: they are chosen in a second
 * pass, with the same policy.
 *
 * Invariants:
 * - `pick` never returns a leg the caller's predicate rejected: correctness (which legs hold the
 *   range) stays in mirror.ts; this module only orders the legs that may serve.
 * - A write-mostly leg serves a read only when no eligible leg that is not write-mostly exists.
 */
import { kMaxLegs } from '../ring/layout.js';
import { EnbdError } from '../core/errors.js';

export const kReadPolicies = ['least-pending', 'round-robin', 'primary', 'latency'] as const;
export type ReadPolicyName = (typeof kReadPolicies)[number];

export function parseReadPolicy(option: string, value: string): ReadPolicyName {
  if ((kReadPolicies as readonly string[]).includes(value)) return value as ReadPolicyName;
  throw new EnbdError('ENBD_ERR_CONFIG', `${option} must be one of ${kReadPolicies.join(', ')}, got "${value}"`);
}

/** What the policy needs to know of a leg. */
export interface ReadCandidate {
  readonly index: number;
  readonly bit: number;
  readonly inFlight: number;
}

const kEwmaWeight = 1 / 8;
/** A leg whose latency estimate is older than this is picked once to refresh it (latency policy). */
const kStaleSampleMs = 250;
/** One sample moves the estimate up by at most this factor (a GC pause is not a slow leg). */
const kSampleClamp = 4;
/** Legs whose latency estimate is within this factor of the lowest count as equally fast. */
const kLatencyBand = 1.25;

export class ReadChooser {
  policy: ReadPolicyName;
  /** Bit i: leg i is write-mostly. */
  writeMostlyMask = 0;
  /** Reads each leg served (completed without error), by leg index. */
  readonly reads = new Float64Array(kMaxLegs);
  /** Read completion time estimate per leg (ms); 0 = no sample yet. */
  readonly latencyMs = new Float64Array(kMaxLegs);
  private readonly sampledAt = new Float64Array(kMaxLegs);
  /** EWMA of the leg's requests in flight + 1 when its read samples completed (latency policy). */
  private readonly sampledQueue = new Float64Array(kMaxLegs);
  /** 1 while a probe read of a stale estimate is out: its sample replaces the estimate. */
  private readonly probing = new Uint8Array(kMaxLegs);
  private spread = 0;

  constructor(policy: ReadPolicyName = 'least-pending', writeMostly: readonly number[] = []) {
    this.policy = policy;
    for (const index of writeMostly) this.writeMostlyMask |= 1 << index;
  }

  isWriteMostly(index: number): boolean {
    return (this.writeMostlyMask & (1 << index)) !== 0;
  }

  /**
   * The leg to read from among `legs` that `eligible` accepts, or null: first among the legs
   * that are not write-mostly, then among the write-mostly ones.
   */
  pick<L extends ReadCandidate>(legs: readonly L[], eligible: (leg: L) => boolean, now: number = performance.now()): L | null {
    const count = legs.length;
    if (count === 0) return null;
    this.spread = (this.spread + 1) % count;
    return this.pickAmong(legs, eligible, false, now) ?? (this.writeMostlyMask === 0 ? null : this.pickAmong(legs, eligible, true, now));
  }

  private pickAmong<L extends ReadCandidate>(legs: readonly L[], eligible: (leg: L) => boolean, writeMostly: boolean, now: number): L | null {
    const count = legs.length;
    let best: L | null = null;
    let bestScore = Infinity;
    const start = this.policy === 'primary' ? 0 : this.spread;
    for (let step = 0; step < count; step += 1) {
      const leg = legs[(start + step) % count] as L;
      if (((this.writeMostlyMask & leg.bit) !== 0) !== writeMostly || !eligible(leg)) continue;
      switch (this.policy) {
        case 'primary':
        case 'round-robin':
          return leg;
        case 'least-pending':
          if (leg.inFlight < bestScore) {
            best = leg;
            bestScore = leg.inFlight;
          }
          break;
        case 'latency': {
          const estimate = this.latencyMs[leg.index] ?? 0;
          if (estimate > 0 && now - (this.sampledAt[leg.index] ?? 0) > kStaleSampleMs) {
            // One probe read refreshes a stale estimate; the next sample (or 1 s) re-arms it.
            this.sampledAt[leg.index] = now;
            this.probing[leg.index] = 1;
            return leg;
          }
          const expected = this.expectedMs(leg);
          if (expected < bestScore) {
            best = leg;
            bestScore = expected;
          }
          break;
        }
      }
    }
    if (this.policy !== 'latency' || best === null) return best;
    // Among the legs about as fast as the fastest, the least loaded.
    const limit = bestScore * kLatencyBand;
    for (const leg of legs) {
      if (leg === best || ((this.writeMostlyMask & leg.bit) !== 0) !== writeMostly || this.expectedMs(leg) > limit) continue;
      if (leg.inFlight < best.inFlight && eligible(leg)) best = leg;
    }
    return best;
  }

  /**
   * Expected completion time of one more read on the leg (latency policy): its estimate scaled
   * by its queue now (in flight + 1) over its queue when sampled; 0 without a sample.
   */
  private expectedMs(leg: ReadCandidate): number {
    const estimate = this.latencyMs[leg.index] ?? 0;
    if (estimate === 0) return 0;
    return (estimate * (leg.inFlight + 1)) / Math.max(1, this.sampledQueue[leg.index] ?? 1);
  }

  /**
   * A read served by leg `index` completed after `elapsedMs`; `inFlight` is the leg's requests
   * still in flight then (the queue the sample saw, roughly).
   */
  onReadDone(index: number, elapsedMs: number, now: number = performance.now(), inFlight = 0): void {
    this.reads[index] = (this.reads[index] ?? 0) + 1;
    const previous = this.latencyMs[index] ?? 0;
    const fresh = previous === 0 || this.probing[index] === 1;
    this.probing[index] = 0;
    const sample = fresh ? Math.max(elapsedMs, 1e-3) : Math.min(Math.max(elapsedMs, 1e-3), previous * kSampleClamp);
    // A probe's sample is a fresh look at a leg nobody read for a while: it replaces the estimate.
    this.latencyMs[index] = fresh ? sample : previous + (sample - previous) * kEwmaWeight;
    const queue = Math.max(0, inFlight) + 1;
    const queued = this.sampledQueue[index] ?? 0;
    this.sampledQueue[index] = fresh || queued === 0 ? queue : queued + (queue - queued) * kEwmaWeight;
    this.sampledAt[index] = now;
  }

  /** A leg index is reused (leg removed, another added): its counters start over. */
  resetLeg(index: number): void {
    this.reads[index] = 0;
    this.latencyMs[index] = 0;
    this.sampledAt[index] = 0;
    this.sampledQueue[index] = 0;
    this.probing[index] = 0;
  }
}
