/**
 * Leg lifecycle: how a leg leaves the mirror and how it comes back. A failure fences the leg's
 * old connection (`fencing`), then the reconnect timer (`degraded`, backoff), the reconnect
 * (`reconnecting`), the probe (`probation`) and the return (`resyncing` or `in-sync`); too many
 * failures within the window park it (`faulty`). Every change is a `LegHealth.move` (the
 * transition table in leg-health.ts). The request rules (what a write needs to succeed, what
 * gets marked) stay in mirror.ts; this file only moves legs between states.
 *
 * Thread: main thread (the session master).
 *
 * Invariants:
 * - A leg reaches `probation` only through `reconnectLeg`, which runs only from `degraded`
 *   (after a proven fence) or from `faulty`/`failed` after the operator's fence: nothing skips
 *   the fence (S4) or the probe (S5).
 * - The backoff attempt count grows with every reconnect; it starts over only after the leg
 *   stayed in sync for the policy's stable time (LegHealth), never on a mere reconnect.
 * - A leg that leaves spills its unflushed record into its dirty map at once, only where another
 *   leg holds the range (then that leg's later failure keeps its own copy as the one that counts).
 */
import type { Logger } from '../core/log.js';
import { describeError } from '../core/errors.js';
import type { DirtyMap } from '../bitmap/dirty-map.js';
import type { HealthPolicy, LegState } from './leg-health.js';
import type { Leg } from './leg.js';
import type { LegCheck, LegInfo } from './messages.js';

/** The lifecycle's timings, read from MirrorOptions (same names; a type here, so no import cycle with mirror.ts). */
export interface LifecycleTimings {
  fenceTimeoutMs?: number;
  legTimeoutMs?: number;
  probeTimeoutMs?: number;
  reconnectMinMs?: number;
  reconnectMaxMs?: number;
}

/** What the lifecycle needs of the session master. */
export interface LifecycleHost {
  readonly legs: readonly Leg[];
  isClosed(): boolean;
  sizeBytes(): number;
  emitState(leg: Leg): void;
  startResync(leg: Leg): void;
  /** Sends a FLUSH to every admitted leg (fire and forget; failures fail legs as usual). */
  flushLegs(): void;
  /** Marks the range on the leg unless no other leg holds it (mirror.ts); true when marked. */
  markUnlessSole(leg: Leg, offsetBytes: number, lengthBytes: number): boolean;
  /**
   * After the probe, before the leg takes client I/O: its on-leg metadata is checked (a leg that
   * is not the one that left is marked for a full resync) and brought up to date. false: that
   * metadata I/O failed.
   */
  admit(leg: Leg): Promise<boolean>;
}

/** A fence or probe as a LegCheck, a thrown error (a dead actor's RPC) included. */
export async function checkOf(pending: Promise<LegCheck>): Promise<LegCheck> {
  try {
    return await pending;
  } catch (error) {
    return { ok: false, reason: describeError(error) };
  }
}

export class LegLifecycle {
  /** Bumped on every leg failure; requests remember it at dispatch (SlotTable.seq). */
  failSeq = 0;

  constructor(
    private readonly host: LifecycleHost,
    private readonly options: LifecycleTimings,
    private readonly policy: HealthPolicy,
    private readonly logger: Logger,
  ) {}

  /** Every state change: the transition table check and log (leg-health.ts), then listeners. */
  move(leg: Leg, to: LegState, reason: string | null, fields: Record<string, unknown> = {}): void {
    leg.health.move(to, reason, fields);
    this.host.emitState(leg);
  }

  /**
   * The leg stops being up to date: it gets no more requests and every write it misses from
   * now on is marked at dispatch. Its old connection is fenced (fencing), then it reconnects
   * with backoff (degraded), or it is parked (faulty) after too many failures in the window.
   * `final`: failed by the operator or its actor died: out until `reconnectLegNow`.
   */
  failLeg(leg: Leg, reason: string, final = false): void {
    const state = leg.state;
    if (state === 'failed' || state === 'removed') return;
    if (!final && (state === 'fencing' || state === 'degraded' || state === 'reconnecting' || state === 'faulty')) return;
    leg.failures += 1;
    leg.epoch += 1;
    this.failSeq = (this.failSeq + 1) | 0;
    leg.failedAtSeq = this.failSeq;
    // Once we let go of the connection nothing tells us whether the server kept what it had not
    // flushed (it may crash while we are away): every leg that leaves may have lost its
    // unflushed writes. They are marked now, while the legs that hold them are known (a leg
    // that fails later sees these marks and keeps its own copy as the one that counts).
    this.spillUnflushed(leg);
    this.clearReconnect(leg);
    leg.resync?.nudge();
    const park = leg.health.recordFailure();
    if (final) {
      this.move(leg, 'failed', reason);
      if (!this.host.isClosed() && (leg.worker === null || leg.worker.threadId >= 0)) void leg.api.fence(this.fenceTimeoutMs).catch(() => undefined);
      return;
    }
    leg.parkWhenFenced = park;
    this.move(leg, 'fencing', reason, { inSyncLegs: this.host.legs.filter((other) => other.state === 'in-sync').length, recentFailures: leg.health.recentFailures });
    if (this.host.isClosed()) return;
    void this.fenceLeg(leg);
  }

  get fenceTimeoutMs(): number {
    return this.options.fenceTimeoutMs ?? 10_000;
  }

  get probeTimeoutMs(): number {
    const legTimeout = this.options.legTimeoutMs ?? 0;
    return this.options.probeTimeoutMs ?? (legTimeout > 0 ? legTimeout : 5000);
  }

  /**
   * Drains the leg's old connection (LegActorApi.fence). Proven: the leg may reconnect (or is
   * parked). Not proven in time: it stays fencing and the fence is tried again with backoff.
   */
  async fenceLeg(leg: Leg): Promise<void> {
    const check = await checkOf(leg.api.fence(this.fenceTimeoutMs));
    if (this.host.isClosed() || leg.state !== 'fencing') return;
    if (!check.ok) {
      leg.failureReason = `cannot fence the old connection: ${check.reason}`;
      this.logger.debug({ leg: leg.index, reason: check.reason }, 'fence not proven yet; retrying');
      this.host.emitState(leg);
      // Two fences may have run at once (the operator's reconnect): one retry timer.
      this.clearReconnect(leg);
      leg.reconnectTimer = setTimeout(() => {
        leg.reconnectTimer = null;
        void this.fenceLeg(leg);
      }, leg.health.nextDelayMs(this.options.reconnectMinMs ?? 250, this.options.reconnectMaxMs ?? 30_000));
      return;
    }
    if (leg.parkWhenFenced) {
      leg.parkWhenFenced = false;
      this.move(leg, 'faulty', `${leg.health.recentFailures} failures within ${Math.round(this.policy.failureWindowMs / 1000)} s; run 'enbd leg reconnect ${leg.index}' to try it again`);
      return;
    }
    this.move(leg, 'degraded', leg.failureReason);
    this.scheduleReconnect(leg);
  }

  scheduleReconnect(leg: Leg): void {
    if (this.host.isClosed() || leg.reconnectTimer !== null) return;
    const delayMs = leg.health.nextDelayMs(this.options.reconnectMinMs ?? 250, this.options.reconnectMaxMs ?? 30_000);
    leg.reconnectTimer = setTimeout(() => {
      leg.reconnectTimer = null;
      void this.reconnectLeg(leg);
    }, delayMs);
  }

  clearReconnect(leg: Leg): void {
    if (leg.reconnectTimer !== null) clearTimeout(leg.reconnectTimer);
    leg.reconnectTimer = null;
  }

  /**
   * One reconnect attempt of a fenced leg (degraded, or faulty/failed by the operator's
   * reconnect): connect, then probation (probe READ, WRITE back, FLUSH within the probe
   * timeout), then return. The leg takes no client I/O until the probe passed.
   */
  async reconnectLeg(leg: Leg): Promise<void> {
    if (this.host.isClosed() || (leg.state !== 'degraded' && leg.state !== 'faulty' && leg.state !== 'failed')) return;
    leg.health.attempts += 1;
    leg.reconnects += 1;
    this.move(leg, 'reconnecting', leg.failureReason, { attempt: leg.health.attempts });
    let info: LegInfo | { error: { message: string } };
    try {
      info = await leg.api.reconnect();
    } catch (error) {
      info = { error: { message: describeError(error) } };
    }
    if (this.host.isClosed()) return;
    if ((leg.state as LegState) !== 'reconnecting') {
      // Failed or removed by the operator meanwhile (l9): the connection that just opened is
      // not wanted; close it now rather than leave it open until the next fence.
      if (!('error' in info)) void leg.api.disconnect().catch(() => undefined);
      return;
    }
    let problem: string | null = null;
    if ('error' in info) problem = info.error.message;
    else if (info.sizeBytes < this.host.sizeBytes()) problem = `it has ${info.sizeBytes} bytes now, fewer than the export's ${this.host.sizeBytes()}`;
    else if (info.features.readOnly) problem = 'it is read-only now';
    if (problem !== null) {
      if (!('error' in info)) void leg.api.disconnect().catch(() => undefined);
      if (leg.health.recordFailure()) {
        this.move(leg, 'faulty', `reconnect failed: ${problem}; ${leg.health.recentFailures} failures within the window`);
        return;
      }
      this.move(leg, 'degraded', `reconnect failed: ${problem}`);
      this.scheduleReconnect(leg);
      return;
    }
    leg.info = info as LegInfo;
    await this.probation(leg);
  }

  /** Probation: the probe must pass before the leg takes client I/O again. */
  async probation(leg: Leg): Promise<void> {
    this.move(leg, 'probation', null);
    // A failure bumps the epoch: a probation that resumes after the leg failed and reached a
    // new probation (its own probe not passed yet) must not go on in that one's place.
    const epoch = leg.epoch;
    const check = await checkOf(leg.api.probe(this.probeTimeoutMs));
    if (this.host.isClosed() || leg.state !== 'probation' || leg.epoch !== epoch) return;
    if (!check.ok) {
      this.failLeg(leg, `probation failed: ${check.reason}`);
      return;
    }
    const admitted = await this.host.admit(leg);
    if (this.host.isClosed() || (leg.state as LegState) !== 'probation' || leg.epoch !== epoch) return;
    if (!admitted) {
      this.failLeg(leg, 'probation failed: its metadata could not be read or written');
      return;
    }
    this.legReturned(leg);
  }

  /**
   * The leg leaves: its unflushed record goes into its dirty map (mergeUnflushed). What it alone
   * held stays in the record: its server may still lose it while the leg is out, and by the time
   * the leg returns another leg may hold it (legReturned merges again).
   */
  spillUnflushed(leg: Leg): void {
    leg.flushSlot = -1;
    leg.flushSkipped = false;
    if (leg.unflushed === null || leg.dirty === null) return;
    for (const half of leg.unflushed) this.mergeUnflushed(leg, half);
  }

  /**
   * The leg may have lost its unflushed writes (`from`, an unflushed half): mark them in its
   * dirty map wherever another leg holds the range (markUnlessSole). Where no other leg does,
   * the leg's own copy is the only one there is, and marking it would leave the range
   * unreadable everywhere.
   */
  mergeUnflushed(leg: Leg, from: DirtyMap): void {
    from.forEachDirtyRun((firstChunk, chunkCount) => {
      for (let index = firstChunk; index < firstChunk + chunkCount; index += 1) {
        const offsetBytes = index * from.chunkBytes;
        const lengthBytes = Math.min(from.chunkBytes, from.deviceBytes - offsetBytes);
        // Marked: the dirty map has it now. Not marked (the leg alone holds it): kept.
        if (this.host.markUnlessSole(leg, offsetBytes, lengthBytes)) from.clearRange(offsetBytes, lengthBytes);
      }
    });
  }

  /**
   * A fenced, reconnected leg passed probation. Its dirty map says what it missed (plus the
   * unflushed writes it may have lost, spilled when it left): empty -> in sync; else it
   * resyncs, taking writes at once and serving reads of the ranges it holds.
   */
  legReturned(leg: Leg): void {
    const dirty = leg.dirty as DirtyMap;
    const unflushed = leg.unflushed as [DirtyMap, DirtyMap];
    leg.flushSlot = -1;
    leg.flushSkipped = false;
    leg.epoch += 1;
    // Writes it alone held when it left may have been lost while it was out (its server may have
    // restarted): where another leg holds them now, they are copied again. The rest is durable
    // now (the probe ended with a FLUSH), or the leg's copy is the only one there is.
    for (const half of unflushed) {
      this.mergeUnflushed(leg, half);
      half.clearAll();
    }
    if (dirty.dirtyChunkCount() === 0) {
      this.setInSync(leg, 'it missed no writes');
      return;
    }
    const source = this.host.legs.some((other) => other !== leg && other.admitted);
    this.move(leg, 'resyncing', null, { dirtyBytes: dirty.dirtyBytes(), source });
    this.host.startResync(leg);
    for (const other of this.host.legs) if (other !== leg && other.state === 'resyncing') this.host.startResync(other);
  }

  setInSync(leg: Leg, why: string): void {
    this.move(leg, 'in-sync', null, { why });
    for (const other of this.host.legs) if (other.state === 'resyncing') this.host.startResync(other);
  }


  onResyncDone(leg: Leg): void {
    if (leg.state !== 'resyncing' || (leg.dirty?.dirtyChunkCount() ?? 0) !== 0) return;
    this.setInSync(leg, 'resync complete');
    // The copies are unflushed writes on the leg until a FLUSH: make them durable now, so a
    // later failure of the leg does not spill (and copy again) the whole resync.
    this.host.flushLegs();
  }

  /** The actor reported that the leg's connection dropped on its own (or an idle probe failed). */
  onLegDropped(leg: Leg): void {
    if (!leg.admitted && leg.state !== 'probation') return;
    this.failLeg(leg, 'connection dropped');
  }


  /**
   * True when `leg` alone holds some chunk among `others`: clean there and dirty on every one
   * of them (taking it out would make that chunk unreadable, or lose it for good).
   */
  soleHolder(leg: Leg, others: Leg[]): boolean {
    const mine = leg.dirty;
    if (mine === null || this.host.sizeBytes() === 0) return false;
    const maps = others.map((other) => other.dirty).filter((map): map is DirtyMap => map !== null && map !== mine);
    if (maps.length === 0) return mine.firstCleanChunk(0, mine.chunkCount) < mine.chunkCount;
    const end = mine.chunkCount;
    let chunk = 0;
    while (chunk < end) {
      chunk = mine.firstCleanChunk(chunk, end);
      if (chunk >= end) return false;
      const cleanEnd = mine.firstDirtyChunk(chunk, end);
      // Is some chunk of [chunk, cleanEnd) dirty on every other map? Intersect by leapfrog.
      let at = chunk;
      while (at < cleanEnd) {
        let highest = at;
        for (const map of maps) highest = Math.max(highest, map.firstDirtyChunk(at, cleanEnd));
        if (highest >= cleanEnd) break;
        if (maps.every((map) => map.isChunkDirty(highest))) return true;
        at = highest === at ? at + 1 : highest;
      }
      chunk = cleanEnd;
    }
    return false;
  }

}
