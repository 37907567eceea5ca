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
 * - Runs are coalesced: adjacent dirty chunks become one copy of up to `maxCopyBytes`.
 * - `lanes` copies run at once (each holds the range lock of its run for the READ and the
 *   WRITE, so a client write to that range waits for at most one copy and is never overwritten
 *   by stale data).
 * - Rate: a token bucket refilled at the ceiling while clients are idle and at the floor while
 *   they are busy (md's speed_limit_min/max). A ceiling of 0 means unlimited.
 * - The resync ends when a full pass finds the map empty with no copy in flight; it stops
 *   early when the leg leaves the resyncing state (it failed again, or the daemon stops).
 *
 * Invariants:
 * - Bits are cleared only by the host's copy completion (after the target acknowledged the
 *   WRITE), never here.
 */
import { RateWindow } from './rate-window.js';
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
}

export interface ResyncRates {
  /** Floor in bytes/s, kept even while clients are busy. */
  minBytesPerSecond: number;
  /** Ceiling in bytes/s while clients are idle; 0 = unlimited. */
  maxBytesPerSecond: number;
}

export type { ResyncProgress };

const kBusyWindowMs = 500;
const kNoSourceRetryMs = 200;
const kProgressLogMs = 5000;

export class Resync {
  private cursorChunk = 0;
  private readonly run: DirtyRun = { firstChunk: 0, chunkCount: 0 };
  private inFlight = 0;
  private bytesDone = 0;
  private bytesTotal = 0;
  private startedAt = 0;
  private running = false;
  private paused = false;
  private tokens = 0;
  private lastRefill = 0;
  /** Copy rate over the last 10 s (0 while paused; no early spike). */
  private readonly rateWindow = new RateWindow();
  private lastLog = 0;
  private readonly wakers: Array<() => void> = [];

  constructor(
    readonly legIndex: number,
    private readonly map: DirtyMap,
    private readonly host: ResyncHost,
    private rates: ResyncRates,
    private readonly logger: Logger,
    private readonly lanes = 4,
    private readonly maxCopyBytes = 1024 * 1024,
  ) {}

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

  /** Wakes every waiting lane (a copy ended, a source came back, rates changed, resumed). */
  nudge(): void {
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
    this.lastRefill = this.startedAt;
    this.rateWindow.reset(this.startedAt);
    this.lastLog = this.startedAt;
    this.bytesDone = 0;
    this.bytesTotal = this.map.dirtyBytes();
    this.cursorChunk = 0;
    this.logger.info({ leg: this.legIndex, bytesLeft: this.bytesTotal }, 'resync started');
    for (;;) {
      const lanes: Promise<void>[] = [];
      for (let lane = 0; lane < this.lanes; lane += 1) lanes.push(this.lane());
      await Promise.all(lanes);
      // The leg may have failed and come back while the lanes were winding down: its return
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

  private async lane(): Promise<void> {
    const chunkBytes = this.map.chunkBytes;
    const maxChunks = Math.max(1, Math.floor(this.maxCopyBytes / chunkBytes));
    while (this.host.stillResyncing(this.legIndex)) {
      if (this.paused) {
        await this.sleep(kNoSourceRetryMs);
        continue;
      }
      if (!this.map.nextDirtyRunInto(this.cursorChunk, maxChunks, this.run)) {
        // Nothing after the cursor. While other lanes still copy, wait for them (their runs
        // are still dirty: wrapping now would copy them twice). Then start over from 0 for
        // what is left behind the cursor (failed copies, chunks marked again); done when the
        // map is empty.
        if (this.inFlight > 0) {
          await this.sleep(kNoSourceRetryMs);
          continue;
        }
        if (this.map.dirtyChunkCount() === 0) return;
        if (this.cursorChunk === 0) await this.sleep(kNoSourceRetryMs);
        this.cursorChunk = 0;
        continue;
      }
      const firstChunk = this.run.firstChunk;
      const chunkCount = this.run.chunkCount;
      this.cursorChunk = firstChunk + chunkCount;
      const offsetBytes = firstChunk * chunkBytes;
      const lengthBytes = Math.min(chunkCount * chunkBytes, this.map.deviceBytes - offsetBytes);
      // Counted in flight from here, so no other lane wraps around onto this run meanwhile.
      this.inFlight += 1;
      let outcome: CopyOutcome = 'stopped';
      try {
        await this.takeTokens(lengthBytes);
        outcome = await this.host.copyRange(this.legIndex, offsetBytes, lengthBytes);
      } finally {
        this.inFlight -= 1;
      }
      // Wake lanes waiting at the end of the map only on progress (or exit): a copy that found
      // no source answers at once, and waking each other on that would spin in microtasks.
      if (outcome === 'copied') {
        this.account(lengthBytes);
        this.nudge();
      } else if (outcome === 'target-failed' || outcome === 'stopped') {
        this.nudge();
        return;
      } else if (outcome === 'no-source') {
        // No connected leg holds (part of) this run now: it stays dirty and is retried when the
        // lanes wrap around; the runs after it may have a source, so go on with them.
        await this.sleep(kNoSourceRetryMs);
      } else {
        // The source failed: the run stays dirty; try it again.
        this.cursorChunk = Math.min(this.cursorChunk, firstChunk);
        await this.sleep(kNoSourceRetryMs);
      }
    }
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

  /** Token bucket: waits until `bytes` may be copied at the current rate (0 = unlimited). */
  private async takeTokens(bytes: number): Promise<void> {
    for (;;) {
      const rate = this.currentRate();
      const now = Date.now();
      if (this.paused && this.host.stillResyncing(this.legIndex)) {
        await this.sleep(200);
        continue;
      }
      if (rate <= 0) {
        this.lastRefill = now;
        return;
      }
      // Burst of at most 100 ms of rate (or one copy), so a pause does not bank a flood.
      const burst = Math.max(bytes, rate / 10);
      this.tokens = Math.min(burst, this.tokens + ((now - this.lastRefill) * rate) / 1000);
      this.lastRefill = now;
      if (this.tokens >= bytes) {
        this.tokens -= bytes;
        return;
      }
      const waitMs = Math.max(1, Math.ceil(((bytes - this.tokens) * 1000) / rate));
      await this.sleep(Math.min(waitMs, 1000));
      if (!this.host.stillResyncing(this.legIndex)) return;
      while (this.paused && this.host.stillResyncing(this.legIndex)) await this.sleep(200);
    }
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
