/**
 * The metadata keeper: keeps every leg's on-leg metadata (src/meta) true while the mirror runs.
 * It owns the array's write-intent bitmap and member table, and does all metadata I/O through
 * one reserved ring slot on the legs' own connections (the same connection and order as the
 * data, so no second connection per leg is needed and a fence covers metadata too).
 *
 * Thread: main thread (the session master).
 *
 * Design notes
 * | event                            | what the keeper does before the engine may go on           |
 * |----------------------------------|------------------------------------------------------------|
 * | data-changing request dispatched | `covers`: every bitmap chunk of its range is durable on    |
 * | (WRITE, TRIM, WRITE_ZEROES)      | every admitted leg, else the request waits (`park`) for a  |
 * |                                  | bitmap page write (FUA) to all admitted legs. Only the     |
 * |                                  | first write to a clean chunk waits.                        |
 * | a leg leaves, returns, is added  | member table changed: successful data-changing completions |
 * | or removed                       | are held, the chunks every out-of-sync leg's dirty map     |
 * |                                  | marks get their bits, then events + 1 and a superblock on  |
 * |                                  | every admitted leg; then the held completions go out. So a |
 * |                                  | write a leg missed is never acknowledged before the other  |
 * |                                  | legs durably record that leg as stale.                     |
 * | heartbeat (every 5 s)            | superblocks rewritten with a fresh owner heartbeat; and    |
 * |                                  | bits of chunks not written for a whole period are cleared, |
 * |                                  | only while every member is in sync (durably recorded), no  |
 * |                                  | write is in flight (or parked) there and no leg holds an   |
 * |                                  | unflushed write there                                      |
 * | a leg passes probation           | its superblocks are read: another array, another leg UUID, |
 * |                                  | no metadata, or a sequence this daemon did not write means |
 * |                                  | its contents are unknown: full resync, fresh superblocks.  |
 * |                                  | Then the whole bitmap is written to it.                    |
 * | clean shutdown                   | FLUSH; the bitmap is zeroed if every member is in sync;    |
 * |                                  | superblocks: state clean, no owner, events + 1             |
 * | checkpoints (issue 17)           | every superblock write carries the checkpoint maps (runs,  |
 * |                                  | coarsened to fit). With checkpoints, the heartbeat clears  |
 * |                                  | quiet bits only AFTER its superblock write: a chunk whose  |
 * |                                  | bit goes was last written before that snapshot, so the     |
 * |                                  | stored maps hold it. After an unclean stop every chunk the |
 * |                                  | bitmap marks is marked in every checkpoint. So stored maps |
 * |                                  | plus bitmap always cover every change (never fewer).       |
 *
 * Bitmaps (one bit per chunk, bitmapBytes each, allocated once):
 * - wanted: what the leg bitmaps should say; durable: what every admitted leg durably holds
 *   (a subset of wanted, refreshed as (durable | written) & wanted when a page write is done,
 *   so a bit cleared while its page was being written is not taken as durable);
 * - touched: chunks a data-changing request was dispatched to since the last heartbeat.
 *
 * Invariants:
 * - A data-changing request is sent to no leg before its chunks' bits are durable on every
 *   leg that was admitted when the bits were written (a leg admitted later got the whole
 *   bitmap first, and every page and table written from its admission's end on: `admitting`).
 * - A bit is cleared only while every member is in sync and durably recorded so.
 * - Metadata I/O is one request at a time (one reserved slot): page writes, superblock writes
 *   and identity reads never interleave.
 */
import type { Logger } from '../core/log.js';
import { assert } from '../core/assert.js';
import * as p from '../nbd/protocol.js';
import type { DirtyMap } from '../bitmap/dirty-map.js';
import { computeLayout, kMetaBlockBytes, kSuperblockBytes, superblockOffsets, type LegLayout } from '../meta/layout.js';
import { encodeSuperblock, type MemberRecord, type MemberState, type OwnerRecord } from '../meta/superblock.js';
import type { KeeperStatus } from '../core/status-types.js';
import { bitmapCount, inspectCopy } from '../meta/leg-meta.js';
import { superblockFor, kHeartbeatMs, type AssembledArray } from '../meta/assemble.js';
import { randomUUID } from 'node:crypto';
import type { Leg } from './leg.js';
import { kPayloadBytesMax, nextGenerations, superblockPayloadBytes, type CheckpointRecord } from '../meta/superblock.js';
import type { CheckpointSet } from './checkpoints.js';

/** What the keeper needs of the session master. */
export interface KeeperHost {
  readonly legs: readonly Leg[];
  /** One metadata request on the reserved slot to the `mask` legs; resolves with the failed mask. */
  metaIo(command: number, offsetBytes: number, bytes: Uint8Array, mask: number): Promise<number>;
  /** FUA is offered by every leg (else a FLUSH follows each metadata write). */
  fua(): boolean;
  flushes(): boolean;
  failLeg(leg: Leg, reason: string): void;
  /** Dispatches a data-changing request that waited for its bits. */
  resume(slot: number): void;
  /** Finishes a held completion. */
  release(slot: number, errno: number): void;
  /** Calls `visit` for each data-changing client request in flight (dispatched). */
  forEachWriteInFlight(visit: (offsetBytes: number, lengthBytes: number) => void): void;
  /** The leg's contents are unknown (blank, replaced): every chunk of it is to be copied. */
  contentsUnknown(leg: Leg): void;
  isClosed(): boolean;
}

interface LegMetaState {
  slotIndex: number;
  legUuid: string;
  layout: LegLayout;
  lastCopy: number;
  lastSequence: number;
  /** The sequence of a superblock write in flight (it may or may not have landed). */
  attemptedSequence: number;
  /** Its contents are unknown until a full resync ends. */
  fullSync: boolean;
  /** The member table (tableKey) its newest superblock durably holds, '' when unknown. */
  writtenTable: string;
}

export type { KeeperStatus };

export interface KeeperOptions {
  heartbeatMs?: number;
  logger: Logger;
  /** The engine's checkpoints: restored from the superblock, kept in every superblock write. */
  checkpoints?: CheckpointSet;
}

function memberStateOf(leg: Leg, state: LegMetaState): MemberState {
  if (leg.state === 'removed') return 'removed';
  if (leg.state === 'in-sync') return 'in-sync';
  return state.fullSync ? 'needs-full-sync' : 'needs-resync';
}

export class MetaKeeper {
  readonly layout: LegLayout;
  private readonly wanted: Uint8Array;
  private readonly durable: Uint8Array;
  private readonly touched: Uint8Array;
  private readonly pagePending: Uint8Array;
  private readonly chunkBytes: number;
  private readonly chunkCount: number;
  private readonly perLeg: (LegMetaState | null)[] = [];
  private members: MemberRecord[];
  /**
   * The member table last chosen for writing (state and UUID per slot): written, or being
   * written by the loop. onLegState compares against this, not against the table already on the
   * legs: a leg that left and came back while the table saying it left was being written must
   * still get a table saying it is back (else the legs keep recording it stale).
   */
  private scheduledTable = '';
  private events: number;
  /** Generation history written with the table, newest first (a new one per events bump; assemble.ts). */
  private generations: string[];
  private readonly owner: OwnerRecord;
  private readonly plan: AssembledArray['plan'];
  /** Parked requests: slot, first chunk, end chunk (triples). */
  private readonly waiters: number[] = [];
  private readonly held: number[] = [];
  private tableChanged = false;
  private heartbeatDue = false;
  private holding = false;
  private running: Promise<void> | null = null;
  private timer: NodeJS.Timeout | null = null;
  private stopped = false;
  private readonly logger: Logger;
  private readonly admitQueue: Array<{ leg: Leg; done: (ok: boolean) => void }> = [];
  /**
   * Legs whose admission (admitNow) passed and that are not admitted yet (the lifecycle moves
   * them on a few microtasks later). They take every metadata write like admitted legs: a bit or
   * table written in that gap, with them left out, would never reach them.
   */
  private admitting = 0;
  /** Set while resuming waiters with no admitted leg (they go on and fail for want of a leg). */
  private passAll = false;
  private readonly counters = { intentWaits: 0, bitmapWrites: 0, superblockWrites: 0 };
  private readonly checkpoints: CheckpointSet | null;
  /** Callers of persistCheckpoints waiting for the next superblock write. */
  private persistWaiters: Array<() => void> = [];
  /** The heartbeat's lazy clearing waits for its superblock write (checkpoints exist). */
  private clearDue = false;

  constructor(private readonly host: KeeperHost, assembled: AssembledArray, options: KeeperOptions) {
    this.plan = assembled.plan;
    this.layout = assembled.plan.layout;
    this.logger = options.logger;
    this.chunkBytes = this.layout.bitmapChunkBytes;
    this.chunkCount = this.layout.chunkCount;
    this.wanted = assembled.plan.bitmap.slice();
    this.durable = assembled.plan.bitmap.slice();
    this.touched = new Uint8Array(this.layout.bitmapBytes);
    this.pagePending = new Uint8Array(Math.max(1, this.layout.bitmapAreaBytes / kMetaBlockBytes));
    this.members = assembled.plan.members.map((member) => ({ ...member }));
    this.events = assembled.plan.events;
    this.generations = [...(assembled.plan.generations ?? [])];
    this.owner = { ...assembled.owner };
    for (const [index, leg] of assembled.legs.entries()) {
      this.perLeg[index] = {
        slotIndex: leg.slotIndex,
        legUuid: leg.legUuid,
        layout: computeLayout(leg.legSizeBytes, this.chunkBytes),
        lastCopy: leg.lastCopy,
        lastSequence: leg.lastSequence,
        attemptedSequence: leg.lastSequence,
        fullSync: leg.role === 'full-resync',
        writtenTable: '',
      };
    }
    this.scheduledTable = this.tableKey(this.members);
    // Assembly's claim wrote the plan's member table to every leg.
    for (const state of this.perLeg) if (state != null) state.writtenTable = this.scheduledTable;
    this.checkpoints = options.checkpoints ?? null;
    if (this.checkpoints !== null) this.restoreCheckpoints(this.checkpoints, assembled);
    const heartbeatMs = options.heartbeatMs ?? kHeartbeatMs;
    this.timer = setInterval(() => this.tick(), heartbeatMs);
    this.timer.unref();
  }

  // ---- the write path -----------------------------------------------------------------------

  /**
   * True when every chunk of the range has its bit durable on the legs (then the request may go
   * now). Notes the chunks as written (lazy clearing waits for them to be quiet). No allocation.
   */
  covers(offsetBytes: number, lengthBytes: number): boolean {
    if (lengthBytes === 0 || this.passAll) return true;
    const first = Math.floor(offsetBytes / this.chunkBytes);
    const end = Math.min(this.chunkCount, Math.ceil((offsetBytes + lengthBytes) / this.chunkBytes));
    let covered = true;
    const durable = this.durable;
    const touched = this.touched;
    for (let chunk = first; chunk < end; chunk += 1) {
      const byte = chunk >> 3;
      const bit = 1 << (chunk & 7);
      touched[byte] = (touched[byte] as number) | bit;
      if (((durable[byte] as number) & bit) === 0) covered = false;
    }
    return covered;
  }

  /** The request in `slot` waits until its chunks' bits are durable; the keeper resumes it. */
  park(slot: number, offsetBytes: number, lengthBytes: number): void {
    this.counters.intentWaits += 1;
    this.want(Math.floor(offsetBytes / this.chunkBytes), Math.min(this.chunkCount, Math.ceil((offsetBytes + lengthBytes) / this.chunkBytes)));
    this.waiters.push(slot, Math.floor(offsetBytes / this.chunkBytes), Math.min(this.chunkCount, Math.ceil((offsetBytes + lengthBytes) / this.chunkBytes)));
    this.kick();
  }

  /** Sets the wanted bits of the chunks (their pages to be written); true when one was not set. */
  private want(firstChunk: number, endChunk: number): boolean {
    let added = false;
    for (let chunk = firstChunk; chunk < endChunk; chunk += 1) {
      const byte = chunk >> 3;
      const bit = 1 << (chunk & 7);
      if (((this.wanted[byte] as number) & bit) !== 0) continue;
      this.wanted[byte] = (this.wanted[byte] as number) | bit;
      this.pagePending[Math.floor(byte / kMetaBlockBytes)] = 1;
      added = true;
    }
    return added;
  }

  /** A successful data-changing completion: held while a member-table change is not durable. */
  holdCompletion(slot: number, errno: number): boolean {
    if (!this.holding) return false;
    this.held.push(slot, errno);
    return true;
  }

  // ---- membership ---------------------------------------------------------------------------

  /** A leg changed state (or got marks): the member table and bits are brought up to date. */
  onLegState(leg: Leg): void {
    const state = this.perLeg[leg.index];
    if (state === null || state === undefined) return;
    if (leg.state !== 'probation' && leg.state !== 'reconnecting') this.admitting &= ~leg.bit;
    if (leg.state === 'in-sync') state.fullSync = false;
    const table = this.desiredTable();
    // An admitted leg (one just back from probation) holds an older table: it gets this one too.
    const stale = leg.admitted && state.writtenTable !== this.scheduledTable;
    if (this.tableKey(table) === this.scheduledTable && !stale && !this.outOfSyncMarks()) return;
    this.tableChanged = true;
    this.holding = true;
    this.kick();
  }

  /** A new leg (enbd leg add): a member slot and a UUID; fresh metadata is written at admission. */
  addLeg(leg: Leg, legSizeBytes: number): void {
    // The index is a removed leg's: its member is removed now, even if the table recording that
    // was not chosen yet (desiredTable no longer sees it once its index belongs to the new leg).
    const previous = this.perLeg[leg.index];
    if (previous != null) this.recordRemoved(previous);
    const inUse = new Set<number>();
    for (const [index, state] of this.perLeg.entries()) {
      if (state != null && index !== leg.index && this.host.legs[index]?.state !== 'removed') inUse.add(state.slotIndex);
    }
    let slot = this.members.findIndex((member, at) => member.state === 'removed' && !inUse.has(at));
    if (slot < 0) slot = this.members.length;
    const legUuid = randomUUID();
    this.members[slot] = { legUuid, state: 'needs-full-sync', events: 0, recoveryOffsetBytes: 0 };
    this.perLeg[leg.index] = { slotIndex: slot, legUuid, layout: computeLayout(legSizeBytes, this.chunkBytes), lastCopy: 1, lastSequence: 0, attemptedSequence: -1, fullSync: true, writtenTable: '' };
  }

  /**
   * A leg add failed after addLeg (its admission's metadata I/O failed): its member slot is given
   * up (removed), so the table does not wait for it to sync for ever.
   */
  forgetLeg(index: number): void {
    const state = this.perLeg[index];
    if (state == null) return;
    this.recordRemoved(state);
    this.perLeg[index] = null;
    this.admitting &= ~(1 << index);
    if (this.tableKey(this.desiredTable()) === this.scheduledTable) return;
    this.tableChanged = true;
    this.kick();
  }

  /** The leg's member (if its slot still holds it) is recorded removed. */
  private recordRemoved(state: LegMetaState): void {
    const record = this.members[state.slotIndex];
    if (record !== undefined && record.legUuid === state.legUuid) this.members[state.slotIndex] = { ...record, state: 'removed' };
  }

  /** A leg of `legSizeBytes` can hold the data area plus its metadata. */
  fits(legSizeBytes: number): boolean {
    try {
      return computeLayout(legSizeBytes, this.chunkBytes).dataSizeBytes >= this.layout.dataSizeBytes;
    } catch {
      return false;
    }
  }

  private desiredTable(): MemberRecord[] {
    const table = this.members.map((member) => ({ ...member }));
    for (const [index, state] of this.perLeg.entries()) {
      const leg = this.host.legs[index];
      if (state === null || state === undefined || leg === undefined) continue;
      const record = table[state.slotIndex] ?? { legUuid: state.legUuid, state: 'removed' as MemberState, events: 0, recoveryOffsetBytes: 0 };
      record.legUuid = state.legUuid;
      record.state = memberStateOf(leg, state);
      if (leg.name !== '') record.name = leg.name; // recorded so a later start without names keeps them
      table[state.slotIndex] = record;
    }
    return table;
  }

  private tableKey(table: MemberRecord[]): string {
    return table.map((member) => `${member.legUuid}:${member.state}:${member.name ?? ''}`).join(',');
  }

  /** Sets the bits of every chunk some leg out of sync has marked; true when that added bits. */
  private outOfSyncMarks(): boolean {
    let added = false;
    for (const leg of this.host.legs) {
      if (leg.state === 'in-sync' || leg.state === 'removed' || leg.dirty === null) continue;
      if (this.markFrom(leg.dirty)) added = true;
    }
    return added;
  }

  private markFrom(map: DirtyMap): boolean {
    let added = false;
    map.forEachDirtyRun((firstChunk, chunkCount) => {
      const start = firstChunk * map.chunkBytes;
      const end = Math.min(map.deviceBytes, (firstChunk + chunkCount) * map.chunkBytes);
      if (this.want(Math.floor(start / this.chunkBytes), Math.min(this.chunkCount, Math.ceil(end / this.chunkBytes)))) added = true;
    });
    return added;
  }

  /**
   * Probation of a returning leg: is it still the leg this daemon last wrote? If not (blank,
   * another array or leg UUID, a sequence it never wrote), its data is unknown: every chunk is
   * marked, and it gets fresh superblocks. Then the whole bitmap is written to it. Resolves false
   * when its metadata I/O failed (the leg stays out).
   */
  admit(leg: Leg): Promise<boolean> {
    return new Promise<boolean>((resolve) => {
      this.admitQueue.push({ leg, done: resolve });
      this.kick();
    });
  }

  // ---- the metadata I/O loop ----------------------------------------------------------------

  /**
   * Starts the I/O loop if it is idle. The loop begins in a microtask, never inside the caller
   * (a leg's state change arrives in the middle of the engine's completion handling).
   */
  private kick(): void {
    if (this.running !== null || this.stopped) return;
    this.running = Promise.resolve().then(async () => await this.loop()).catch((error: unknown) => {
      // A bug, not an I/O error (those fail legs). Writes must not hang behind it: release them.
      this.logger.error({ err: error }, 'metadata keeper failed; releasing held acknowledgements');
      this.releaseHeld();
    }).finally(() => {
      this.running = null;
      if (this.hasWork() && !this.stopped) this.kick();
    });
  }

  private hasWork(): boolean {
    return this.tableChanged || this.heartbeatDue || this.persistWaiters.length > 0 || this.admitQueue.length > 0 || this.pagePending.includes(1);
  }

  private async loop(): Promise<void> {
    while (!this.stopped && !this.host.isClosed()) {
      const admission = this.admitQueue.shift();
      if (admission !== undefined) {
        const admitted = await this.admitNow(admission.leg);
        if (admitted) this.admitting |= admission.leg.bit;
        admission.done(admitted);
        continue;
      }
      if (this.tableChanged) {
        this.tableChanged = false;
        this.outOfSyncMarks();
        await this.writePages(this.admittedMask());
        this.nextEvents();
        this.members = this.desiredTable();
        this.scheduledTable = this.tableKey(this.members);
        for (const member of this.members) if (member.state === 'in-sync') member.events = this.events;
        await this.writeSuperblocks('active', this.owner);
        if (!this.tableChanged) this.releaseHeld();
        continue;
      }
      if (this.pagePending.includes(1)) {
        await this.writePages(this.admittedMask());
        continue;
      }
      if (this.heartbeatDue || this.persistWaiters.length > 0) {
        this.heartbeatDue = false;
        const waiters = this.persistWaiters.splice(0);
        await this.writeSuperblocks('active', this.owner);
        for (const done of waiters) done();
        if (this.clearDue) {
          this.clearDue = false;
          this.clearQuiet();
        }
        continue;
      }
      break;
    }
    if (this.host.isClosed()) this.releaseHeld();
    if (this.stopped || this.host.isClosed()) for (const done of this.persistWaiters.splice(0)) done();
  }

  private admittedMask(): number {
    let mask = 0;
    for (const leg of this.host.legs) if (this.takesMetadata(leg) && this.perLeg[leg.index] != null) mask |= leg.bit;
    return mask;
  }

  /** Admitted, or admission passed and the lifecycle is about to admit it (`admitting`). */
  private takesMetadata(leg: Leg): boolean {
    return leg.admitted || (this.admitting & leg.bit) !== 0;
  }

  private releaseHeld(): void {
    this.holding = false;
    const held = this.held.splice(0);
    for (let at = 0; at < held.length; at += 2) this.host.release(held[at] as number, held[at + 1] as number);
  }

  /** Writes every pending bitmap page to the `mask` legs, then resumes the waiters now covered. */
  private async writePages(mask: number): Promise<void> {
    const pages = this.pagePending;
    for (let page = 0; page < pages.length; page += 1) {
      if (pages[page] === 0) continue;
      pages[page] = 0;
      const snapshot = this.pageBytes(page);
      // A leg admitted while the page was being written gets it too.
      let written = 0;
      let remaining = mask;
      while (remaining !== 0) {
        await this.writeToLegs(remaining, (state) => state.layout.bitmapOffsetBytes + page * kMetaBlockBytes, () => snapshot, 'bitmap page');
        written |= remaining;
        remaining = this.admittedMask() & ~written;
      }
      this.counters.bitmapWrites += 1;
      const start = page * kMetaBlockBytes;
      const end = Math.min(this.durable.length, start + kMetaBlockBytes);
      for (let at = start; at < end; at += 1) this.durable[at] = ((this.durable[at] as number) | (snapshot[at - start] as number)) & (this.wanted[at] as number);
    }
    this.resumeWaiters();
  }

  private durableRange(firstChunk: number, endChunk: number): boolean {
    for (let chunk = firstChunk; chunk < endChunk; chunk += 1) {
      if (((this.durable[chunk >> 3] as number) & (1 << (chunk & 7))) === 0) return false;
    }
    return true;
  }

  private pageBytes(page: number): Uint8Array {
    const bytes = new Uint8Array(kMetaBlockBytes);
    const start = page * kMetaBlockBytes;
    bytes.set(this.wanted.subarray(start, Math.min(this.wanted.length, start + kMetaBlockBytes)));
    return bytes;
  }

  private resumeWaiters(): void {
    if (this.waiters.length === 0) return;
    // Each resumes through the dispatch path again: covered now, it goes; a chunk cleared in the
    // meantime parks it again. With no admitted leg it goes on and fails there (EIO).
    // Only the requests whose chunks are all durable now go; the others wait for a later write.
    const waiting = this.waiters.splice(0);
    const none = this.admittedMask() === 0;
    this.passAll = none;
    for (let at = 0; at < waiting.length; at += 3) {
      const slot = waiting[at] as number;
      if (none || this.durableRange(waiting[at + 1] as number, waiting[at + 2] as number)) this.host.resume(slot);
      else this.waiters.push(slot, waiting[at + 1] as number, waiting[at + 2] as number);
    }
    this.passAll = false;
  }

  /**
   * One metadata write of `bytes(state)` at `offset(state)` to each leg of `mask` (legs whose
   * bytes differ go one by one; the same bytes go to all at once). Failed legs fail.
   */
  private async writeToLegs(mask: number, offset: (state: LegMetaState) => number, bytes: (state: LegMetaState, leg: Leg) => Uint8Array, what: string, perLeg = false): Promise<void> {
    if (mask === 0) return;
    const groups = new Map<number, number>();
    for (const leg of this.host.legs) {
      const state = this.perLeg[leg.index];
      if ((mask & leg.bit) === 0 || state == null) continue;
      const key = perLeg ? leg.index : offset(state);
      groups.set(key, (groups.get(key) ?? 0) | leg.bit);
    }
    for (const groupMask of groups.values()) {
      const first = this.host.legs.find((leg) => (groupMask & leg.bit) !== 0) as Leg;
      const state = this.perLeg[first.index] as LegMetaState;
      const data = bytes(state, first);
      let failed = await this.host.metaIo(p.kCmdWrite, offset(state), data, groupMask);
      if (!this.host.fua() && this.host.flushes() && (groupMask & ~failed) !== 0) failed |= await this.host.metaIo(p.kCmdFlush, 0, new Uint8Array(0), groupMask & ~failed);
      this.failLegs(failed, `${what} write failed`);
    }
  }

  private failLegs(failed: number, reason: string): void {
    if (failed === 0) return;
    for (const leg of this.host.legs) if ((failed & leg.bit) !== 0 && this.takesMetadata(leg)) this.host.failLeg(leg, reason);
  }

  /** A superblock (the current table, `state`, `owner`) on every admitted leg, each to its older copy. */
  private async writeSuperblocks(state: 'active' | 'clean', owner: OwnerRecord | null): Promise<void> {
    const nowMs = Date.now();
    if (owner !== null) owner.heartbeatMs = nowMs;
    const checkpoints = this.checkpointRecords(state, owner, nowMs);
    for (const leg of this.host.legs) {
      const legState = this.perLeg[leg.index];
      if (!this.takesMetadata(leg) || legState == null) continue;
      await this.writeSuperblock(leg, legState, state, owner, nowMs, checkpoints);
    }
  }

  private async writeSuperblock(leg: Leg, legState: LegMetaState, state: 'active' | 'clean', owner: OwnerRecord | null, nowMs: number, checkpoints: CheckpointRecord[]): Promise<boolean> {
    const copy = 1 - legState.lastCopy;
    const sequence = legState.lastSequence + 1;
    const sb = superblockFor(this.plan, legState.layout, legState, this.members, this.events, state, owner, nowMs, checkpoints, this.generations);
    const table = this.tableKey(this.members);
    legState.attemptedSequence = sequence;
    const offsets = superblockOffsets(legState.layout.legSizeBytes);
    let failed = await this.host.metaIo(p.kCmdWrite, offsets[copy] as number, encodeSuperblock(sb, copy, sequence), leg.bit);
    if (failed === 0 && !this.host.fua() && this.host.flushes()) failed = await this.host.metaIo(p.kCmdFlush, 0, new Uint8Array(0), leg.bit);
    this.counters.superblockWrites += 1;
    if (failed !== 0) {
      this.failLegs(failed, 'superblock write failed');
      return false;
    }
    legState.lastCopy = copy;
    legState.lastSequence = sequence;
    legState.writtenTable = table;
    return true;
  }

  private async admitNow(leg: Leg): Promise<boolean> {
    const legState = this.perLeg[leg.index];
    if (legState == null) return true;
    const offsets = superblockOffsets(legState.layout.legSizeBytes);
    const area = new Uint8Array(2 * kSuperblockBytes);
    const readFailed = await this.host.metaIo(p.kCmdRead, offsets[0], area, leg.bit);
    if (readFailed !== 0) return false;
    const copies = [inspectCopy(0, offsets[0], area.subarray(0, kSuperblockBytes)), inspectCopy(1, offsets[1], area.subarray(kSuperblockBytes))];
    const validCopies = copies.filter((copy) => copy.status === 'valid');
    const newest = validCopies.sort((a, b) => (b.sequence ?? 0) - (a.sequence ?? 0))[0] ?? null;
    const sb = newest?.superblock ?? null;
    let problem: string | null = null;
    if (sb === null) problem = 'it carries no enbd metadata (a blank or replaced leg)';
    else if (sb.arrayUuid !== this.plan.arrayUuid) problem = `it carries array ${sb.arrayUuid}, not ${this.plan.arrayUuid}`;
    else if (sb.legUuid !== legState.legUuid) problem = `it carries leg UUID ${sb.legUuid}, not ${legState.legUuid}`;
    else if (newest?.sequence !== legState.lastSequence && newest?.sequence !== legState.attemptedSequence) problem = `its superblock (sequence ${newest?.sequence}) was written by someone else since this daemon last wrote it (sequence ${legState.lastSequence})`;
    let fresh = false;
    if (problem !== null) {
      this.logger.warn({ leg: leg.index, uri: leg.uri, problem }, 'returning leg is not the one that left: its contents are unknown, full resync');
      this.host.contentsUnknown(leg);
      legState.fullSync = true;
      fresh = true;
    } else if (newest !== null) {
      legState.lastSequence = newest.sequence ?? legState.lastSequence;
      legState.lastCopy = newest.copyIndex;
    }
    // The whole bitmap, then (fresh legs) both superblock copies.
    for (let page = 0; page < this.pagePending.length; page += 1) {
      const data = this.pageBytes(page);
      const failed = await this.host.metaIo(p.kCmdWrite, legState.layout.bitmapOffsetBytes + page * kMetaBlockBytes, data, leg.bit);
      if (failed !== 0) return false;
    }
    if (fresh) {
      const nowMs = Date.now();
      const table = this.desiredTable();
      const sb0 = superblockFor(this.plan, legState.layout, legState, table, this.events, 'active', this.owner, nowMs, this.checkpointRecords('active', this.owner, nowMs), this.generations);
      const both = new Uint8Array(2 * kSuperblockBytes);
      both.set(encodeSuperblock(sb0, 0, 1), 0);
      both.set(encodeSuperblock(sb0, 1, 2), kSuperblockBytes);
      legState.attemptedSequence = 2;
      const failed = await this.host.metaIo(p.kCmdWrite, offsets[0], both, leg.bit);
      if (failed !== 0) return false;
      legState.lastSequence = 2;
      legState.lastCopy = 1;
      legState.writtenTable = this.tableKey(table);
    }
    if (!this.host.fua() && this.host.flushes()) {
      if ((await this.host.metaIo(p.kCmdFlush, 0, new Uint8Array(0), leg.bit)) !== 0) return false;
    }
    return true;
  }

  // ---- heartbeat and lazy clearing ----------------------------------------------------------

  private tick(): void {
    if (this.stopped || this.host.isClosed()) return;
    // With checkpoints the clearing follows the heartbeat's superblock (see the table above).
    if (this.checkpoints !== null && this.checkpoints.count > 0) this.clearDue = true;
    else this.clearQuiet();
    this.heartbeatDue = true;
    this.kick();
  }

  /** True when every member is in sync, in memory and as last written. */
  private allInSync(): boolean {
    if (this.tableChanged || this.holding) return false;
    if (!this.members.every((member) => member.state === 'in-sync' || member.state === 'removed')) return false;
    for (const leg of this.host.legs) if (this.perLeg[leg.index] != null && leg.state !== 'in-sync' && leg.state !== 'removed') return false;
    return true;
  }

  /** Clears the bits of chunks not written since the last tick (only while all are in sync). */
  private clearQuiet(): void {
    const touched = this.touched;
    if (!this.allInSync()) {
      touched.fill(0);
      return;
    }
    // Chunks of requests still in flight stay (touched before this tick, answered after it).
    this.host.forEachWriteInFlight((offsetBytes, lengthBytes) => {
      this.touch(Math.floor(offsetBytes / this.chunkBytes), Math.min(this.chunkCount, Math.ceil((offsetBytes + lengthBytes) / this.chunkBytes)));
    });
    // So do those of parked requests (waiting for another chunk's bit): nothing would set a bit
    // of theirs again, and they would wait for it for ever.
    const waiters = this.waiters;
    for (let at = 0; at < waiters.length; at += 3) this.touch(waiters[at + 1] as number, waiters[at + 2] as number);
    let cleared = 0;
    for (let byte = 0; byte < this.wanted.length; byte += 1) {
      const candidates = (this.wanted[byte] as number) & (this.durable[byte] as number) & ~(touched[byte] as number);
      if (candidates === 0) continue;
      for (let bit = 0; bit < 8; bit += 1) {
        if ((candidates & (1 << bit)) === 0) continue;
        const chunk = byte * 8 + bit;
        if (this.markedAnywhere(chunk)) continue;
        this.wanted[byte] = (this.wanted[byte] as number) & ~(1 << bit);
        this.durable[byte] = (this.durable[byte] as number) & ~(1 << bit);
        this.pagePending[Math.floor(byte / kMetaBlockBytes)] = 1;
        cleared += 1;
      }
    }
    touched.fill(0);
    if (cleared > 0) this.logger.debug({ cleared }, 'write-intent bits cleared');
  }

  /** Chunks [first, end) count as touched in this period. */
  private touch(first: number, end: number): void {
    const touched = this.touched;
    for (let chunk = first; chunk < end; chunk += 1) touched[chunk >> 3] = (touched[chunk >> 3] as number) | (1 << (chunk & 7));
  }

  /** Some leg holds an unflushed write there, or has the chunk marked in its dirty map. */
  private markedAnywhere(chunk: number): boolean {
    const offsetBytes = chunk * this.chunkBytes;
    for (const leg of this.host.legs) {
      if (leg.state === 'removed') continue;
      const dirty = leg.dirty;
      if (dirty !== null && dirty.testRange(offsetBytes, Math.min(this.chunkBytes, dirty.deviceBytes - offsetBytes))) return true;
      if (leg.unflushed === null) continue;
      for (const half of leg.unflushed) if (half.testRange(offsetBytes, Math.min(this.chunkBytes, half.deviceBytes - offsetBytes))) return true;
    }
    return false;
  }

  // ---- shutdown and status ------------------------------------------------------------------

  /**
   * Clean stop (the engine's requests drained): FLUSH, zero the bitmap if every member is in
   * sync, then superblocks with state clean and no owner. Resolves when written.
   */
  async stop(): Promise<void> {
    if (this.stopped) return;
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
    while (this.running !== null) await this.running;
    this.stopped = true;
    const mask = this.admittedMask();
    if (mask === 0) return;
    if (this.host.flushes()) this.failLegs(await this.host.metaIo(p.kCmdFlush, 0, new Uint8Array(0), mask), 'final FLUSH failed');
    this.members = this.desiredTable();
    // The exact checkpoint maps are durable before the bitmap that covers them is zeroed.
    if (this.checkpoints !== null && this.checkpoints.count > 0) await this.writeSuperblocks('active', this.owner);
    if (this.allInSync()) {
      this.wanted.fill(0);
      this.pagePending.fill(1);
      await this.writePages(this.admittedMask());
    } else if (this.pagePending.includes(1)) {
      await this.writePages(this.admittedMask());
    }
    this.nextEvents();
    for (const member of this.members) if (member.state === 'in-sync') member.events = this.events;
    await this.writeSuperblocks('clean', null);
    this.releaseHeld();
  }

  /** A member-table change or stop: events + 1 and a new generation, the old ones after it (bounded). */
  private nextEvents(): void {
    this.events += 1;
    this.generations = nextGenerations(this.generations);
  }

  // ---- checkpoints --------------------------------------------------------------------------

  /** Resolves once a superblock write that started after the call is done (checkpoint list durable). */
  persistCheckpoints(): Promise<void> {
    if (this.stopped || this.host.isClosed()) return Promise.resolve();
    return new Promise<void>((resolve) => {
      this.persistWaiters.push(resolve);
      this.kick();
    });
  }

  private restoreCheckpoints(checkpoints: CheckpointSet, assembled: AssembledArray): void {
    const { plan } = assembled;
    for (const problem of checkpoints.restore(plan.checkpoints)) this.logger.warn({ problem }, 'checkpoints');
    if (plan.checkpoints.length === 0) return;
    if (plan.unclean) {
      // Writes since the last stored maps are under bits of the write-intent bitmap.
      checkpoints.markFromBitmap(plan.bitmap, this.chunkBytes, this.chunkCount);
      this.logger.info({ checkpoints: checkpoints.names() }, 'unclean stop: checkpoints also mark every chunk the write-intent bitmap marks');
    }
  }

  /** The checkpoint maps for a superblock, each coarsened to its share of the payload room. */
  private checkpointRecords(state: 'active' | 'clean', owner: OwnerRecord | null, nowMs: number): CheckpointRecord[] {
    const checkpoints = this.checkpoints;
    if (checkpoints === null || checkpoints.count === 0) return [];
    let baseBytes = 0;
    for (const [index, legState] of this.perLeg.entries()) {
      if (legState == null || this.host.legs[index] === undefined) continue;
      const sb = superblockFor(this.plan, legState.layout, legState, this.members, this.events, state, owner, nowMs, [], this.generations);
      baseBytes = Math.max(baseBytes, superblockPayloadBytes(sb));
    }
    const nameBytes = checkpoints.names().reduce((sum, name) => sum + Buffer.byteLength(name) + 48, 0);
    const budgetBytes = Math.floor((kPayloadBytesMax - baseBytes - nameBytes - 128) / checkpoints.count);
    return checkpoints.toRecords(Math.max(2, budgetBytes));
  }

  /** Stops the timers without writing (the daemon is failing anyway; the next start sees an unclean stop). */
  abandon(): void {
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
    this.stopped = true;
    this.releaseHeld();
  }

  status(): KeeperStatus {
    const dirtyChunks = bitmapCount(this.durable, this.chunkCount);
    return {
      arrayUuid: this.plan.arrayUuid,
      arrayName: this.plan.arrayName,
      events: this.events,
      bitmapChunkBytes: this.chunkBytes,
      chunkCount: this.chunkCount,
      dirtyChunks,
      intentWaits: this.counters.intentWaits,
      bitmapWrites: this.counters.bitmapWrites,
      superblockWrites: this.counters.superblockWrites,
      members: this.members.map((member) => ({ ...member })),
    };
  }

  /** The legs' metadata slot and UUID (status, banner). */
  legMeta(index: number): { slotIndex: number; legUuid: string } | null {
    const state = this.perLeg[index];
    return state == null ? null : { slotIndex: state.slotIndex, legUuid: state.legUuid };
  }
}

assert(kMetaBlockBytes === 4096, 'bitmap pages are 4 KiB');
