/**
 * Allocation-free latency histograms, one per request kind: fixed bucket bounds in
 * milliseconds, counts in a Float64Array, plus count and sum (what a Prometheus histogram
 * exposes). `record` is on the request path: no allocation, a short linear scan.
 * Thread: the thread that owns the object (the session master).
 */

/** Upper bounds (ms) of the buckets; the last implicit bucket is +Inf. */
export const kLatencyBucketsMs: readonly number[] = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];

export interface LatencySnapshot {
  /** Upper bounds in ms, as kLatencyBucketsMs. */
  bucketsMs: readonly number[];
  /** Cumulative count at or below each bound (Prometheus `le` semantics), then +Inf. */
  cumulative: number[];
  count: number;
  sumMs: number;
}

export class LatencyHistograms {
  private readonly width = kLatencyBucketsMs.length + 1;
  private readonly counts: Float64Array;
  private readonly sums: Float64Array;
  private readonly totals: Float64Array;

  constructor(readonly kinds: readonly string[]) {
    this.counts = new Float64Array(kinds.length * this.width);
    this.sums = new Float64Array(kinds.length);
    this.totals = new Float64Array(kinds.length);
  }

  /** Adds one observation of `ms` to kind number `kind` (index into `kinds`). */
  record(kind: number, ms: number): void {
    if (kind < 0 || kind >= this.kinds.length) return;
    const bounds = kLatencyBucketsMs;
    let bucket = 0;
    while (bucket < bounds.length && ms > (bounds[bucket] as number)) bucket += 1;
    const at = kind * this.width + bucket;
    this.counts[at] = (this.counts[at] as number) + 1;
    this.sums[kind] = (this.sums[kind] as number) + ms;
    this.totals[kind] = (this.totals[kind] as number) + 1;
  }

  snapshot(kind: number): LatencySnapshot {
    const cumulative: number[] = [];
    let running = 0;
    for (let bucket = 0; bucket < this.width; bucket += 1) {
      running += this.counts[kind * this.width + bucket] ?? 0;
      cumulative.push(running);
    }
    return { bucketsMs: kLatencyBucketsMs, cumulative, count: this.totals[kind] ?? 0, sumMs: this.sums[kind] ?? 0 };
  }

  /** Mean in ms over everything recorded for `kind` (0 when none). */
  meanMs(kind: number): number {
    const count = this.totals[kind] ?? 0;
    return count === 0 ? 0 : (this.sums[kind] ?? 0) / count;
  }
}
