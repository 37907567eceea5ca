/**
 * Resync copies: how the bytes of one dirty run get from a leg that holds them to a resyncing
 * leg, through the request ring, without racing client writes. `Resync` (resync.ts) decides
 * *what* to copy and when; this decides *how*, and is the only code that clears dirty bits.
 *
 * Thread: main thread (the session master). The bytes never touch it: each piece is a ring
 * slot that the source leg's connection actor READs into and the target leg's actor WRITEs from.
 *
 * Path of one piece:
 *   allocate a run of slots (wait behind client requests if the ring is full)
 *   -> range lock of [offset, offset+length) (a client write there waits for at most one copy)
 *   -> READ on a source leg up to date for the range (re-picked at dispatch, after the lock)
 *   -> rephase the slot to a WRITE on the target leg
 *   -> on success within the target's epoch: clear the range's bits, still under the lock.
 *
 * Design notes
 * - A run is split into pieces, each the longest prefix that one leg holds (clean in its map):
 *   two resyncing legs can give each other what only each holds.
 * - Phase of a copy slot (SlotTable.phase): 1 READ, 2 WRITE; 0 is a client request.
 *
 * Invariants:
 * - Bits are cleared only here, only after the target acknowledged the WRITE, only if the
 *   target's epoch is the one the copy started in (a failure in between voids the copy).
 * - A copy never reads from a leg that is not up to date for its whole range.
 */
import * as p from '../nbd/protocol.js';
import { errnoNames } from '../nbd/protocol-names.js';
import type { RequestRing } from '../ring/request-ring.js';
import type { Leg } from './leg.js';
import type { CopyOutcome } from './resync.js';
import type { SlotTable } from './slot-table.js';

/** What the copies need of the session master. */
export interface CopyHost {
  readonly ring: RequestRing;
  readonly slots: SlotTable;
  readonly legs: readonly Leg[];
  isClosed(): boolean;
  /** Copies mark their target's unflushed record (the device has FLUSH). */
  flushes(): boolean;
  /** Resolves when ring slots were freed (the caller retries its allocation). */
  slotsFreed(): Promise<void>;
  /** Frees slots the copy allocated but never started. */
  freeUnused(slot: number): void;
  /** Binds an internal token to the slot and counts it in flight. */
  bindInternal(slot: number, span: number): void;
  /** Takes the range lock (false: queued; the lock dispatches later) and dispatches. */
  lockAndDispatch(slot: number, offsetBytes: number, lengthBytes: number): void;
  dispatch(slot: number): void;
  /** Releases the range lock and finishes the internal slot. */
  releaseAndFinish(slot: number): void;
  upToDateFor(leg: Leg, offsetBytes: number, lengthBytes: number): boolean;
  failLeg(leg: Leg, reason: string): void;
  markUnlessSole(leg: Leg, offsetBytes: number, lengthBytes: number): void;
}

export class ResyncCopier {
  private readonly done = new Map<number, (outcome: CopyOutcome) => void>();

  constructor(private readonly host: CopyHost) {}

  /**
   * Copies [offset, offset+length) to the resyncing leg, piece by piece from legs that hold
   * each piece. 'no-source' when some piece is held by no connected leg (retried later).
   */
  async copyRange(target: Leg, offsetBytes: number, lengthBytes: number): Promise<CopyOutcome> {
    let copied = 0;
    while (copied < lengthBytes) {
      const pieceOffset = offsetBytes + copied;
      const prefix = this.sourcePrefixBytes(target.bit, pieceOffset, lengthBytes - copied);
      if (prefix <= 0) return 'no-source';
      const outcome = await this.copyPiece(target, pieceOffset, prefix);
      if (outcome !== 'copied') return outcome;
      copied += prefix;
    }
    return 'copied';
  }

  /** A source for a copy of the range: a leg other than the target up to date for all of it. */
  pickSource(excludeMask: number, offsetBytes: number, lengthBytes: number): Leg | null {
    let best: Leg | null = null;
    for (const leg of this.host.legs) {
      if ((leg.bit & excludeMask) !== 0 || !this.host.upToDateFor(leg, offsetBytes, lengthBytes)) continue;
      if (best === null || leg.inFlight < best.inFlight) best = leg;
    }
    return best;
  }

  /** The longest prefix of the range one admitted leg (not excluded) holds, in bytes. */
  sourcePrefixBytes(excludeMask: number, offsetBytes: number, lengthBytes: number): number {
    let best = 0;
    for (const leg of this.host.legs) {
      if ((leg.bit & excludeMask) !== 0 || !leg.admitted) continue;
      if (leg.state === 'in-sync' || leg.dirty === null) return lengthBytes;
      const chunkBytes = leg.dirty.chunkBytes;
      const firstChunk = Math.floor(offsetBytes / chunkBytes);
      const endChunk = Math.ceil((offsetBytes + lengthBytes) / chunkBytes);
      const dirtyAt = leg.dirty.firstDirtyChunk(firstChunk, endChunk);
      const clean = Math.min(lengthBytes, dirtyAt * chunkBytes - offsetBytes);
      if (clean > best) best = clean;
    }
    return Math.max(0, best);
  }

  private async copyPiece(target: Leg, offsetBytes: number, lengthBytes: number): Promise<CopyOutcome> {
    const { ring, slots } = this.host;
    const span = ring.slotsFor(lengthBytes);
    let slot = ring.allocate(span);
    while (slot < 0) {
      await this.host.slotsFreed();
      if (this.host.isClosed() || target.state !== 'resyncing') return 'stopped';
      slot = ring.allocate(span);
    }
    const source = this.host.isClosed() || target.state !== 'resyncing' ? null : this.pickSource(target.bit, offsetBytes, lengthBytes);
    if (source === null) {
      this.host.freeUnused(slot);
      return this.host.isClosed() || target.state !== 'resyncing' ? 'stopped' : 'no-source';
    }
    this.host.bindInternal(slot, span);
    ring.setRequest(slot, p.kCmdRead, 0, offsetBytes, lengthBytes, span, source.bit);
    ring.setReadLeg(slot, source.index);
    slots.phase[slot] = 1;
    slots.copyLeg[slot] = target.index;
    slots.epoch[slot] = target.epoch;
    const finished = new Promise<CopyOutcome>((resolve) => this.done.set(slot, resolve));
    this.host.lockAndDispatch(slot, offsetBytes, lengthBytes);
    return await finished;
  }

  /**
   * At dispatch of a copy's READ (maybe later, after the range lock): still wanted, and a
   * source that still holds the range. false: the copy ended here.
   */
  prepareRead(slot: number): boolean {
    const { ring, slots, legs } = this.host;
    const target = legs[slots.copyLeg[slot] ?? 0] as Leg;
    if (!this.stillWanted(target, slot)) {
      this.end(slot, 'stopped');
      return false;
    }
    const offsetBytes = ring.offsetBytes(slot);
    const lengthBytes = ring.lengthBytes(slot);
    const current = legs[ring.readLeg(slot)];
    let source: Leg | null = current !== undefined && current !== target && this.host.upToDateFor(current, offsetBytes, lengthBytes) ? current : null;
    source ??= this.pickSource(target.bit, offsetBytes, lengthBytes);
    if (source === null) {
      this.end(slot, 'no-source');
      return false;
    }
    ring.resetMasks(slot, source.bit);
    ring.setReadLeg(slot, source.index);
    return true;
  }

  /** A copy slot's phase completed (its legs acked). */
  onPhaseComplete(slot: number, phase: number, failed: number): void {
    const { ring, slots, legs } = this.host;
    const target = legs[slots.copyLeg[slot] ?? 0] as Leg;
    const offsetBytes = ring.offsetBytes(slot);
    const lengthBytes = ring.lengthBytes(slot);
    if (phase === 1) {
      if (failed !== 0) {
        const source = legs[ring.readLeg(slot)] as Leg;
        const errno = ring.legErrno(slot, source.index);
        this.host.markUnlessSole(source, offsetBytes, lengthBytes);
        this.host.failLeg(source, `READ for a resync failed with ${errnoNames[errno] ?? errno}`);
        this.end(slot, 'source-failed');
        return;
      }
      if (!this.stillWanted(target, slot)) {
        this.end(slot, 'stopped');
        return;
      }
      slots.phase[slot] = 2;
      ring.rephase(slot, p.kCmdWrite, 0, target.bit);
      this.host.dispatch(slot);
      return;
    }
    if (failed !== 0) {
      const errno = ring.legErrno(slot, target.index);
      this.host.failLeg(target, `WRITE for a resync failed with ${errnoNames[errno] ?? errno}`);
      this.end(slot, 'target-failed');
      return;
    }
    if (!this.stillWanted(target, slot)) {
      this.end(slot, 'stopped');
      return;
    }
    target.dirty?.clearRange(offsetBytes, lengthBytes);
    target.resyncedBytes += lengthBytes;
    if (this.host.flushes()) target.currentUnflushed?.markRange(offsetBytes, lengthBytes);
    this.end(slot, 'copied');
  }

  /** The copy still counts: its target is resyncing in the epoch the copy started in. */
  private stillWanted(target: Leg, slot: number): boolean {
    return target.state === 'resyncing' && target.epoch === this.host.slots.epoch[slot];
  }

  private end(slot: number, outcome: CopyOutcome): void {
    const slots = this.host.slots;
    slots.phase[slot] = 0;
    slots.copyLeg[slot] = -1;
    const resolve = this.done.get(slot);
    this.done.delete(slot);
    this.host.releaseAndFinish(slot);
    resolve?.(outcome);
  }
}
