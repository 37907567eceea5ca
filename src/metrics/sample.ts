/**
 * Scrape-time sampling of the mirror and the NBD server: one `MirrorSample` per scrape, taken
 * before the Registry renders, that every collector reads (so one scrape shows one moment).
 *
 * Thread: main thread. Nothing here runs on the request path: the engine's counters and
 * histograms are plain fields it bumps anyway; this module only reads them when scraped.
 *
 * Reads the engine only through its face (src/engine/view.ts MirrorView): counters, ring
 * counters, latency histograms, leg stats with a timeout.
 *
 * Bounds:
 * - legStats(timeoutMs) asks every leg actor over comlink; a busy or hung actor must not stall
 *   a scrape. The engine answers null for an actor that is late, and the call is also raced
 *   against `legStatsTimeoutMs` here; on timeout (or error, or a listed leg without an answer)
 *   the sample carries `legStats: null` and the per-leg actor series are left out of that
 *   scrape.
 * - At most one legStats() call is outstanding: a scrape that finds the previous call still
 *   pending waits on that one instead of stacking another request on a stuck actor.
 */
import type { KeeperStatus } from '../core/status-types.js';
import type { Logger } from '../core/log.js';
import type { LatencySnapshot } from '../core/latency.js';
import { assert } from '../core/assert.js';
import type { LegStats, MirrorStats, MirrorView } from '../engine/view.js';

/** What metrics read from the mirror: a part of the engine's face (MirrorDevice has it all). */
export type MetricsMirror = Pick<MirrorView, 'sizeBytes' | 'inFlight' | 'stats' | 'legStats' | 'ringCounters' | 'metadataStatus'> & {
  readonly latency: Pick<MirrorView['latency'], 'kinds' | 'snapshot'>;
};

/** What metrics read from the NBD server (NbdServer satisfies it). */
export interface MetricsNbdServer {
  readonly connectionCount: number;
  /** Requests parsed from clients and not yet answered. */
  readonly inFlight: number;
  payloadStats(): { bytesCopied: number; bytesDirect: number };
}

export interface MirrorSample {
  stats: MirrorStats;
  /** Per-leg actor statistics indexed by leg index, or null when they timed out or failed. */
  legStats: readonly (LegStats | undefined)[] | null;
  latency: { op: string; snapshot: LatencySnapshot }[];
  exportBytes: number;
  /** The on-leg metadata, or null with --metadata none. */
  metadata: KeeperStatus | null;
  engineInFlight: number;
  ringSlotCount: number;
  ringSlotBytes: number;
  ringSlotsFree: number;
  ringRequests: number;
  connectionCount: number;
  serverInFlight: number;
  payloadBytesCopied: number;
  payloadBytesDirect: number;
}

export const kLegStatsTimeoutMsDefault = 500;

export class Sampler {
  private latestSample: MirrorSample | null = null;
  private pendingLegStats: Promise<Array<LegStats | null>> | null = null;
  /** The last scrape went without leg stats: log the next failure at debug, not warn. */
  private legStatsMissing = false;

  constructor(
    private readonly mirror: MetricsMirror,
    private readonly server: MetricsNbdServer,
    private readonly legStatsTimeoutMs: number,
    private readonly logger: Logger,
  ) {
    assert(Number.isInteger(legStatsTimeoutMs), 'legStatsTimeoutMs is an integer');
    assert(legStatsTimeoutMs > 0, 'legStatsTimeoutMs is positive');
  }

  /** The sample of the latest scrape (null before the first). */
  get latest(): MirrorSample | null {
    return this.latestSample;
  }

  /** Takes a new sample (waits at most legStatsTimeoutMs for the leg actors). */
  async refresh(): Promise<MirrorSample> {
    const answered = await this.boundedLegStats();
    const mirror = this.mirror;
    const stats = mirror.stats();
    const legStats = this.wholeOrNone(answered, stats);
    const ring = mirror.ringCounters();
    const server = this.server;
    const payload = server.payloadStats();
    const histograms = mirror.latency;
    const latency = histograms.kinds.map((op, kind) => {
      return { op, snapshot: histograms.snapshot(kind) };
    });
    const sample: MirrorSample = {
      stats,
      legStats,
      latency,
      exportBytes: mirror.sizeBytes,
      metadata: mirror.metadataStatus(),
      engineInFlight: mirror.inFlight,
      ringSlotCount: ring.slotCount,
      ringSlotBytes: ring.slotBytes,
      ringSlotsFree: ring.freeCount,
      ringRequests: ring.inUse,
      connectionCount: server.connectionCount,
      serverInFlight: server.inFlight,
      payloadBytesCopied: payload.bytesCopied,
      payloadBytesDirect: payload.bytesDirect,
    };
    assert(sample.ringSlotsFree <= sample.ringSlotCount, 'free slots within the ring');
    this.latestSample = sample;
    return sample;
  }

  private async boundedLegStats(): Promise<Array<LegStats | null> | null> {
    let call = this.pendingLegStats;
    if (call === null) {
      try {
        call = this.mirror.legStats(this.legStatsTimeoutMs);
      } catch (error) {
        call = Promise.reject(error instanceof Error ? error : new Error(String(error)));
      }
      this.pendingLegStats = call;
      const settled = (): void => {
        if (this.pendingLegStats === call) this.pendingLegStats = null;
      };
      call.then(settled, settled);
    }
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<null>((resolve) => {
      timer = setTimeout(() => resolve(null), this.legStatsTimeoutMs);
    });
    let result: Array<LegStats | null> | null;
    try {
      result = await Promise.race([call, timeout]);
      if (result === null) this.noteMissing({ timeoutMs: this.legStatsTimeoutMs }, 'timed out');
    } catch (error) {
      result = null;
      this.noteMissing({ err: error }, 'failed');
    } finally {
      clearTimeout(timer);
    }
    return result;
  }

  /** All listed legs' actor stats, or null (logged) when one of them gave no answer. */
  private wholeOrNone(answered: Array<LegStats | null> | null, stats: MirrorStats): Array<LegStats | undefined> | null {
    if (answered === null) return null;
    const late = stats.legs.find((leg) => answered[leg.index] === null);
    if (late !== undefined) {
      this.noteMissing({ timeoutMs: this.legStatsTimeoutMs, leg: late.index }, 'timed out');
      return null;
    }
    this.legStatsMissing = false;
    return answered.map((entry) => entry ?? undefined);
  }

  /** Logs a missing legStats once at warn when it starts, then at debug until it recovers. */
  private noteMissing(details: Record<string, unknown>, what: string): void {
    const level = this.legStatsMissing ? 'debug' : 'warn';
    this.legStatsMissing = true;
    this.logger[level](details, `metrics: leg stats ${what}; leg actor series left out`);
  }
}
