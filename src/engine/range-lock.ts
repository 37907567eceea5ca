/**
 * Range lock for the session master: requests that change data (WRITE, TRIM, WRITE_ZEROES, and
 * later resync copies) and overlap each other are applied one after another in arrival order,
 * so every leg sees overlapping changes in the same order and the legs never diverge.
 * Non-overlapping requests are granted at once and stay fully parallel.
 *
 * Thread: main thread only (no Atomics; the master is the only user).
 *
 * Design notes
 * - Holders and waiters are identified by a small integer id (the ring slot of the request).
 * - `acquire` grants when the range overlaps no holder AND no earlier waiter (so a later
 *   request can never overtake an earlier overlapping one); otherwise it queues (FIFO).
 * - `release` re-scans the waiters in order and grants every one that now fits, writing the
 *   granted ids into a caller-owned Int32Array (no allocation). Only a waiter that overlaps the
 *   released range can become free: any other waiter is blocked by a holder that still holds
 *   or by an earlier waiter, which stays a waiter or is granted and becomes a holder; either
 *   way it still blocks. So the others are kept without a check (with write-behind hundreds of
 *   shadows hold ranges while a few dozen wait: checking each waiter against every holder on
 *   every release was the master's largest cost).
 * Cost: acquire O(holders + waiters); release O(waiters + holders per waiter that overlaps the
 *   released range); a holder's position is kept, so removing it is O(1).
 *
 * - `acquireNext` queues a request at the head of the waiters: one that must run right after
 *   the holder of its range, ahead of every request already waiting (a write-behind shadow
 *   behind its client write: it comes from that write, so it is ordered before anything that
 *   arrived after the write, even what queued while the write waited or held the lock).
 *
 * Invariants:
 * - No two holders overlap.
 * - For any two overlapping requests, the one that called acquire first is granted first;
 *   a request queued by acquireNext counts as having called acquire just after the holder
 *   it overlaps (every waiter overlapping it arrived after that holder was granted: an
 *   earlier one would have been granted first).
 */
import { assert } from '../core/assert.js';

export class RangeLock {
  private readonly startBytes: Float64Array;
  private readonly endBytes: Float64Array;
  private readonly state: Uint8Array; // 0 none, 1 holder, 2 waiter
  private readonly holders: Int32Array;
  /** id -> its index in `holders` while it holds. */
  private readonly holderAt: Int32Array;
  private holderCount = 0;
  private readonly waiters: Int32Array;
  private waiterCount = 0;

  constructor(readonly capacity: number) {
    assert(Number.isInteger(capacity) && capacity > 0, 'range lock capacity is a positive integer');
    this.startBytes = new Float64Array(capacity);
    this.endBytes = new Float64Array(capacity);
    this.state = new Uint8Array(capacity);
    this.holders = new Int32Array(capacity);
    this.holderAt = new Int32Array(capacity);
    this.waiters = new Int32Array(capacity);
  }

  get held(): number {
    return this.holderCount;
  }

  get waiting(): number {
    return this.waiterCount;
  }

  private overlaps(id: number, other: number): boolean {
    const start = this.startBytes[id] ?? 0;
    const end = this.endBytes[id] ?? 0;
    const otherStart = this.startBytes[other] ?? 0;
    const otherEnd = this.endBytes[other] ?? 0;
    if (start === end || otherStart === otherEnd) return false;
    return start < otherEnd && otherStart < end;
  }

  private overlapsHolder(id: number): boolean {
    for (let index = 0; index < this.holderCount; index += 1) {
      if (this.overlaps(id, this.holders[index] ?? 0)) return true;
    }
    return false;
  }

  /** Returns true when granted now; false when queued behind an overlapping request. */
  acquire(id: number, offsetBytes: number, lengthBytes: number): boolean {
    assert(id >= 0 && id < this.capacity && this.state[id] === 0, 'range lock id is free');
    assert(offsetBytes >= 0 && lengthBytes >= 0, 'range is non-negative');
    this.startBytes[id] = offsetBytes;
    this.endBytes[id] = offsetBytes + lengthBytes;
    let blocked = this.overlapsHolder(id);
    for (let index = 0; !blocked && index < this.waiterCount; index += 1) {
      blocked = this.overlaps(id, this.waiters[index] ?? 0);
    }
    if (blocked) {
      this.state[id] = 2;
      this.waiters[this.waiterCount] = id;
      this.waiterCount += 1;
      return false;
    }
    this.state[id] = 1;
    this.addHolder(id);
    return true;
  }

  private addHolder(id: number): void {
    this.holderAt[id] = this.holderCount;
    this.holders[this.holderCount] = id;
    this.holderCount += 1;
  }

  /**
   * Queues `id` at the head of the waiters, behind the holder its range overlaps (asserted:
   * it is never granted at once). For a request that must follow that holder directly.
   */
  acquireNext(id: number, offsetBytes: number, lengthBytes: number): void {
    assert(id >= 0 && id < this.capacity && this.state[id] === 0, 'range lock id is free');
    assert(offsetBytes >= 0 && lengthBytes > 0, 'range is non-empty');
    this.startBytes[id] = offsetBytes;
    this.endBytes[id] = offsetBytes + lengthBytes;
    assert(this.overlapsHolder(id), 'acquireNext follows a holder of its range');
    this.waiters.copyWithin(1, 0, this.waiterCount);
    this.waiters[0] = id;
    this.waiterCount += 1;
    this.state[id] = 2;
  }

  /** Releases a holder; writes newly granted ids into `granted` and returns how many. */
  release(id: number, granted: Int32Array): number {
    assert(this.state[id] === 1, 'only a holder releases');
    const found = this.holderAt[id] ?? -1;
    assert(found >= 0 && found < this.holderCount && this.holders[found] === id, 'holder is listed');
    this.holderCount -= 1;
    const moved = this.holders[this.holderCount] ?? 0;
    this.holders[found] = moved;
    this.holderAt[moved] = found;
    this.state[id] = 0;
    if (this.waiterCount === 0) return 0;
    let grantedCount = 0;
    let kept = 0;
    for (let index = 0; index < this.waiterCount; index += 1) {
      const waiter = this.waiters[index] ?? 0;
      // A waiter clear of the released range stays blocked (see the header): kept unchecked.
      let blocked = !this.overlaps(waiter, id) || this.overlapsHolder(waiter);
      for (let earlier = 0; !blocked && earlier < kept; earlier += 1) {
        blocked = this.overlaps(waiter, this.waiters[earlier] ?? 0);
      }
      if (blocked) {
        this.waiters[kept] = waiter;
        kept += 1;
      } else {
        this.state[waiter] = 1;
        this.addHolder(waiter);
        granted[grantedCount] = waiter;
        grantedCount += 1;
      }
    }
    this.waiterCount = kept;
    return grantedCount;
  }
}
