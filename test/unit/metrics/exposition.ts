/**
 * A small parser of the Prometheus text exposition format (0.0.4) for the metrics tests:
 * samples with their labels and values, and the TYPE of each family. Written for what
 * prom-client emits (no timestamps, no exemplars); it throws on any line it cannot read, so a
 * malformed exposition fails the test instead of being skipped.
 * Threads: test process main thread.
 */
import assert from 'node:assert/strict';

export interface ExpositionSample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

export interface Exposition {
  samples: ExpositionSample[];
  /** Family name -> counter | gauge | histogram | summary | untyped. */
  types: Map<string, string>;
}

const kSampleLine = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$/;
const kLabelPair = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)/y;

function parseValue(text: string): number {
  if (text === '+Inf') return Number.POSITIVE_INFINITY;
  if (text === '-Inf') return Number.NEGATIVE_INFINITY;
  if (text === 'NaN' || text === 'Nan') return Number.NaN;
  const value = Number(text);
  assert.ok(!Number.isNaN(value), `sample value "${text}" is a number`);
  return value;
}

function parseLabels(text: string, line: string): Record<string, string> {
  const labels: Record<string, string> = {};
  kLabelPair.lastIndex = 0;
  while (kLabelPair.lastIndex < text.length) {
    const match = kLabelPair.exec(text);
    assert.ok(match !== null, `labels of "${line}" parse`);
    const name = match[1] as string;
    const raw = match[2] as string;
    labels[name] = raw.replace(/\\(.)/g, (_all, escaped: string) => (escaped === 'n' ? '\n' : escaped));
  }
  return labels;
}

export function parseExposition(text: string): Exposition {
  const samples: ExpositionSample[] = [];
  const types = new Map<string, string>();
  for (const line of text.split('\n')) {
    if (line === '') continue;
    if (line.startsWith('# TYPE ')) {
      const [name, type] = line.slice('# TYPE '.length).split(' ');
      assert.ok(name !== undefined && type !== undefined, `TYPE line "${line}"`);
      types.set(name, type);
      continue;
    }
    if (line.startsWith('#')) continue;
    const match = kSampleLine.exec(line);
    assert.ok(match !== null, `sample line "${line}" parses`);
    const labels = match[3] === undefined ? {} : parseLabels(match[3], line);
    samples.push({ name: match[1] as string, labels, value: parseValue(match[4] as string) });
  }
  return { samples, types };
}

function matches(sample: ExpositionSample, name: string, labels: Record<string, string>): boolean {
  if (sample.name !== name) return false;
  return Object.entries(labels).every(([key, value]) => sample.labels[key] === value);
}

/** Every sample of `name` whose labels include `labels`. */
export function samplesOf(exposition: Exposition, name: string, labels: Record<string, string> = {}): ExpositionSample[] {
  return exposition.samples.filter((sample) => matches(sample, name, labels));
}

/** The value of the one sample of `name` with (at least) `labels`; fails if not exactly one. */
export function valueOf(exposition: Exposition, name: string, labels: Record<string, string> = {}): number {
  const found = samplesOf(exposition, name, labels);
  assert.equal(found.length, 1, `exactly one ${name}${JSON.stringify(labels)} (found ${found.length})`);
  return (found[0] as ExpositionSample).value;
}

/**
 * The `_bucket` samples of histogram `name` for `labels`, in exposition order, with their
 * bounds; asserts bounds ascend, counts are cumulative (non-decreasing), the last is +Inf and
 * equals `_count`. Returns the buckets.
 */
export function checkHistogram(exposition: Exposition, name: string, labels: Record<string, string>): { le: number; count: number }[] {
  assert.equal(exposition.types.get(name), 'histogram', `${name} is typed histogram`);
  const buckets = samplesOf(exposition, `${name}_bucket`, labels).map((sample) => {
    assert.ok(sample.labels['le'] !== undefined, `${name}_bucket has le`);
    return { le: parseValue(sample.labels['le']), count: sample.value };
  });
  assert.ok(buckets.length >= 2, `${name}${JSON.stringify(labels)} has buckets`);
  for (let index = 1; index < buckets.length; index += 1) {
    const previous = buckets[index - 1] as { le: number; count: number };
    const current = buckets[index] as { le: number; count: number };
    assert.ok(current.le > previous.le, `${name} bounds ascend (${previous.le} then ${current.le})`);
    assert.ok(current.count >= previous.count, `${name} counts are cumulative at le=${current.le}`);
  }
  const last = buckets[buckets.length - 1] as { le: number; count: number };
  assert.equal(last.le, Number.POSITIVE_INFINITY, `${name} ends with le="+Inf"`);
  assert.equal(last.count, valueOf(exposition, `${name}_count`, labels), `${name} +Inf bucket equals _count`);
  return buckets;
}
