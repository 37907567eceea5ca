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
 *   -> chained (default): the source's actor hands the slot to the target's actor as a WRITE
 *      (src/ring/chain-inbox.ts); the master sees only the WRITE's completion. Not chained
 *      (resyncChain off, or the READ failed): back here, rephase the slot to a WRITE
 *   -> on success within the target's epoch: clear the range's bits, still under the lock.
 *
 * Design notes
 * - A run is split into pieces, each the longest prefix that one leg holds (clean in its map):
 *   two resyncing legs can give each other what only each holds.
 * - Phase of a copy slot (SlotTable.phase): 1 READ, 2 WRITE; 0 is a client request.
 * - Checksum resync (`checksum`, --resync-verify): a piece is first compared on source and
 *   target (verify.ts); identical sub-ranges are cleared without a copy (clearMatched).
 *
 * Invariants:
 * - Bits are cleared only here, only after the target acknowledged the WRITE, only if the
 *   target's epoch is the one the copy started in (a failure in between voids the copy).
 * - A copy never reads from a leg that is not up to date for its whole range.
 */
import * as p from '../nbd/protocol.js';
import { errnoNames } from '../nbd/protocol-names.js';
import type { RequestRing } from '../ring/request-ring.js';
import { setChainLeg } from '../ring/chain-inbox.js';
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
  /** The READ leg's actor may hand a copy straight to the target's actor (chain-inbox.ts). */
  chains?: () => boolean;
  /**
   * Checksum resync (--resync-verify, src/engine/verify.ts): compares the piece on a source and
   * on the target under the range lock, clears the bits of what is the same (clearMatched) and
   * resolves with the sub-ranges still to copy. Absent: every piece is copied.
   */
  checksum?: (target: Leg, offsetBytes: number, lengthBytes: number) => Promise<Array<[number, number]>>;
}

export class ResyncCopier {
  private readonly done = new Map<number, (outcome: CopyOutcome) => void>();
  /** 1: the slot's READ was dispatched chained (its target leg's inFlight counts the WRITE). */
  private readonly chained: Uint8Array;
  /** Copy WRITEs completed, and how many of them the READ leg's actor chained (stats). */
  private writesDone = 0;
  private writesChained = 0;

  constructor(private readonly host: CopyHost) {
    this.chained = new Uint8Array(host.ring.slotCount);
  }

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
      const outcome = this.host.checksum === undefined ? await this.copyPiece(target, pieceOffset, prefix) : await this.copyDiffering(target, pieceOffset, prefix);
      if (outcome !== 'copied') return outcome;
      copied += prefix;
    }
    return 'copied';
  }

  /** Checksum resync: copies only the sub-ranges of the piece that differ on the target. */
  private async copyDiffering(target: Leg, offsetBytes: number, lengthBytes: number): Promise<CopyOutcome> {
    const checksum = this.host.checksum;
    if (checksum === undefined) return await this.copyPiece(target, offsetBytes, lengthBytes);
    for (const [offset, length] of await checksum(target, offsetBytes, lengthBytes)) {
      const outcome = await this.copyPiece(target, offset, length);
      if (outcome !== 'copied') return outcome;
    }
    return this.host.isClosed() || target.state !== 'resyncing' ? 'stopped' : 'copied';
  }

  /**
   * Checksum resync: the target was found holding what a source holds for the range (both read
   * and hashed under its range lock, which the caller still holds): its bits there are cleared,
   * as a copy would, only within the epoch the comparison started in and only for whole chunks.
   */
  clearMatched(target: Leg, epoch: number, offsetBytes: number, lengthBytes: number): boolean {
    const map = target.dirty;
    if (target.state !== 'resyncing' || target.epoch !== epoch || map === null) return false;
    const chunk = map.chunkBytes;
    if (offsetBytes % chunk !== 0 || (lengthBytes % chunk !== 0 && offsetBytes + lengthBytes !== map.deviceBytes)) return false;
    map.clearRange(offsetBytes, lengthBytes);
    if (this.host.flushes()) target.currentUnflushed?.markRange(offsetBytes, lengthBytes);
    return true;
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
    if (this.host.chains?.() === true) {
      // The READ goes on as a WRITE to the target without coming back here (chain-inbox.ts):
      // the target's inFlight counts it from now; onPhaseComplete settles both legs.
      setChainLeg(ring, slot, target.index);
      this.chained[slot] = 1;
      target.inFlight += 1;
    }
    return true;
  }

  /** A copy slot's phase completed (its legs acked). */
  onPhaseComplete(slot: number, phase: number, failed: number): void {
    const { ring, slots, legs } = this.host;
    const target = legs[slots.copyLeg[slot] ?? 0] as Leg;
    const offsetBytes = ring.offsetBytes(slot);
    const lengthBytes = ring.lengthBytes(slot);
    if (phase === 1 && this.chained[slot] === 1) {
      // onSlotComplete took one off the legs of the mask that completed: the target's (chained:
      // the WRITE, counted at prepareRead) or the source's (the READ came back here).
      this.chained[slot] = 0;
      const source = legs[ring.readLeg(slot)];
      if (ring.command(slot) === p.kCmdWrite) {
        if (source !== undefined) source.inFlight -= 1;
        this.writesChained += 1;
        slots.phase[slot] = 2;
        phase = 2;
      } else {
        target.inFlight -= 1;
      }
    }
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
    this.writesDone += 1;
    if (failed !== 0) {
      // A failure from the target's connection of an earlier epoch says nothing of its current
      // one (it already failed since the copy started): the copy just ends.
      if (target.epoch !== slots.epoch[slot]) {
        this.end(slot, 'stopped');
        return;
      }
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

  writeCounts(): { total: number; chained: number } {
    return { total: this.writesDone, chained: this.writesChained };
  }

  /** The copy still counts: its target is resyncing in the epoch the copy started in. */
  private stillWanted(target: Leg, slot: number): boolean {
    return target.state === 'resyncing' && target.epoch === this.host.slots.epoch[slot];
  }

  private end(slot: number, outcome: CopyOutcome): void {
    const slots = this.host.slots;
    this.chained[slot] = 0;
    slots.phase[slot] = 0;
    slots.copyLeg[slot] = -1;
    const resolve = this.done.get(slot);
    this.done.delete(slot);
    this.host.releaseAndFinish(slot);
    resolve?.(outcome);
  }
}
