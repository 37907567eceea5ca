/**
 * One leg of the mirror as the session master sees it: its state and health, its actor
 * (worker or inline) and queues, its dirty map ("chunks this leg missed") and its two
 * "unflushed" halves, its resync, its epoch. Plain data with a few derived getters; the rules
 * that change it live in mirror.ts (requests), leg-health.ts (states) and resync-copy.ts.
 *
 * Thread: main thread.
 *
 * Invariants:
 * - `state` changes only through LegHealth.move (the transition table), except the initial
 *   state of a leg being added (addLeg) or assembled from on-leg metadata (startKeeper).
 * Every field, its writer and (for the SAB-backed ones) its Atomics ops: ARCHITECTURE.md,
 * "The Leg record".
 * - `epoch` is bumped on every failure and return: a resync copy clears bits only within one.
 */
import type { Worker, MessagePort } from 'node:worker_threads';
import type { DirtyMap } from '../bitmap/dirty-map.js';
import type { SpscQueue } from '../ring/spsc-queue.js';
import { isAdmitted, type LegHealth, type LegState } from './leg-health.js';
import type { LegActor } from './leg-actor.js';
import type { LegActorApi, LegInfo } from './messages.js';
import type { Resync } from './resync.js';

export class Leg {
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
  /**
   * A FLUSH went to the leg while flushSlot's was still out: it did not swap halves, so the
   * writes in unflushed[current] it covered stay recorded. When flushSlot's settles, the engine
   * sends one more FLUSH if that half holds anything (else those bits would never clear).
   */
  flushSkipped = false;
  dropsSeen = 0;
  /** The lifecycle's failure sequence number of this leg's last failure (0 = never). */
  failedAtSeq = 0;
  /** Reconnect backoff, failure window, state transitions (src/engine/leg-health.ts). */
  health!: LegHealth;
  /** The reconnect timer (degraded) or the next fence attempt (fencing). */
  reconnectTimer: NodeJS.Timeout | null = null;
  /** Park the leg as faulty once its fence completes (too many failures in the window). */
  parkWhenFenced = false;
  resync: Resync | null = null;
  /** Bumped whenever the leg fails: a resync copy clears bits only within one epoch. */
  epoch = 0;
  failures = 0;
  /** Reconnect attempts since start (never reset, unlike the backoff's attempt count). */
  reconnects = 0;
  resyncedBytes = 0;
  /** Its stable name (src/engine/leg-names.ts), set right after construction. */
  name = '';
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
  get admitted(): boolean {
    return isAdmitted(this.state);
  }
  get reconnectAttempts(): number {
    return this.health.attempts;
  }
  get currentUnflushed(): DirtyMap | null {
    return this.unflushed?.[this.unflushedCurrent] ?? null;
  }
  /** The half a pending FLUSH covers. */
  get flushingUnflushed(): DirtyMap | null {
    return this.unflushed?.[this.unflushedCurrent ^ 1] ?? null;
  }
}
