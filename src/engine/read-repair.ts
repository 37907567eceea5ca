/**
 * Read-error repair (md's read-error correction): a leg that answered a client READ with EIO
 * keeps its place in the mirror; the range is marked in its dirty map and rewritten from a leg
 * that holds it, by the resync machinery (under the range lock, so the rewrite never races a
 * client write). The read itself is served from another leg by the caller, as before.
 *
 * Thread: main thread (called from the session master's read retry).
 *
 * Design notes
 * - Only EIO from an admitted leg is repaired: a drop (ESHUTDOWN), a timeout or an error of a
 *   leg that is not admitted fails the leg as before (the caller's path).
 * - An in-sync leg moves to `resyncing` ("in-sync -> resyncing" exists for this, see
 *   kLegTransitions): it keeps taking writes, serves reads only where its map is clean, and its
 *   Resync copies the marked range from an up-to-date leg (src/engine/resync.ts); when the map
 *   is clean again it is in sync. A copy whose WRITE fails fails the leg (degraded), exactly as
 *   any resync copy does (resync-copy.ts).
 * - With on-leg metadata the state change is a member-table change: the keeper makes the
 *   range's write-intent bits durable and records the leg as needing a resync.
 *
 * Invariants:
 * - A range is marked only when another leg holds it (markUnlessSole): a leg's read error never
 *   makes the only copy of a range unreadable; the caller then fails the leg as before.
 * - `repairs[i]` counts the repairs started on leg i (status, enbd_leg_read_repairs_total).
 */
import type { Logger } from '../core/log.js';
import { kMaxLegs } from '../ring/layout.js';
import type { Leg } from './leg.js';
import type { LegState } from './leg-health.js';

export interface ReadRepairHost {
  /** Marks the leg's range unless no other leg holds it; false: not marked. */
  markUnlessSole(leg: Leg, offsetBytes: number, lengthBytes: number): boolean;
  move(leg: Leg, to: LegState, reason: string | null, fields?: Record<string, unknown>): void;
  startResync(leg: Leg): void;
}

export class ReadRepair {
  /** Repairs started per leg since start. */
  readonly repairs = new Float64Array(kMaxLegs);

  constructor(private readonly host: ReadRepairHost, private readonly logger: Logger) {}

  /**
   * Leg `leg` failed a READ of the range with `legErrno`. True: the range is being rewritten
   * on it (the leg stays admitted); false: the caller fails the leg as before.
   */
  start(leg: Leg, offsetBytes: number, lengthBytes: number, legErrno: number, eio: number): boolean {
    if (legErrno !== eio || !leg.admitted) return false;
    if (!this.host.markUnlessSole(leg, offsetBytes, lengthBytes)) return false;
    this.repairs[leg.index] = (this.repairs[leg.index] ?? 0) + 1;
    this.logger.warn({ leg: leg.index, offsetBytes, lengthBytes, repairs: this.repairs[leg.index] }, 'read error: the read is served by another leg and the range rewritten on this one');
    if (leg.state === 'in-sync') this.host.move(leg, 'resyncing', null, { why: `read error at ${offsetBytes}+${lengthBytes}: rewriting the range from another leg` });
    this.host.startResync(leg);
    return true;
  }

  resetLeg(index: number): void {
    this.repairs[index] = 0;
  }
}
