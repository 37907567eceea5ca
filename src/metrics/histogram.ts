/**
 * A Prometheus histogram read from LatencyHistograms snapshots at scrape time. The engine
 * records latencies itself (allocation-free, in ms, src/core/latency.ts); this class only
 * turns a snapshot into exposition values, in seconds:
 *
 *   NAME_bucket{LABELS,le="B"}  cumulative count at or below B s   (one line per bound)
 *   NAME_bucket{LABELS,le="+Inf"} count
 *   NAME_sum{LABELS}            sum of the observations in s
 *   NAME_count{LABELS}          count
 *
 * Thread: main thread (the scrape handler). Nothing here runs on the request path.
 *
 * How it plugs into prom-client (15.x): it is a prom-client Histogram (so a Registry takes
 * it like any other metric) whose `getForPromString()` is replaced. The Registry renders a
 * metric from `getForPromString()` when the metric has one, and Histogram's own `get()` (JSON)
 * calls it too, so both views come from the snapshot. The stock histogram state (observe())
 * stays empty and unused. test/unit/metrics/histogram.test.ts pins this behaviour.
 *
 * Invariants (asserted per scrape): bucket counts are cumulative, so non-decreasing along the
 * bounds; the +Inf bucket equals the count; the bounds are kLatencyBucketsMs.
 */
import { Histogram, type Registry } from 'prom-client';
import { assert } from '../core/assert.js';
import { kLatencyBucketsMs, type LatencySnapshot } from '../core/latency.js';

/** The latency bucket bounds in seconds (the unit Prometheus expects). */
export const kLatencyBucketsSeconds: readonly number[] = kLatencyBucketsMs.map((ms) => ms / 1000);

/** One labelled series of a snapshot histogram. */
export interface HistogramSeries<Label extends string> {
  labels: Readonly<Record<Label, string>>;
  snapshot: LatencySnapshot;
}

/** One exposition line as prom-client's Registry reads it. */
export interface ExpositionValue {
  metricName: string;
  labels: Record<string, string | number>;
  /** prom-client splices these into `labels` for JSON; always empty here. */
  sharedLabels: Record<string, string>;
  value: number;
}

/** What prom-client's Registry reads from a metric. */
export interface ExpositionMetric {
  name: string;
  help: string;
  type: 'histogram';
  values: ExpositionValue[];
  aggregator: 'sum';
}

type LineLabels = Record<string, string | number>;

function line(metricName: string, labels: LineLabels, value: number): ExpositionValue {
  return { metricName, labels, sharedLabels: {}, value };
}

/**
 * The exposition values of one series: a `_bucket` line per bound (le in seconds), `+Inf`,
 * `_sum` (seconds) and `_count`.
 */
export function snapshotValues(
  name: string,
  labels: Readonly<Record<string, string>>,
  snapshot: LatencySnapshot,
): ExpositionValue[] {
  const boundCount = kLatencyBucketsSeconds.length;
  assert(snapshot.bucketsMs.length === boundCount, 'snapshot uses kLatencyBucketsMs');
  assert(snapshot.cumulative.length === boundCount + 1, 'snapshot has one count per bound, +Inf');
  const values: ExpositionValue[] = [];
  let previous = 0;
  for (let bucket = 0; bucket <= boundCount; bucket += 1) {
    const cumulative = snapshot.cumulative[bucket] ?? 0;
    assert(cumulative >= previous, `bucket ${bucket} of ${name} is cumulative`);
    previous = cumulative;
    const le = bucket < boundCount ? (kLatencyBucketsSeconds[bucket] as number) : '+Inf';
    values.push(line(`${name}_bucket`, { ...labels, le }, cumulative));
  }
  assert(previous === snapshot.count, `+Inf bucket of ${name} equals its count`);
  values.push(line(`${name}_sum`, { ...labels }, snapshot.sumMs / 1000));
  values.push(line(`${name}_count`, { ...labels }, snapshot.count));
  return values;
}

export interface SnapshotHistogramOptions<Label extends string> {
  name: string;
  help: string;
  labelNames: readonly Label[];
  registry: Registry;
  /** Called once per scrape: the series to expose now. */
  read: () => readonly HistogramSeries<Label>[];
}

export class SnapshotHistogram<Label extends string> extends Histogram<Label> {
  private readonly metricName: string;
  private readonly helpText: string;
  private readonly read: () => readonly HistogramSeries<Label>[];

  constructor(options: SnapshotHistogramOptions<Label>) {
    assert(!options.labelNames.includes('le' as Label), 'le is the bucket label');
    super({
      name: options.name,
      help: options.help,
      labelNames: options.labelNames,
      buckets: [...kLatencyBucketsSeconds],
      registers: [options.registry],
    });
    this.metricName = options.name;
    this.helpText = options.help;
    this.read = options.read;
  }

  /** Replaces prom-client's: the Registry renders this metric from what it returns. */
  async getForPromString(): Promise<ExpositionMetric> {
    const values: ExpositionValue[] = [];
    for (const series of this.read()) {
      values.push(...snapshotValues(this.metricName, series.labels, series.snapshot));
    }
    const name = this.metricName;
    return { name, help: this.helpText, type: 'histogram', values, aggregator: 'sum' };
  }
}
