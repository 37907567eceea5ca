/**
 * Text output of the resync measurements (lib/resync.ts) and the write-path summary of the
 * bitmap cases (cases/mirror-cases.ts): pure formatting, no I/O.
 * Threads: harness main thread.
 */
import { formatTable } from './report.js';
import type { RatioResult } from './results.js';
import { kResyncTargets, type LegComparison, type ResyncResults, type ResyncTiming } from './resync.js';

const kMiB = 1024 * 1024;

/** (with, without) case pairs whose randwrite ratio is the bitmap's write-path cost. */
export const kWritePathPairs: ReadonlyArray<readonly [string, string, string]> = [
  ['enbd-mirror2-shared', 'enbd-mirror2-untracked', 'flush tracking on / off'],
  ['enbd-mirror2-degraded', 'enbd-mirror1-shared', 'dirty map marked per write / 1-leg mirror'],
];

function fixed(value: number | null | undefined, digits: number): string {
  if (value === null || value === undefined || !Number.isFinite(value)) return '-';
  return value.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

function verdict(met: boolean | null): string {
  return met === null ? 'NO DATA' : met ? 'MET' : 'MISSED';
}

/**
 * The write-path pairs present in `ratios`, one line per pair: every workload's throughput
 * and CPU/GiB ratio, with the target (random writes) and its verdict. Reads do no bitmap
 * work, so their ratio is the control: what the two setups differ by apart from the bitmap.
 */
export function writePathLine(ratios: readonly RatioResult[]): string | null {
  const lines: string[] = [];
  for (const [mine, versus, label] of kWritePathPairs) {
    const cells = ratios.filter((ratio) => ratio.caseName === mine && ratio.versus === versus).map((ratio) => {
      const target = ratio.minRatio === null ? '' : ` (target >= ${fixed(ratio.minRatio, 2)}x ${verdict(ratio.met)})`;
      return `${ratio.workload} ${fixed(ratio.throughputRatio, 3)}x${target} CPU/GiB ${fixed(ratio.cpuPerGiBRatio, 2)}x`;
    });
    if (cells.length > 0) lines.push(`  ${label} (${mine} / ${versus}): ${cells.join('; ')}`);
  }
  return lines.length === 0
    ? null
    : ['write-path cost of the bitmaps (issue: resync; reads do no bitmap work: their ratio is the control)', ...lines].join('\n');
}

export function comparisonText(comparison: LegComparison): string {
  switch (comparison.status) {
    case 'skipped': return 'not compared';
    case 'equal': return `legs equal (${fixed(comparison.bytesCompared / kMiB, 0)} MiB, ${fixed(comparison.wallMs / 1000, 1)} s)`;
    case 'differ': return `LEGS DIFFER: ${comparison.differingBlocks} blocks of 4 KiB, first at byte ${String(comparison.firstDifferenceBytes)}`;
    case 'timeout': return `not verified: ${comparison.detail ?? 'timeout'}`;
    case 'error': return `compare failed: ${comparison.detail ?? 'error'}`;
  }
}

function timingCells(timing: ResyncTiming): string[] {
  return [
    fixed(timing.dirtyBytes / kMiB, 1),
    fixed(timing.bytesDone === null ? null : timing.bytesDone / timing.dirtyBytes, 3),
    fixed(timing.reconnectMs, 1),
    fixed(timing.copiedMs, 1),
    fixed(timing.inSyncMs, 1),
    fixed(timing.bytesPerSec / 1e6, 0),
    fixed(timing.cpuSeconds / (timing.dirtyBytes / 1024 ** 3), 2),
    comparisonText(timing.comparison),
  ];
}

export function resyncBlock(results: ResyncResults): string {
  const lines: string[] = [];
  const sizeMiB = results.sizeBytes / kMiB;
  lines.push(`resync (issue: resync): ${sizeMiB} MiB device, ${results.legs}, rates unthrottled`);
  if (results.fill !== null) {
    lines.push(`  legs filled in ${fixed(results.fill.wallMs / 1000, 1)} s (${results.fill.method})`);
  }
  if (results.warmup !== null) {
    lines.push(`  warm-up (not in the ratios): ${results.warmup.writes} scattered 4 KiB writes resynced in ` +
      `${fixed(results.warmup.resync.inSyncMs, 1)} ms`);
  }
  if (results.error !== null) lines.push(`  ERROR: ${results.error}`);
  const header = ['round', 'what', 'dirty MiB', 'copied/dirty', 'reconnect ms', 'copied ms', 'in-sync ms', 'MB/s', 'CPU s/GiB', 'check'];
  const rows: string[][] = [];
  for (const round of results.rounds) {
    const name = String(round.round + 1);
    for (const [index, partial] of round.partials.entries()) {
      rows.push([index === 0 ? name : '', `${fixed(results.dirtyFraction * 100, 0)} % in ${partial.writeBlockBytes / 1024} KiB writes`,
        ...timingCells(partial.resync)]);
    }
    if (round.anchor !== null) {
      rows.push(['', 'nbdcopy full copy', fixed(sizeMiB, 1), '', '', '', fixed(round.anchor.wallMs, 1),
        fixed(round.anchor.bytesPerSec / 1e6, 0), '', 'exit 0']);
    }
    if (round.full !== null) rows.push(['', 'full resync', ...timingCells(round.full)]);
    if (round.error !== null) rows.push([name, `-- failed: ${round.error}`]);
  }
  if (rows.length > 0) lines.push(formatTable(header, rows, 2).split('\n').map((line) => `  ${line}`).join('\n'));
  for (const round of results.rounds) {
    for (const partial of round.partials) {
      const copied = partial.resync.copiedMs;
      lines.push(`  round ${round.round + 1}, ${partial.writeBlockBytes / 1024} KiB: ${partial.writes} scattered writes ` +
        `with leg 1 out took ${fixed(partial.writeMs, 0)} ms (${fixed(partial.writeIops, 0)} IOPS); ` +
        `of ${partial.checkedWrites} sampled, leg 0 held ${partial.leg0HoldsWrites} and leg 1 differed on ` +
        `${partial.leg1Differs} before the resync; resync copied ${fixed(partial.writes / (copied / 1000), 0)} ` +
        `writes/s, in sync ${fixed(partial.resync.inSyncMs - copied, 0)} ms after the map emptied`);
    }
  }
  for (const [index, entry] of results.partialSpeedups.entries()) {
    const headline = index === 0;
    lines.push(`  1 % resync (${entry.writeBlockBytes / 1024} KiB writes) speed-up vs nbdcopy full copy: ` +
      `${fixed(entry.speedup, 1)}x` + (headline
        ? ` (target >= ${kResyncTargets.partialSpeedupMin}x ${verdict(results.met.partialSpeedup)})`
        : ` (same bytes in ${entry.writeBlockBytes / (results.partialSpeedups[0]?.writeBlockBytes ?? 1)}x fewer runs; no target)`));
  }
  const directs = results.rounds.map((round) => (round.directIops === null ? `- (${round.directError ?? 'not run'})` : fixed(round.directIops, 0)));
  lines.push(`  4 KiB resync writes/s / the legs' direct 4 KiB randwrite QD32 IOPS (reference leg: ${directs.join(', ')}): ` +
    `${fixed(results.directRatio, 2)}x (target >= ${kResyncTargets.directRatioMin}x ${verdict(results.met.directRatio)})`);
  lines.push(`  full resync throughput / nbdcopy: ${fixed(results.fullThroughputRatio, 2)}x ` +
    `(target >= ${kResyncTargets.fullThroughputRatioMin}x ${verdict(results.met.fullThroughputRatio)})`);
  lines.push(`  legs byte-identical after every resync: ${results.legsEqual === null ? 'not checked' : results.legsEqual ? 'yes' : 'NO'}`);
  if (results.rounds.length > 1) lines.push('  (ratios: median of the per-round ratios)');
  return lines.join('\n');
}

/** The record saved when the resync measurements could not run at all. */
export function unavailableResync(sizeBytes: number, dirtyFraction: number, reason: string): ResyncResults {
  return {
    sizeBytes, dirtyFraction, chunkBytes: 4096, legs: 'not started', fill: null, warmup: null, rounds: [],
    partialSpeedup: null, partialSpeedups: [], fullThroughputRatio: null, directRatio: null, targets: { ...kResyncTargets },
    met: { partialSpeedup: null, fullThroughputRatio: null, directRatio: null }, legsEqual: null, error: reason, logTail: '',
  };
}
