/**
 * Resync of one returning leg: walks the leg's dirty map and copies every dirty run from an
 * up-to-date leg, clearing the bits as each copy completes, at a bounded rate, with progress.
 *
 * Thread: main thread (the session master's event loop). The scheduling lives here, beside the
 * range lock it must take; the bytes never touch this thread: each copy is a ring slot that a
 * source leg's connection actor READs into and the target leg's actor WRITEs from (zero
 * userspace copies). See ARCHITECTURE.md, "Resync".
 *
 * Design notes
 * - Runs are coalesced: adjacent dirty chunks become one copy of up to `maxCopyBytes`, and a
 *   clean gap of at most `gapBytes` between two dirty runs is copied with them (one READ and
 *   one WRITE instead of two each: a few clean KiB cost less than a round trip; the source
 *   must hold the gap too, which the host's piece split checks).
 * - A window of copies, not lanes: one loop walks the map from a cursor and starts copies
 *   (without awaiting them) while fewer than `maxCopies` are in flight and their ring
 *   footprint (host.footprintBytes) stays within `maxFootprintBytes` (kBusyCopies at most while
 *   a client request came within 50 ms: client requests queue behind copies on the legs); each
 *   completion wakes the loop to refill. Copies start synchronously in one burst (the rate check is synchronous
 *   unless it must wait), so the host stages a whole burst before one publish per leg. Each
 *   copy holds the range lock of its run for its READ and WRITE, so a client write to that
 *   range waits for at most one copy and is never overwritten by stale data.
 * - Passes: the cursor only moves forward, so no two copies in flight overlap; at the end of
 *   the map the loop waits for the copies in flight, then starts over at 0 for what is left
 *   (no source, failed source, chunks marked again); a pass that copied nothing sleeps
 *   kNoSourceRetryMs first (no spinning while no leg holds a run).
 * - Rate: a token bucket refilled at the ceiling while clients are idle and at the floor while
 *   they are busy (md's speed_limit_min/max), taken before each copy starts. A ceiling of 0
 *   means unlimited.
 * - The resync ends when a pass finds the map empty with no copy in flight; it stops early
 *   when the leg leaves the resyncing state (it failed again, or the daemon stops).
 *
 * Invariants:
 * - Bits are cleared only by the host's copy completion (after the target acknowledged the
 *   WRITE), never here.
 * - Copies in flight cover disjoint ranges; at most maxCopies of them, and their footprint is
 *   within maxFootprintBytes (one copy may start alone whatever its footprint).
 * - Bytes started by time t never exceed the bucket's burst plus the rate times the time
 *   since the start (the rate is the one in force; it changes only through setRates).
 */
import { RateWindow } from './rate-window.js';
import { TokenBucket } from './token-bucket.js';
import type { Logger } from '../core/log.js';
import type { DirtyMap, DirtyRun } from '../bitmap/dirty-map.js';
import type { ResyncProgress } from '../core/status-types.js';

export type CopyOutcome = 'copied' | 'no-source' | 'source-failed' | 'target-failed' | 'stopped';

export interface ResyncHost {
  /** Copies [offset, offset+length) from an up-to-date leg to `legIndex`; clears its bits on success. */
  copyRange(legIndex: number, offsetBytes: number, lengthBytes: number): Promise<CopyOutcome>;
  /** True while `legIndex` is still resyncing (not failed again, daemon not stopping). */
  stillResyncing(legIndex: number): boolean;
  /** True when a client request arrived within the last `windowMs`. */
  clientBusy(windowMs: number): boolean;
  /** The resync found the map empty: the leg is up to date. */
  resyncDone(legIndex: number): void;
  /** Ring bytes a copy of `lengthBytes` holds while in flight (default: lengthBytes). */
  footprintBytes?(lengthBytes: number): number;
}

/** How many copies a resync keeps in flight and how it shapes them (see the design notes). */
export interface ResyncWindow {
  /** Copies in flight at most (default 4). */
  maxCopies?: number;
  /** The largest copy (default 1 MiB). */
  maxCopyBytes?: number;
  /** Clean bytes between two dirty runs copied with them (default 0: only adjacent chunks). */
  gapBytes?: number;
  /** Footprint of the copies in flight at most (default: unbounded, maxCopies decides). */
  maxFootprintBytes?: number;
}

export interface ResyncRates {
  /** Floor in bytes/s, kept even while clients are busy. */
  minBytesPerSecond: number;
  /** Ceiling in bytes/s while clients are idle; 0 = unlimited. */
  maxBytesPerSecond: number;
}

export type { ResyncProgress };

const kBusyWindowMs = 500;
/** Copies in flight at most while clients are busy (client requests queue behind copies). */
export const kBusyCopies = 16;
/** "Busy" for the window: a client request within this many ms (the rate uses kBusyWindowMs). */
const kBusyCopiesWindowMs = 50;
const kNoSourceRetryMs = 200;
const kProgressLogMs = 5000;

export class Resync {
  private cursorChunk = 0;
  private readonly run: DirtyRun = { firstChunk: 0, chunkCount: 0 };
  private readonly nextRun: DirtyRun = { firstChunk: 0, chunkCount: 0 };
  private inFlight = 0;
  private footprintInFlight = 0;
  /** Copies that succeeded in the current pass (a pass without any sleeps before the next). */
  private copiedThisPass = 0;
  /** A copy ended with target-failed or stopped: start nothing more in this run of the loop. */
  private halted = false;
  /** This pass found nothing after the cursor (the next pass starts at 0 and looks again). */
  private passAtEnd = false;
  private bytesDone = 0;
  private bytesTotal = 0;
  private startedAt = 0;
  private running = false;
  private paused = false;
  private readonly bucket = new TokenBucket();
  /** Copy rate over the last 10 s (0 while paused; no early spike). */
  private readonly rateWindow = new RateWindow();
  private lastLog = 0;
  private readonly wakers: Array<() => void> = [];
  /** The loop waiting for a copy to end (no timer: a completion or nudge resolves it). */
  private loopWaker: (() => void) | null = null;
  private readonly maxCopies: number;
  private readonly maxCopyBytes: number;
  private readonly gapChunks: number;
  private readonly maxFootprintBytes: number;

  /**
   * `window`: a ResyncWindow, or (older form) the number of copies in flight, with
   * `maxCopyBytes` as the next argument.
   */
  constructor(
    readonly legIndex: number,
    private readonly map: DirtyMap,
    private readonly host: ResyncHost,
    private rates: ResyncRates,
    private readonly logger: Logger,
    window: ResyncWindow | number = {},
    maxCopyBytes?: number,
  ) {
    const shape: ResyncWindow = typeof window === 'number' ? { maxCopies: window, maxCopyBytes } : window;
    this.maxCopies = Math.max(1, Math.floor(shape.maxCopies ?? 4));
    this.maxCopyBytes = Math.max(1, shape.maxCopyBytes ?? 1024 * 1024);
    this.gapChunks = Math.max(0, Math.floor((shape.gapBytes ?? 0) / map.chunkBytes));
    this.maxFootprintBytes = shape.maxFootprintBytes ?? Number.POSITIVE_INFINITY;
  }

  get isRunning(): boolean {
    return this.running;
  }

  setRates(rates: ResyncRates): void {
    this.rates = rates;
    this.nudge();
  }

  pause(): void {
    this.paused = true;
  }

  resume(): void {
    this.paused = false;
    this.nudge();
  }

  /** Wakes the loop and every timed wait (a copy ended, a source came back, rates changed, resumed). */
  nudge(): void {
    this.wakeLoop();
    for (const wake of this.wakers.splice(0)) wake();
  }

  progress(): ResyncProgress {
    const bytesLeft = this.map.dirtyBytes();
    const now = Date.now();
    const rate = this.running ? this.rateWindow.rate(now) : 0;
    // An ETA needs a rate from a second of copying at least, and none while paused.
    const eta = !this.paused && rate > 0 && now - this.startedAt >= 1000 ? Math.ceil(bytesLeft / rate) : null;
    return {
      leg: this.legIndex,
      running: this.running,
      paused: this.paused,
      bytesDone: this.bytesDone,
      bytesLeft,
      bytesTotal: Math.max(this.bytesTotal, this.bytesDone + bytesLeft),
      bytesPerSecond: Math.round(rate),
      etaSeconds: eta,
      startedAt: this.startedAt,
      copiesInFlight: this.inFlight,
    };
  }

  /** Runs until the map is empty (then host.resyncDone) or the leg stops resyncing. */
  async start(): Promise<void> {
    if (this.running) return;
    this.running = true;
    this.startedAt = Date.now();
    this.bucket.refillFrom(this.startedAt);
    this.rateWindow.reset(this.startedAt);
    this.lastLog = this.startedAt;
    this.bytesDone = 0;
    this.bytesTotal = this.map.dirtyBytes();
    this.cursorChunk = 0;
    this.logger.info({ leg: this.legIndex, bytesLeft: this.bytesTotal }, 'resync started');
    for (;;) {
      await this.loop();
      // The leg may have failed and come back while the copies were winding down: its return
      // only nudged this (still running) resync, so go on rather than leave it unserved.
      if (!this.host.stillResyncing(this.legIndex) || this.map.dirtyChunkCount() === 0) break;
      await this.sleep(50);
    }
    this.running = false;
    const progress = this.progress();
    if (this.host.stillResyncing(this.legIndex) && this.map.dirtyChunkCount() === 0) {
      const seconds = (Date.now() - this.startedAt) / 1000;
      this.logger.info({ leg: this.legIndex, bytesDone: this.bytesDone, seconds }, 'resync complete');
      this.host.resyncDone(this.legIndex);
    } else {
      this.logger.info({ ...progress }, 'resync stopped');
    }
  }

  /** Keeps the window full until the map is empty, the leg stops resyncing, or a copy halts it. */
  private async loop(): Promise<void> {
    this.halted = false;
    this.copiedThisPass = 0;
    this.passAtEnd = false;
    while (this.host.stillResyncing(this.legIndex) && !this.halted) {
      if (this.paused) {
        await this.sleep(kNoSourceRetryMs);
        continue;
      }
      const waitMs = this.fill();
      if (this.halted) break;
      if (waitMs > 0) {
        // The rate: wait for tokens (a completion or nudge wakes it early to re-check).
        await this.sleep(Math.min(waitMs, 1000));
        continue;
      }
      if (this.inFlight > 0) {
        await this.copyEnded();
        continue;
      }
      // Nothing after the cursor and nothing in flight: start over from 0 for what is left
      // (no source, failed sources, chunks marked again); done when the map is empty.
      if (this.map.dirtyChunkCount() === 0) break;
      if (this.copiedThisPass === 0) await this.sleep(kNoSourceRetryMs);
      this.cursorChunk = 0;
      this.copiedThisPass = 0;
      this.passAtEnd = false;
    }
    while (this.inFlight > 0) await this.copyEnded();
  }

  /**
   * Starts copies from the cursor while the window has room. Returns 0 when it stopped for
   * the window or the end of the map, else the ms to wait for rate tokens.
   */
  private fill(): number {
    const chunkBytes = this.map.chunkBytes;
    const maxCopies = this.host.clientBusy(kBusyCopiesWindowMs) ? Math.min(this.maxCopies, kBusyCopies) : this.maxCopies;
    while (this.inFlight < maxCopies && !this.halted && !this.paused) {
      if (this.inFlight > 0 && this.footprintInFlight >= this.maxFootprintBytes) return 0;
      if (this.passAtEnd) return 0;
      if (!this.findRun(this.cursorChunk)) {
        this.passAtEnd = true;
        return 0;
      }
      const offsetBytes = this.run.firstChunk * chunkBytes;
      const lengthBytes = Math.min(this.run.chunkCount * chunkBytes, this.map.deviceBytes - offsetBytes);
      const footprint = this.host.footprintBytes?.(lengthBytes) ?? lengthBytes;
      if (this.inFlight > 0 && this.footprintInFlight + footprint > this.maxFootprintBytes) return 0;
      const waitMs = this.takeTokens(lengthBytes);
      if (waitMs > 0) return waitMs;
      this.cursorChunk = this.run.firstChunk + this.run.chunkCount;
      this.launch(offsetBytes, lengthBytes, footprint);
    }
    return 0;
  }

  /**
   * The next copy from `fromChunk` into this.run: a dirty run, extended over clean gaps of at
   * most gapChunks to the dirty runs after it, at most maxCopyBytes in all.
   */
  private findRun(fromChunk: number): boolean {
    const chunkBytes = this.map.chunkBytes;
    const maxChunks = Math.max(1, Math.floor(this.maxCopyBytes / chunkBytes));
    if (!this.map.nextDirtyRunInto(fromChunk, maxChunks, this.run)) return false;
    if (this.gapChunks === 0) return true;
    const first = this.run.firstChunk;
    let end = first + this.run.chunkCount;
    while (end - first < maxChunks) {
      const limit = Math.min(this.map.chunkCount, end + this.gapChunks + 1, first + maxChunks);
      const next = this.map.firstDirtyChunk(end, limit);
      if (next >= limit) break;
      if (!this.map.nextDirtyRunInto(next, first + maxChunks - next, this.nextRun)) break;
      end = this.nextRun.firstChunk + this.nextRun.chunkCount;
    }
    this.run.chunkCount = end - first;
    return true;
  }

  private launch(offsetBytes: number, lengthBytes: number, footprint: number): void {
    this.inFlight += 1;
    this.footprintInFlight += footprint;
    let outcome: Promise<CopyOutcome>;
    try {
      outcome = this.host.copyRange(this.legIndex, offsetBytes, lengthBytes);
    } catch (error) {
      outcome = Promise.reject(error);
    }
    outcome.then(
      (result) => this.copyDone(result, lengthBytes, footprint),
      (error: unknown) => {
        this.logger.error({ leg: this.legIndex, err: error, offsetBytes, lengthBytes }, 'resync copy threw');
        this.copyDone('stopped', lengthBytes, footprint);
      },
    );
  }

  private copyDone(outcome: CopyOutcome, lengthBytes: number, footprint: number): void {
    this.inFlight -= 1;
    this.footprintInFlight -= footprint;
    if (outcome === 'copied') {
      this.copiedThisPass += 1;
      this.account(lengthBytes);
    } else if (outcome === 'target-failed' || outcome === 'stopped') {
      this.halted = true;
    }
    // 'no-source' (no connected leg holds part of the run now) and 'source-failed': the run
    // stays dirty and is retried in the next pass, after a sleep if that pass copies nothing.
    this.wakeLoop();
  }

  private wakeLoop(): void {
    const wake = this.loopWaker;
    this.loopWaker = null;
    wake?.();
  }

  /** Resolves when a copy ends (or on nudge). */
  private async copyEnded(): Promise<void> {
    await new Promise<void>((resolve) => {
      this.loopWaker = resolve;
    });
  }

  private account(lengthBytes: number): void {
    this.bytesDone += lengthBytes;
    const now = Date.now();
    this.rateWindow.add(now, this.bytesDone);
    if (now - this.lastLog >= kProgressLogMs) {
      this.lastLog = now;
      this.logger.info({ ...this.progress() }, 'resync progress');
    }
  }

  private currentRate(): number {
    const { minBytesPerSecond, maxBytesPerSecond } = this.rates;
    if (this.host.clientBusy(kBusyWindowMs)) return minBytesPerSecond > 0 ? minBytesPerSecond : maxBytesPerSecond;
    return maxBytesPerSecond;
  }

  /** Token bucket: takes `bytes` and returns 0, or returns the ms until they may be copied (0 = unlimited). */
  private takeTokens(bytes: number): number {
    const rate = this.currentRate();
    const now = Date.now();
    if (rate <= 0) {
      this.bucket.refillFrom(now);
      return 0;
    }
    // Burst of at most 100 ms of rate (or one copy), so a pause does not bank a flood.
    return this.bucket.take(bytes, rate, now);
  }

  private async sleep(ms: number): Promise<void> {
    await new Promise<void>((resolve) => {
      const wake = (): void => {
        clearTimeout(timer);
        resolve();
      };
      const timer = setTimeout(() => {
        const at = this.wakers.indexOf(wake);
        if (at >= 0) this.wakers.splice(at, 1);
        resolve();
      }, ms);
      this.wakers.push(wake);
    });
  }
}
