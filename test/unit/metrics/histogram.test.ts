/**
 * SnapshotHistogram: a LatencyHistograms snapshot rendered through a prom-client Registry as a
 * Prometheus histogram in seconds: bucket lines cumulative and monotonic, +Inf equal to the
 * count, sum in seconds, the same bucket lines prom-client's own Histogram prints for the same
 * observations, and bad snapshots refused.
 * Threads: test process main thread.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Histogram, Registry } from 'prom-client';
import { LatencyHistograms, kLatencyBucketsMs, type LatencySnapshot } from '../../../src/core/latency.js';
import { SnapshotHistogram, kLatencyBucketsSeconds, snapshotValues } from '../../../src/metrics/histogram.js';
import { checkHistogram, parseExposition, samplesOf, valueOf } from './exposition.js';

const kName = 'test_request_duration_seconds';
/** Latencies (ms) across every bucket: below the first bound, on bounds, between, past the last. */
const kObservationsMs = [0.01, 0.05, 0.07, 0.3, 0.5, 0.9, 1, 3, 3, 7.5, 42, 99, 180, 400, 999, 2000, 4000, 9000, 12000, 60000];

function histogramsOf(observationsMs: readonly number[]): LatencyHistograms {
  const histograms = new LatencyHistograms(['read', 'write']);
  for (const ms of observationsMs) histograms.record(1, ms);
  histograms.record(0, 0.2);
  return histograms;
}

async function render(histograms: LatencyHistograms): Promise<string> {
  const registry = new Registry();
  new SnapshotHistogram({
    name: kName,
    help: 'test',
    labelNames: ['op'],
    registry,
    read: () => histograms.kinds.map((op, kind) => ({ labels: { op }, snapshot: histograms.snapshot(kind) })),
  });
  return await registry.metrics();
}

test('bucket lines are cumulative and monotonic, and +Inf equals the count', async () => {
  const exposition = parseExposition(await render(histogramsOf(kObservationsMs)));
  const buckets = checkHistogram(exposition, kName, { op: 'write' });
  assert.equal(buckets.length, kLatencyBucketsMs.length + 1, 'one line per bound plus +Inf');
  assert.deepEqual(buckets.slice(0, -1).map((bucket) => bucket.le), [...kLatencyBucketsSeconds], 'bounds in seconds');
  assert.equal(valueOf(exposition, `${kName}_count`, { op: 'write' }), kObservationsMs.length);
  const sumSeconds = kObservationsMs.reduce((sum, ms) => sum + ms, 0) / 1000;
  assert.ok(Math.abs(valueOf(exposition, `${kName}_sum`, { op: 'write' }) - sumSeconds) < 1e-9, '_sum in seconds');
  // Each bucket counts the observations at or below its bound.
  for (const bucket of buckets) {
    const expected = kObservationsMs.filter((ms) => ms / 1000 <= bucket.le).length;
    assert.equal(bucket.count, expected, `le=${bucket.le}`);
  }
  assert.equal(valueOf(exposition, `${kName}_count`, { op: 'read' }), 1, 'other labels keep their own series');
});

test('the bucket lines match prom-client\'s own Histogram fed the same observations', async () => {
  const observationsMs = kObservationsMs.filter((ms) => !kLatencyBucketsMs.includes(ms)); // float-exact bounds aside
  const ours = parseExposition(await render(histogramsOf(observationsMs)));
  const registry = new Registry();
  const stock = new Histogram({ name: kName, help: 'stock', labelNames: ['op'], buckets: [...kLatencyBucketsSeconds], registers: [registry] });
  for (const ms of observationsMs) stock.observe({ op: 'write' }, ms / 1000);
  const theirs = parseExposition(await registry.metrics());
  const lines = (exposition: ReturnType<typeof parseExposition>): string[] =>
    samplesOf(exposition, `${kName}_bucket`, { op: 'write' }).map((sample) => `${sample.labels['le']} ${sample.value}`);
  assert.deepEqual(lines(ours), lines(theirs));
  assert.equal(valueOf(ours, `${kName}_count`, { op: 'write' }), valueOf(theirs, `${kName}_count`, { op: 'write' }));
});

test('an empty histogram still exposes every bucket, at zero', async () => {
  const exposition = parseExposition(await render(new LatencyHistograms(['read', 'write'])));
  const buckets = checkHistogram(exposition, kName, { op: 'read' });
  assert.ok(buckets.every((bucket) => bucket.count === 0));
  assert.equal(valueOf(exposition, `${kName}_sum`, { op: 'read' }), 0);
});

test('the JSON view (Registry.getMetricsAsJSON) comes from the snapshot too', async () => {
  const registry = new Registry();
  const histograms = histogramsOf(kObservationsMs);
  new SnapshotHistogram({ name: kName, help: 'test', labelNames: ['op'], registry, read: () => [{ labels: { op: 'write' }, snapshot: histograms.snapshot(1) }] });
  const [metric] = await registry.getMetricsAsJSON();
  assert.equal(metric?.name, kName);
  const count = metric?.values.find((value) => (value as { metricName?: string }).metricName === `${kName}_count`);
  assert.equal(count?.value, kObservationsMs.length);
});

test('a snapshot that is not cumulative, or whose +Inf differs from its count, is refused', () => {
  const good = histogramsOf(kObservationsMs).snapshot(1);
  const dipping: LatencySnapshot = { ...good, cumulative: good.cumulative.map((count, index) => (index === 3 ? count + 100 : count)) };
  assert.throws(() => snapshotValues(kName, { op: 'write' }, dipping), /cumulative/);
  const miscounted: LatencySnapshot = { ...good, count: good.count + 1 };
  assert.throws(() => snapshotValues(kName, { op: 'write' }, miscounted), /\+Inf/);
  const short: LatencySnapshot = { ...good, cumulative: good.cumulative.slice(1) };
  assert.throws(() => snapshotValues(kName, { op: 'write' }, short), /one count per bound/);
});

test('a label named le is refused', () => {
  assert.throws(() => new SnapshotHistogram({ name: kName, help: 'test', labelNames: ['le'], registry: new Registry(), read: () => [] }), /le/);
});
