/**
 * Write-behind for write-mostly legs (md's --write-behind): a client WRITE is acknowledged once
 * every other admitted leg answered it; an in-sync write-mostly leg gets the same bytes from a
 * "shadow" request that may finish later, up to a bound of bytes outstanding per leg.
 *
 * Thread: main thread (the session master calls the hooks under its range lock discipline).
 *
 * Request path
 *   settleWriteTarget (the client WRITE holds the range lock of its chunks, its bits are durable
 *   in the write-intent bitmap): `defer` takes each write-mostly leg out of the target, copies
 *   the payload into a shadow run of ring slots (phase 6) and queues the shadow on the range
 *   lock behind the client write; the master then marks the range in the leg's dirty map (it is
 *   not targeted), before any leg can answer: exactly like a leg that missed the write.
 *   client WRITE completes -> `onMainDone` (before its range lock is released): failed (EIO to
 *   the client) cancels its shadows; then the release grants the shadow -> `prepare` (leg still
 *   admitted in the same epoch? else finished unsent) -> the leg's actor writes it.
 *   shadow completes -> `onShadowDone`: ok within the epoch -> the chunks' bits are cleared on the
 *   leg (it holds the range again), the write is recorded as unflushed there; failed -> the leg
 *   fails (its bits stay: it resyncs them when it returns). The shadow's range lock is released.
 *
 * Design notes
 * - The leg counts as up to date for a range only where its dirty map is clean while it has
 *   write-behind (mirror.ts upToDateFor): it never serves a read of a range still behind, and a
 *   write's success (S1) never counts on it.
 * - Bound: a write is deferred only while the leg's outstanding bytes stay <= the bound and
 *   the shadows together hold at most a quarter of the ring's slots (clients never starve for
 *   slots); beyond either, the write goes to the leg synchronously (it is acknowledged only when
 *   the slow leg has it too), which throttles the writers to the slow leg's pace.
 * - Ordering: a shadow takes the range lock of its client write's chunks at once (queued behind
 *   the client write), so a later overlapping write, resync copy or shadow waits for it.
 * - Only WRITE is deferred (it has a payload to copy); TRIM/WRITE_ZEROES go synchronously.
 *
 * Invariants:
 * - A deferred range is marked in the leg's dirty map before the client write is dispatched,
 *   and cleared only by its own shadow's success within the leg's epoch, under the shadow's
 *   range lock (S3's rule for resync copies); with on-leg metadata the chunk's write-intent bit
 *   stays set while any dirty map marks it (the keeper's W2), so a crash never loses the range.
 * - A shadow of a client write that failed is never sent; its marks on a leg still in its epoch
 *   are taken back before the failure's marks are settled (the leg holds the version from before
 *   the write, a valid answer for a failed write, and may be the best copy left).
 * - `behindBytes[i]` is the sum of the lengths of leg i's live shadows.
 */
import { assert } from '../core/assert.js';
import type { Logger } from '../core/log.js';
import * as p from '../nbd/protocol.js';
import { errnoNames } from '../nbd/protocol-names.js';
import { kMaxLegs } from '../ring/layout.js';
import type { RequestRing } from '../ring/request-ring.js';
import type { Leg } from './leg.js';
import type { LegState } from './leg-health.js';
import type { SlotTable } from './slot-table.js';

/** The slot phase of a shadow write (0 client, 1/2 resync copy, 3 metadata, 4/5 verify; src/engine/slot-table.ts). */
export const kShadowPhase = 6;

export interface WriteBehindHost {
  readonly ring: RequestRing;
  readonly slots: SlotTable;
  readonly legs: readonly Leg[];
  /** Binds an internal token to the run (the engine's request count goes up). */
  bindInternal(slot: number, span: number): void;
  /** Takes the range lock of the whole chunks of the range; true = granted now. */
  lockChunks(slot: number, offsetBytes: number, lengthBytes: number): boolean;
  dispatch(slot: number): void;
  /** Releases the slot's range lock and finishes it (frees the run). */
  releaseAndFinish(slot: number): void;
  failLeg(leg: Leg, reason: string): void;
  move(leg: Leg, to: LegState, reason: string | null, fields?: Record<string, unknown>): void;
  startResync(leg: Leg): void;
  recordUnflushed(slot: number, mask: number): void;
  /** True when some non-removed leg's dirty map is clean over the range. */
  anyClean(offsetBytes: number, lengthBytes: number): boolean;
  chunkBytes(): number;
  sizeBytes(): number;
}

export class WriteBehind {
  /** Bytes of live shadows per leg. */
  readonly behindBytes = new Float64Array(kMaxLegs);
  /** Writes acknowledged before the write-mostly leg had them, per leg, since start. */
  readonly deferredWrites = new Float64Array(kMaxLegs);
  /** Writes sent to the leg synchronously because the bound (or the slot share) was reached. */
  readonly boundHits = new Float64Array(kMaxLegs);
  private shadowSlots = 0;
  private readonly maxShadowSlots: number;
  /** Client write slot -> its shadow slots (until the client write completes). */
  private readonly shadowsOf = new Map<number, number[]>();
  /** Shadow slot -> 1 while cancelled (its client write failed). */
  private readonly cancelled: Uint8Array;
  /** Legs whose cancelled shadows' marks were taken back, for settleFailed (a bit mask). */
  private recheck = 0;
  /** Every live shadow slot. */
  private readonly live = new Set<number>();
  /**
   * Legs marked only because a live shadow was to hold the range (markUnlessSole while they
   * left): if that shadow does not land, and no leg is clean there, their copy counts again.
   */
  private provisional: Array<{ leg: Leg; start: number; end: number }> = [];

  constructor(
    private readonly host: WriteBehindHost,
    readonly boundBytes: number,
    readonly writeMostlyMask: number,
    private readonly logger: Logger,
  ) {
    this.maxShadowSlots = Math.max(1, Math.floor(host.ring.slotCount / 4));
    this.cancelled = new Uint8Array(host.ring.slotCount);
  }

  /** True when the leg's reads and up-to-date status must consult its dirty map while in sync. */
  appliesTo(leg: Leg): boolean {
    return (this.writeMostlyMask & leg.bit) !== 0;
  }

  /**
   * Under the client write's range lock, at dispatch: the legs of `target` whose copy is
   * deferred to a shadow (the caller takes them out of the target and marks them). `upToDate`:
   * the legs up to date for the whole range; a leg is deferred only while another up-to-date
   * leg that is not write-mostly stays in the target (S1 then rests on it).
   */
  defer(slot: number, target: number, upToDate: number): number {
    const ring = this.host.ring;
    if (ring.command(slot) !== p.kCmdWrite || (upToDate & target & ~this.writeMostlyMask) === 0) return 0;
    const offsetBytes = ring.offsetBytes(slot);
    const lengthBytes = ring.lengthBytes(slot);
    let deferred = 0;
    for (const leg of this.host.legs) {
      if ((target & leg.bit & this.writeMostlyMask) === 0 || leg.state !== 'in-sync') continue;
      const span = ring.slotsFor(lengthBytes);
      if ((this.behindBytes[leg.index] ?? 0) + lengthBytes > this.boundBytes || this.shadowSlots + span > this.maxShadowSlots) {
        this.boundHits[leg.index] = (this.boundHits[leg.index] ?? 0) + 1;
        continue;
      }
      const shadow = ring.allocate(span);
      if (shadow < 0) {
        this.boundHits[leg.index] = (this.boundHits[leg.index] ?? 0) + 1;
        continue;
      }
      ring.dataView(shadow, lengthBytes).set(ring.dataView(slot, lengthBytes));
      this.host.bindInternal(shadow, span);
      const slots = this.host.slots;
      slots.phase[shadow] = kShadowPhase;
      slots.kind[shadow] = -1;
      slots.epoch[shadow] = leg.epoch;
      this.cancelled[shadow] = 0;
      ring.setRequest(shadow, p.kCmdWrite, ring.flags(slot), offsetBytes, lengthBytes, span, leg.bit);
      this.shadowSlots += span;
      this.behindBytes[leg.index] = (this.behindBytes[leg.index] ?? 0) + lengthBytes;
      this.deferredWrites[leg.index] = (this.deferredWrites[leg.index] ?? 0) + 1;
      let list = this.shadowsOf.get(slot);
      if (list === undefined) {
        list = [];
        this.shadowsOf.set(slot, list);
      }
      list.push(shadow);
      this.live.add(shadow);
      deferred |= leg.bit;
      // Queued behind the client write (it holds these chunks), ahead of any later request.
      const granted = this.host.lockChunks(shadow, offsetBytes, lengthBytes);
      assert(!granted, 'a shadow queues behind its client write');
    }
    return deferred;
  }

  /** The client write completed (before its range lock is released); `ok`: acknowledged. */
  onMainDone(slot: number, ok: boolean): void {
    const list = this.shadowsOf.get(slot);
    if (list === undefined) return;
    this.shadowsOf.delete(slot);
    if (ok) return;
    for (const shadow of list) {
      this.cancelled[shadow] = 1;
      const leg = this.legOf(shadow);
      if (leg === null) continue;
      if (leg.admitted && leg.epoch === this.host.slots.epoch[shadow]) {
        // The client write failed, so either version of its range is a valid answer, and the
        // leg still holds the one from before it: its marks for this shadow (it was in sync
        // when the write was deferred) are taken back, except where a live shadow of the leg
        // still covers a chunk. The failure's marks are settled next (onWriteFailures), with
        // this leg clean and so eligible as the reference: the other legs, which may have lost
        // their unflushed writes with a server crash, are copied from it, never the reverse
        // (the model test found the reverse losing acknowledged writes).
        const [start, end] = this.chunkExtent(shadow);
        const chunk = this.host.chunkBytes();
        for (let at = start; at < end; at += chunk) {
          if (!this.otherShadowCovers(shadow, leg.bit, at, true)) leg.dirty?.clearRange(at, Math.min(chunk, end - at));
        }
        this.recheck |= leg.bit;
      } else if (leg.state === 'in-sync') {
        // Out of its epoch: the marks stay (never cleared while a leg is out); it resyncs them.
        this.host.move(leg, 'resyncing', null, { why: 'a write it was behind on failed on the other legs: the range is copied from the reference' });
        this.host.startResync(leg);
      }
    }
  }

  /**
   * After a failed write's marks were settled (onWriteFailures): a leg whose shadow marks were
   * taken back but which was not picked as the reference is marked again there; it resyncs
   * the range from the reference.
   */
  settleFailed(offsetBytes: number, lengthBytes: number): void {
    const mask = this.recheck;
    this.recheck = 0;
    if (mask === 0) return;
    for (const leg of this.host.legs) {
      if ((mask & leg.bit) === 0 || leg.state !== 'in-sync') continue;
      if (leg.dirty?.testRange(offsetBytes, lengthBytes) !== true) continue;
      this.host.move(leg, 'resyncing', null, { why: 'a write it was behind on failed on the other legs: the range is copied from the reference' });
      this.host.startResync(leg);
    }
  }

  /** The shadow's range lock was granted: false = finished without sending. */
  prepare(shadow: number): boolean {
    const leg = this.legOf(shadow);
    if (this.cancelled[shadow] === 1 || leg === null || !leg.admitted || leg.epoch !== this.host.slots.epoch[shadow]) {
      this.finish(shadow, leg);
      return false;
    }
    return true;
  }

  /** The shadow's WRITE was answered (`failed`: the leg's bit if it failed). */
  onShadowDone(shadow: number, failed: number): void {
    const ring = this.host.ring;
    const leg = this.legOf(shadow);
    if (leg !== null) {
      if (failed !== 0) {
        const errno = ring.legErrno(shadow, leg.index);
        this.host.failLeg(leg, `WRITE (write-behind) failed with ${errnoNames[errno] ?? errno}`);
      } else if (leg.admitted && leg.epoch === this.host.slots.epoch[shadow]) {
        if ((ring.flags(shadow) & p.kCmdFlagFua) === 0) this.host.recordUnflushed(shadow, leg.bit);
        // The chunks it covers, except those a later shadow of this leg still covers (a write
        // to other bytes of the chunk, queued behind this one, marked them again).
        const [start, end] = this.chunkExtent(shadow);
        const chunk = this.host.chunkBytes();
        for (let at = start; at < end; at += chunk) {
          if (!this.otherShadowCovers(shadow, leg.bit, at)) leg.dirty?.clearRange(at, Math.min(chunk, end - at));
        }
        this.finish(shadow, leg, true);
        return;
      }
    }
    this.finish(shadow, leg);
  }

  /** True while any shadow is live. */
  get idle(): boolean {
    return this.shadowSlots === 0;
  }

  /** Total bytes behind over all legs. */
  totalBehindBytes(): number {
    let total = 0;
    for (const bytes of this.behindBytes) total += bytes;
    return total;
  }

  /** The whole dirty-map chunks the shadow's range touches, [start, end) in bytes. */
  private chunkExtent(shadow: number): [number, number] {
    const ring = this.host.ring;
    const chunk = this.host.chunkBytes();
    const offsetBytes = ring.offsetBytes(shadow);
    const start = Math.floor(offsetBytes / chunk) * chunk;
    const end = Math.min(this.host.sizeBytes(), Math.ceil((offsetBytes + ring.lengthBytes(shadow)) / chunk) * chunk);
    return [start, end];
  }

  /** A live, uncancelled shadow of `leg` covers the dirty-map chunk at `chunkAt`. */
  shadowCovers(leg: Leg, chunkAt: number): boolean {
    for (const shadow of this.live) {
      if (this.cancelled[shadow] === 1 || this.host.ring.targetMask(shadow) !== leg.bit || leg.epoch !== this.host.slots.epoch[shadow]) continue;
      const [start, end] = this.chunkExtent(shadow);
      if (chunkAt >= start && chunkAt < end) return true;
    }
    return false;
  }

  private otherShadowCovers(shadow: number, bit: number, chunkAt: number, skipCancelled = false): boolean {
    for (const other of this.live) {
      if (other === shadow || this.host.ring.targetMask(other) !== bit) continue;
      if (skipCancelled && this.cancelled[other] === 1) continue;
      const [start, end] = this.chunkExtent(other);
      if (chunkAt >= start && chunkAt < end) return true;
    }
    return false;
  }

  private legOf(shadow: number): Leg | null {
    const target = this.host.ring.targetMask(shadow);
    if (target === 0) return null;
    return this.host.legs[31 - Math.clz32(target)] ?? null;
  }

  /** `leg` was marked over [start, end) on the strength of live shadows (see `provisional`). */
  markedOnShadows(leg: Leg, start: number, end: number): void {
    this.provisional.push({ leg, start, end });
  }

  /**
   * A shadow will not land: where no leg is clean any more and no live shadow covers the chunk,
   * the leg that was marked on the strength of shadows holds the best copy (it held the write
   * when it left): its bit is cleared there, as if it had never been marked (the rule for a
   * leg's unflushed writes that no other leg holds).
   */
  private unmarkProvisional(shadow: number): void {
    if (this.provisional.length === 0) return;
    const [start, end] = this.chunkExtent(shadow);
    const chunk = this.host.chunkBytes();
    for (const record of this.provisional) {
      const from = Math.max(start, record.start);
      const to = Math.min(end, record.end);
      for (let at = Math.floor(from / chunk) * chunk; at < to; at += chunk) {
        const piece = Math.min(chunk, this.host.sizeBytes() - at);
        if (this.host.anyClean(at, piece) || this.anyLiveCovers(at)) continue;
        record.leg.dirty?.clearRange(at, piece);
        this.logger.warn({ leg: record.leg.index, offsetBytes: at }, 'write-behind: the write-mostly leg will not get a range it was behind on and no leg is clean there: the leg that held it when it left counts');
      }
    }
  }

  private anyLiveCovers(chunkAt: number): boolean {
    for (const shadow of this.live) {
      if (this.cancelled[shadow] === 1) continue;
      const [start, end] = this.chunkExtent(shadow);
      if (chunkAt >= start && chunkAt < end) return true;
    }
    return false;
  }

  private finish(shadow: number, leg: Leg | null, landed = false): void {
    this.live.delete(shadow);
    if (!landed) this.unmarkProvisional(shadow);
    if (this.live.size === 0) this.provisional = [];
    const span = this.host.slots.span[shadow] ?? 1;
    this.shadowSlots -= span;
    if (leg !== null) this.behindBytes[leg.index] = Math.max(0, (this.behindBytes[leg.index] ?? 0) - this.host.ring.lengthBytes(shadow));
    this.cancelled[shadow] = 0;
    this.live.delete(shadow);
    this.host.slots.phase[shadow] = 0;
    this.host.releaseAndFinish(shadow);
    if (this.shadowSlots === 0) this.logger.trace('write-behind: every write-mostly leg caught up');
  }
}
