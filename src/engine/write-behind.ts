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
 *   the payload into a shadow (phase 6: a shadow descriptor of the ring whose data is a run of
 *   4 KiB granules of the ring's shadow arena, src/ring/layout.ts) and queues the shadow on
 *   the range lock behind the client write; the master then marks the range in the leg's dirty map (it is
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
 * - Storage: shadows never take ring slots. The ring is made with shadow descriptors and an
 *   arena (`shadowRingOptions`: arena = the bound times the write-mostly legs, rounded to
 *   granules; descriptors = one per granule up to kShadowSlotsMax), so a 4 KiB shadow takes
 *   4 KiB, and clients never starve for slots whatever the shadows hold.
 * - Bound: a write is deferred only while the leg's outstanding bytes stay <= the bound and
 *   the ring has a free shadow descriptor and a granule run for it; beyond either, the write
 *   goes to the leg synchronously (it is acknowledged only when the slow leg has it too),
 *   which throttles the writers to the slow leg's pace.
 * - Hot path without allocation: the payload is copied with `copyWithin` inside the data SAB;
 *   a client write's shadows are a linked list in typed arrays (`firstShadow`, `nextShadow`);
 *   "does another live shadow of this leg cover the chunk" (every shadow's completion) is a
 *   per-leg count of live shadows per chunk (`covering`, a Map of chunk index -> count whose
 *   entries are numbers: no object per entry). The rare failure paths scan the live set.
 * - Ordering: a shadow takes the range lock of its client write's chunks at once, queued at the
 *   head of the waiters (RangeLock.acquireNext) right behind the client write, so every later
 *   overlapping write, resync copy or shadow waits for it, even one that queued before the
 *   client write was dispatched.
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
 * - A shadow holds a shadow descriptor and its granules of the ring's arena, never a ring slot;
 *   `covering[i]` counts, per chunk, leg i's live shadows over it (0 entries are deleted).
 * - A shadow is queued at the head of the range lock's waiters while its client write holds
 *   the range, so no later overlapping request reaches any leg before the shadow's leg has it.
 */
import { assert } from '../core/assert.js';
import type { Logger } from '../core/log.js';
import * as p from '../nbd/protocol.js';
import { errnoNames } from '../nbd/protocol-names.js';
import { kMaxLegs, kShadowGranuleBytes, kShadowSlotsMax, kDataBytesMax, kSlotBytesDefault, kSlotCountDefault, type RingOptions } from '../ring/layout.js';
import type { RequestRing } from '../ring/request-ring.js';
import type { Leg } from './leg.js';
import type { LegState } from './leg-health.js';
import type { SlotTable } from './slot-table.js';

/** The slot phase of a shadow write (0 client, 1/2 resync copy, 3 metadata, 4/5 verify; src/engine/slot-table.ts). */
export const kShadowPhase = 6;

/** Largest shadow arena (bytes): a bigger bound is still counted, the arena then bounds first. */
export const kShadowArenaMaxBytes = 1024 * 1024 * 1024;

/**
 * The ring's shadow descriptors and arena for a mirror's options: none without write-behind;
 * otherwise an arena of bound x write-mostly legs (rounded up to granules, at most
 * kShadowArenaMaxBytes and what the data SAB has room for) and one descriptor per granule, at
 * most kShadowSlotsMax.
 */
export function shadowRingOptions(options: { writeBehindBytes?: number; writeMostly?: readonly number[]; ring?: Partial<RingOptions> }): Partial<RingOptions> {
  const bound = options.writeBehindBytes ?? 0;
  const legs = options.writeMostly?.length ?? 0;
  if (bound <= 0 || legs === 0) return {};
  const slotData = (options.ring?.slotCount ?? kSlotCountDefault) * (options.ring?.slotBytes ?? kSlotBytesDefault);
  const room = Math.max(0, Math.min(kShadowArenaMaxBytes, kDataBytesMax - slotData));
  const granules = Math.floor(Math.min(room, Math.ceil((bound * legs) / kShadowGranuleBytes) * kShadowGranuleBytes) / kShadowGranuleBytes);
  if (granules === 0) return {};
  return { shadowArenaBytes: granules * kShadowGranuleBytes, shadowSlots: Math.min(kShadowSlotsMax, granules) };
}

export interface WriteBehindHost {
  readonly ring: RequestRing;
  readonly slots: SlotTable;
  readonly legs: readonly Leg[];
  /** Binds an internal token to the run (the engine's request count goes up). */
  bindInternal(slot: number, span: number): void;
  /**
   * Queues the shadow on the range lock of the whole chunks of the range at the head of the
   * waiters, right behind its client write (RangeLock.acquireNext): never granted at once.
   */
  queueNext(slot: number, offsetBytes: number, lengthBytes: number): void;
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
  /** Writes sent to the leg synchronously because the bound (or the shadow storage) was reached. */
  readonly boundHits = new Float64Array(kMaxLegs);
  /** Live shadows. */
  private liveCount = 0;
  /** Client write slot -> its first shadow (-1: none) until the client write completes. */
  private readonly firstShadow: Int32Array;
  /** Shadow -> the next shadow of the same client write (-1: last). */
  private readonly nextShadow: Int32Array;
  /** Per leg index: dirty-map chunk index -> live shadows of the leg covering it. */
  private readonly covering: Array<Map<number, number>> = [];
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
  /** Scratch of `extent` (no array per call on the hot path). */
  private extentStart = 0;
  private extentEnd = 0;

  constructor(
    private readonly host: WriteBehindHost,
    readonly boundBytes: number,
    readonly writeMostlyMask: number,
    private readonly logger: Logger,
  ) {
    const descriptors = host.ring.descriptorCount;
    this.cancelled = new Uint8Array(descriptors);
    this.firstShadow = new Int32Array(descriptors).fill(-1);
    this.nextShadow = new Int32Array(descriptors).fill(-1);
    for (let index = 0; index < kMaxLegs; index += 1) this.covering.push(new Map());
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
      if ((this.behindBytes[leg.index] ?? 0) + lengthBytes > this.boundBytes) {
        this.boundHits[leg.index] = (this.boundHits[leg.index] ?? 0) + 1;
        continue;
      }
      // A shadow descriptor and granules of the arena, never a ring slot (clients keep them all).
      const shadow = ring.shadowSlots > 0 ? ring.allocateShadow(lengthBytes) : -1;
      if (shadow < 0) {
        this.boundHits[leg.index] = (this.boundHits[leg.index] ?? 0) + 1;
        continue;
      }
      const from = ring.dataOffset(slot);
      ring.data.copyWithin(ring.dataOffset(shadow), from, from + lengthBytes);
      this.host.bindInternal(shadow, 1);
      const slots = this.host.slots;
      slots.phase[shadow] = kShadowPhase;
      slots.kind[shadow] = -1;
      slots.epoch[shadow] = leg.epoch;
      this.cancelled[shadow] = 0;
      ring.setRequest(shadow, p.kCmdWrite, ring.flags(slot), offsetBytes, lengthBytes, 1, leg.bit);
      this.liveCount += 1;
      this.behindBytes[leg.index] = (this.behindBytes[leg.index] ?? 0) + lengthBytes;
      this.deferredWrites[leg.index] = (this.deferredWrites[leg.index] ?? 0) + 1;
      this.nextShadow[shadow] = this.firstShadow[slot] ?? -1;
      this.firstShadow[slot] = shadow;
      this.live.add(shadow);
      this.count(shadow, leg.index, 1);
      deferred |= leg.bit;
      // Queued right behind the client write (it holds these chunks), ahead of every request
      // already waiting: those arrived after the client write (they may have queued while it
      // waited, or while the keeper parked it), so they must see the shadow's leg hold it
      // first. A plain acquire put them ahead, and a later write sent synchronously to the leg
      // (bound reached) overtook the shadow: the legs diverged (the model test found it).
      this.host.queueNext(shadow, offsetBytes, lengthBytes);
    }
    return deferred;
  }

  /** The client write completed (before its range lock is released); `ok`: acknowledged. */
  onMainDone(slot: number, ok: boolean): void {
    let shadow = this.firstShadow[slot] ?? -1;
    if (shadow < 0) return;
    this.firstShadow[slot] = -1;
    for (; shadow >= 0; shadow = this.nextShadow[shadow] ?? -1) {
      if (ok) continue;
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
        this.extent(shadow);
        const start = this.extentStart;
        const end = this.extentEnd;
        const chunk = this.host.chunkBytes();
        const counts = this.covering[leg.index] as Map<number, number>;
        for (let at = start; at < end; at += chunk) {
          // This shadow counts itself: more than one = a later shadow still covers the chunk.
          if ((counts.get(at / chunk) ?? 0) <= 1) leg.dirty?.clearRange(at, Math.min(chunk, end - at));
        }
        this.finish(shadow, leg, true);
        return;
      }
    }
    this.finish(shadow, leg);
  }

  /** True while no shadow is live. */
  get idle(): boolean {
    return this.liveCount === 0;
  }

  /** Live shadows (all legs). */
  get liveShadows(): number {
    return this.liveCount;
  }

  /** Adds `delta` to leg `legIndex`'s count of live shadows over each chunk the shadow covers. */
  private count(shadow: number, legIndex: number, delta: number): void {
    const counts = this.covering[legIndex] as Map<number, number>;
    this.extent(shadow);
    const start = this.extentStart;
    const end = this.extentEnd;
    const chunk = this.host.chunkBytes();
    for (let at = start; at < end; at += chunk) {
      const key = at / chunk;
      const next = (counts.get(key) ?? 0) + delta;
      assert(next >= 0, 'shadow cover counts stay non-negative');
      if (next === 0) counts.delete(key);
      else counts.set(key, next);
    }
  }

  /** Total bytes behind over all legs. */
  totalBehindBytes(): number {
    let total = 0;
    for (const bytes of this.behindBytes) total += bytes;
    return total;
  }

  /** Hot-path chunkExtent without an array: sets extentStart / extentEnd. */
  private extent(shadow: number): void {
    const ring = this.host.ring;
    const chunk = this.host.chunkBytes();
    const offsetBytes = ring.offsetBytes(shadow);
    this.extentStart = Math.floor(offsetBytes / chunk) * chunk;
    this.extentEnd = Math.min(this.host.sizeBytes(), Math.ceil((offsetBytes + ring.lengthBytes(shadow)) / chunk) * chunk);
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
    const target = this.host.ring.targetMask(shadow);
    if (target !== 0) this.count(shadow, 31 - Math.clz32(target), -1);
    if (!landed) this.unmarkProvisional(shadow);
    if (this.live.size === 0) this.provisional = [];
    this.liveCount -= 1;
    if (leg !== null) this.behindBytes[leg.index] = Math.max(0, (this.behindBytes[leg.index] ?? 0) - this.host.ring.lengthBytes(shadow));
    this.cancelled[shadow] = 0;
    this.live.delete(shadow);
    this.host.slots.phase[shadow] = 0;
    this.host.releaseAndFinish(shadow);
    if (this.liveCount === 0) this.logger.trace('write-behind: every write-mostly leg caught up');
  }
}
