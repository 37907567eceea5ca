/**
 * The visited mask: how N leg actors agree, without locks, which one of them finishes a request
 * (the seed design's "small bitmap of where it's been", carried by the request itself).
 *
 * Threads: `ackSlot` runs on any actor thread (one call per leg per dispatch); `resetMasks` and
 * `abandonLeg` run on the master only.
 *
 * Words touched (slot descriptor, see layout.ts):
 *   kSlotLegErrnoBase + leg  Atomics.store by the leg's actor, first (failure only)
 *   kSlotErrno               Atomics.compareExchange(0 -> errno): first failure wins
 *   kSlotFailedMask          Atomics.or(bit), before the visited or (failure only)
 *   kSlotVisitedMask         Atomics.or(bit): the ack itself, always last
 *   kSlotTargetMask          read only (written by the master before dispatch)
 *
 * Exactly one completer: every leg in targetMask acks once (double ack is asserted). Atomics.or
 * is an atomic read-modify-write returning the previous value, so the ors on one word form a
 * total order; exactly one of them observes prev | bit === target (the last one in that order)
 * and returns true. That actor hands the slot back to the master.
 *
 * Ordering: the completer's Atomics.or on visited comes after every other leg's failed/errno
 * writes in the total order of SC atomics (each leg wrote those before its own visited or), so
 * when the completer (or the master, after the completion-queue hand-off) reads failedMask and
 * the errno words, they are final. The same holds for READ data written by the read leg.
 */

import { assert } from '../core/assert.js';
import {
  kMaxLegs,
  kSlotErrno,
  kSlotFailedMask,
  kSlotLegErrnoBase,
  kSlotState,
  kSlotStateDispatched,
  kSlotTargetMask,
  kSlotVisitedMask,
} from './layout.js';
import type { RequestRing } from './request-ring.js';

/**
 * Actor: record leg `legIndex`'s (0..30; the bit is 1 << legIndex) outcome for `slot`.
 * `errno` is the leg's NBD errno, > 0 iff `failed`. Returns true iff this ack completed the
 * target mask (exactly one acker per dispatch gets true).
 */
export function ackSlot(
  ring: RequestRing,
  slot: number,
  legIndex: number,
  failed: boolean,
  errno: number,
): boolean {
  assert(Number.isInteger(legIndex) && legIndex >= 0 && legIndex < kMaxLegs, 'leg index 0..30');
  assert(failed ? errno > 0 : errno === 0, 'errno > 0 exactly when failed');
  const control = ring.control;
  const base = ring.word(slot, 0);
  const state = Atomics.load(control, base + kSlotState);
  assert(state === kSlotStateDispatched, 'ack a dispatched slot');
  const bit = 1 << legIndex;
  const target = Atomics.load(control, base + kSlotTargetMask);
  assert((target & bit) !== 0, 'acking leg is in the target mask');
  if (failed) {
    Atomics.store(control, base + kSlotLegErrnoBase + legIndex, errno);
    Atomics.compareExchange(control, base + kSlotErrno, 0, errno);
    Atomics.or(control, base + kSlotFailedMask, bit);
  }
  const previous = Atomics.or(control, base + kSlotVisitedMask, bit);
  assert((previous & bit) === 0, 'each leg acks a dispatch once');
  assert((previous & ~target) === 0, 'visited stays within the target');
  return (previous | bit) === target;
}

/** Master, before (re)dispatch: target = targetMask, everything else cleared. */
export function resetMasks(ring: RequestRing, slot: number, targetMask: number): void {
  ring.resetMasks(slot, targetMask);
  assert(ring.visitedMask(slot) === 0, 'visited cleared');
  assert(ring.targetMask(slot) === targetMask, 'target set');
}

/** True when every target leg has acked the current dispatch of `slot`. */
export function isComplete(ring: RequestRing, slot: number): boolean {
  const target = ring.targetMask(slot);
  return target !== 0 && ring.visitedMask(slot) === target;
}

/**
 * Master, after leg `legIndex`'s actor is gone (worker exited, connection lost and its queue
 * abandoned): ack on its behalf as failed with `errno` if it had not acked yet. Precondition:
 * that actor can no longer ack (so the visited test cannot race with it). Returns true iff this
 * completed the request - then the master finishes it itself (no actor will hand it back).
 */
export function abandonLeg(
  ring: RequestRing,
  slot: number,
  legIndex: number,
  errno: number,
): boolean {
  assert(ring.isMaster, 'abandonLeg is master-only');
  assert(errno > 0, 'abandoning a leg reports an errno');
  const bit = 1 << legIndex;
  if ((ring.targetMask(slot) & bit) === 0) return false;
  if ((ring.visitedMask(slot) & bit) !== 0) return false;
  return ackSlot(ring, slot, legIndex, true, errno);
}
