/**
 * Text output: the per-row results table, the ratio block (each case vs the baseline and vs
 * the cases its targets name, per workload, with the target and whether it was met), and
 * the machine-limits line. Pure formatting plus ratio arithmetic; writes to stdout only.
 * Threads: harness main thread.
 */
import { assert } from '../../src/core/assert.js';
import type { BenchCase } from './case.js';
import type { MachineLimits } from './limits.js';
import type { Measurement } from './measure.js';
import type { RatioResult, RowResult } from './results.js';
import type { Workload } from './workloads.js';

const kColumnGap = '  ';

function formatNumber(value: number, digits: number): string {
  if (!Number.isFinite(value)) return '-';
  return value.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

/** Left-aligns the first `textColumns` columns, right-aligns the rest. */
export function formatTable(header: readonly string[], rows: ReadonlyArray<readonly string[]>,
  textColumns: number): string {
  const widths = header.map((title, column) =>
    Math.max(title.length, ...rows.map((row) =>
      (row.length === header.length || column < row.length - 1 ? (row[column] ?? '').length : 0))));
  const line = (row: readonly string[]): string => {
    // A short row (a failure) aligns its leading cells and lets the last one run free.
    const freeTextColumn = row.length === header.length ? -1 : row.length - 1;
    return row.map((cell, column) => {
      if (column === freeTextColumn) return cell;
      const width = widths[column] ?? 0;
      return column < textColumns ? cell.padEnd(width) : cell.padStart(width);
    }).join(kColumnGap).trimEnd();
  };
  const rule = widths.map((width) => '-'.repeat(width)).join(kColumnGap);
  return [line(header), rule, ...rows.map(line)].join('\n');
}

export function resultsTable(rows: readonly RowResult[], ratios: readonly RatioResult[],
  baseline: string): string {
  const header = ['workload', 'case', 'IOPS', 'MB/s', 'mean us', 'p99 us', 'srv CPU%', 'CPU s/GiB',
    'fio CPU%', 'spread%', 'cp/wr', 'B cp/wr', `x ${baseline}`];
  const lines: string[][] = [];
  let previousWorkload = '';
  for (const row of rows) {
    const workloadCell = row.workload === previousWorkload ? '' : row.workload;
    previousWorkload = row.workload;
    const measurement = row.measurement;
    if (measurement === null) {
      lines.push([workloadCell, row.caseName, `-- ${row.error ?? 'no result'}`]);
      continue;
    }
    const ratio = ratios.find((entry) =>
      entry.caseName === row.caseName && entry.workload === row.workload && entry.versus === baseline);
    const ratioCell = row.caseName === baseline
      ? '1.00'
      : formatNumber(ratio?.throughputRatio ?? Number.NaN, 2);
    lines.push([
      workloadCell, row.caseName,
      formatNumber(measurement.iops, 0),
      formatNumber(measurement.bytesPerSec / 1e6, 0),
      formatNumber(measurement.clatMeanUs, 0),
      formatNumber(measurement.clatP99Us, 0),
      formatNumber(measurement.serverCpuPercent, 0),
      formatNumber(measurement.serverCpuSecPerGiB, 2),
      formatNumber(measurement.fioCpuPercent, 0),
      formatNumber(row.spreadPercent, 0),
      formatNumber(measurement.counters?.copiesPerWrite ?? Number.NaN, 2),
      formatNumber(measurement.counters?.bytesCopiedPerWrite ?? Number.NaN, 0),
      ratioCell,
    ]);
  }
  return formatTable(header, lines, 2);
}

function findRow(rows: readonly RowResult[], caseName: string, workload: string): RowResult | undefined {
  return rows.find((row) => row.caseName === caseName && row.workload === workload);
}

function ratioOf(numerator: number | undefined, denominator: number | undefined): number | null {
  if (numerator === undefined || denominator === undefined) return null;
  if (!Number.isFinite(numerator) || !Number.isFinite(denominator) || denominator <= 0) return null;
  return numerator / denominator;
}

function median(values: readonly number[]): number | null {
  if (values.length === 0) return null;
  const sorted = [...values].sort((left, right) => left - right);
  const middle = Math.floor(sorted.length / 2);
  const upper = sorted[middle];
  const lower = sorted[sorted.length % 2 === 1 ? middle : middle - 1];
  assert(upper !== undefined && lower !== undefined);
  return (upper + lower) / 2;
}

/**
 * Ratio of one metric between two rows. With the same number of rounds on both sides the
 * rounds are paired (round r of both cases ran back to back, so slow drift of the machine
 * cancels) and the median of the per-round ratios is returned; otherwise the ratio of the
 * two median rounds.
 */
export function pairedRatio(mine: RowResult | undefined, theirs: RowResult | undefined,
  metric: (measurement: Measurement) => number): number | null {
  if (mine?.measurement == null || theirs?.measurement == null) return null;
  if (mine.rounds.length === theirs.rounds.length && mine.rounds.length > 1) {
    const perRound = mine.rounds.flatMap((round, index) => {
      const other = theirs.rounds[index];
      const ratio = ratioOf(metric(round), other === undefined ? undefined : metric(other));
      return ratio === null ? [] : [ratio];
    });
    return median(perRound);
  }
  return ratioOf(metric(mine.measurement), metric(theirs.measurement));
}

/** Every (case, versus) pair: each non-baseline case vs the baseline, plus each target. */
export function computeRatios(cases: readonly BenchCase[], workloads: readonly Workload[],
  rows: readonly RowResult[], baseline: string): RatioResult[] {
  const ratios: RatioResult[] = [];
  const selected = new Set(cases.map((benchCase) => benchCase.name));
  for (const benchCase of cases) {
    const pairs = new Map<string, RatioResultTarget>();
    if (benchCase.name !== baseline && selected.has(baseline)) {
      pairs.set(baseline, { minRatio: () => undefined });
    }
    for (const target of benchCase.targets ?? []) {
      if (selected.has(target.versus)) pairs.set(target.versus, target);
    }
    for (const [versus, target] of pairs) {
      assert(versus !== benchCase.name, `${benchCase.name} compared with itself`);
      for (const workload of workloads) {
        const mine = findRow(rows, benchCase.name, workload.name);
        const theirs = findRow(rows, versus, workload.name);
        // A pair that was not run (a case that skips the workload) has no ratio at all.
        if (mine === undefined || theirs === undefined) continue;
        const throughputRatio = pairedRatio(mine, theirs, (measurement) => measurement.iops);
        const minRatio = target.minRatio(workload) ?? null;
        ratios.push({
          caseName: benchCase.name, versus, workload: workload.name, throughputRatio,
          cpuPerGiBRatio: pairedRatio(mine, theirs, (measurement) => measurement.serverCpuSecPerGiB),
          minRatio,
          met: minRatio === null || throughputRatio === null ? null : throughputRatio >= minRatio,
        });
      }
    }
  }
  return ratios;
}

interface RatioResultTarget {
  minRatio(workload: Workload): number | undefined;
}

/** The ratios that carry a target (every ratio is in the results JSON and the matrix block). */
export function ratioBlock(ratios: readonly RatioResult[]): string {
  const header = ['case / versus', 'workload', 'throughput', 'target', 'verdict', 'CPU/GiB ratio'];
  const lines = ratios.filter((ratio) => ratio.minRatio !== null).map((ratio) => [
    `${ratio.caseName} / ${ratio.versus}`,
    ratio.workload,
    ratio.throughputRatio === null ? 'n/a' : `${formatNumber(ratio.throughputRatio, 2)}x`,
    ratio.minRatio === null ? '' : `>= ${formatNumber(ratio.minRatio, 2)}x`,
    ratio.met === null ? (ratio.minRatio === null ? '' : 'NO DATA') : (ratio.met ? 'MET' : 'MISSED'),
    ratio.cpuPerGiBRatio === null ? '-' : `${formatNumber(ratio.cpuPerGiBRatio, 2)}x`,
  ]);
  return formatTable(header, lines, 2);
}

export function limitsLine(limits: MachineLimits): string {
  return [
    `memcpy 4 KiB ${formatNumber(limits.memcpy4KiBGBPerSec, 1)} GB/s`,
    `memcpy 1 MiB ${formatNumber(limits.memcpy1MiBGBPerSec, 1)} GB/s`,
    `unix stream (1 MiB writes, 2 procs) ${formatNumber(limits.unixStreamGBPerSec, 2)} GB/s`,
    `unix ping-pong 4 KiB QD1 ${formatNumber(limits.unixPingPong4KiBPerSec, 0)} round trips/s`,
  ].join('; ');
}
