/**
 * The copy-avoidance matrix (issue: bench harness for copy-avoidance experiments): enbd mirror
 * with 1, 2, 3 legs in each mode, against the direct leg, the C pass-through and qemu's quorum
 * of the same leg count. Names of the matrix cases and references live here (the case files
 * import them), so the report, the chart and the cases cannot disagree.
 * Pure data shaping and formatting; no I/O. Threads: harness main thread.
 *
 * Copies per WRITE target: in shared mode one userspace copy per WRITE whatever N (socket chunk
 * to ring slot; the legs send from the slot), 0 for the bulk of a large payload with
 * `--receive direct`; per-leg mode N + 1 (the receive copy plus one per leg).
 */
import { formatTable } from './report.js';
import type { RatioResult, RowResult } from './results.js';

export const kMirrorModes = ['per-leg', 'shared', 'direct', 'inline'] as const;
export type MirrorMode = (typeof kMirrorModes)[number];
export const kMirrorLegCounts: readonly number[] = [1, 2, 3];
export const kProxyCase = 'nbdkit-nbd-proxy';
export const kDirectCase = 'nbdkit-memory';
/** The chart's two panels. */
export const kChartWorkloads: readonly string[] = ['randwrite-4k-qd32', 'seqwrite-1m-qd8'];

export function matrixCaseName(legs: number, mode: MirrorMode): string {
  return `enbd-mirror${legs}-${mode}`;
}

export function quorumCaseName(legs: number): string {
  return `qemu-quorum${legs}`;
}

/** Copies per WRITE within this of the expected whole number count as equal. */
const kCopiesTolerance = 0.01;
/** --receive direct at 1 MiB: at most this share of the payload may still be copied. */
export const kDirectCopiesMax = 0.1;

export interface MatrixCell {
  caseName: string;
  legs: number;
  mode: MirrorMode;
  workload: string;
  error: string | null;
  iops: number | null;
  bytesPerSec: number | null;
  clatMeanUs: number | null;
  clatP99Us: number | null;
  cpuSecPerGiB: number | null;
  /** Userspace copies per WRITE, byte-weighted (lib/counters.ts); null: no counters or no writes. */
  copiesPerWrite: number | null;
  bytesCopiedPerWrite: number | null;
  /** Throughput ratios (paired per round when possible, lib/report.ts). */
  versusDirect: number | null;
  versusProxy: number | null;
  /** Against qemu-quorum<legs> (null when that case did not run). */
  versusQuorum: number | null;
}

export interface ReferencePoint {
  caseName: string;
  /** Leg count for qemu quorum; null for the direct leg and the pass-through. */
  legs: number | null;
  workload: string;
  iops: number;
  bytesPerSec: number;
  clatMeanUs: number;
  clatP99Us: number;
}

export interface CopiesVerdict {
  workload: string;
  /** Copies per WRITE by mode and leg count (null where not measured). */
  byMode: Record<MirrorMode, Array<number | null>>;
  met: boolean | null;
  text: string;
}

export interface MatrixSummary {
  cells: MatrixCell[];
  references: ReferencePoint[];
  copies: CopiesVerdict[];
}

function ratio(ratios: readonly RatioResult[], caseName: string, versus: string, workload: string): number | null {
  return ratios.find((entry) => entry.caseName === caseName && entry.versus === versus &&
    entry.workload === workload)?.throughputRatio ?? null;
}

function finiteOrNull(value: number | undefined): number | null {
  return value !== undefined && Number.isFinite(value) ? value : null;
}

function copiesVerdict(workload: string, cells: readonly MatrixCell[]): CopiesVerdict | null {
  const byMode = {} as Record<MirrorMode, Array<number | null>>;
  for (const mode of kMirrorModes) {
    byMode[mode] = kMirrorLegCounts.map((legs) =>
      cells.find((cell) => cell.mode === mode && cell.legs === legs && cell.workload === workload)?.copiesPerWrite ?? null);
  }
  const shared = byMode.shared.filter((value): value is number => value !== null);
  if (shared.length === 0) return null;
  const checks: boolean[] = shared.map((value) => Math.abs(value - 1) <= kCopiesTolerance);
  byMode['per-leg'].forEach((value, index) => {
    if (value !== null) checks.push(Math.abs(value - ((kMirrorLegCounts[index] ?? 0) + 1)) <= kCopiesTolerance);
  });
  const large = workload.startsWith('seq');
  for (const value of byMode.direct) {
    if (value !== null) checks.push(large ? value <= kDirectCopiesMax : value <= 1 + kCopiesTolerance);
  }
  const cell = (value: number | null): string => (value === null ? '-' : value.toFixed(2));
  const row = (mode: MirrorMode): string => `${mode} ${byMode[mode].map(cell).join('/')}`;
  const expectation = large
    ? `shared 1 for every N, direct <= ${kDirectCopiesMax}, per-leg N+1`
    : 'shared 1 for every N, direct 1 (< 64 KiB is copied), per-leg N+1';
  return {
    workload, byMode, met: checks.every(Boolean),
    text: `${kMirrorModes.map(row).join('; ')} (N = ${kMirrorLegCounts.join('/')}; expected: ${expectation})`,
  };
}

/** Collects the matrix cells and reference points from the run's rows and ratios. */
export function buildMatrix(rows: readonly RowResult[], ratios: readonly RatioResult[]): MatrixSummary {
  const cells: MatrixCell[] = [];
  const references: ReferencePoint[] = [];
  const workloads = [...new Set(rows.map((row) => row.workload))];
  for (const workload of workloads) {
    for (const legs of kMirrorLegCounts) {
      for (const mode of kMirrorModes) {
        const caseName = matrixCaseName(legs, mode);
        const row = rows.find((entry) => entry.caseName === caseName && entry.workload === workload);
        if (row === undefined) continue;
        const measurement = row.measurement;
        cells.push({
          caseName, legs, mode, workload, error: row.error,
          iops: finiteOrNull(measurement?.iops), bytesPerSec: finiteOrNull(measurement?.bytesPerSec),
          clatMeanUs: finiteOrNull(measurement?.clatMeanUs), clatP99Us: finiteOrNull(measurement?.clatP99Us),
          cpuSecPerGiB: finiteOrNull(measurement?.serverCpuSecPerGiB),
          copiesPerWrite: measurement?.counters?.copiesPerWrite ?? null,
          bytesCopiedPerWrite: measurement?.counters?.bytesCopiedPerWrite ?? null,
          versusDirect: ratio(ratios, caseName, kDirectCase, workload),
          versusProxy: ratio(ratios, caseName, kProxyCase, workload),
          versusQuorum: ratio(ratios, caseName, quorumCaseName(legs), workload),
        });
      }
    }
    const referenceNames: Array<[string, number | null]> = [[kDirectCase, null], [kProxyCase, null],
      ...kMirrorLegCounts.map((legs): [string, number] => [quorumCaseName(legs), legs])];
    for (const [caseName, legs] of referenceNames) {
      const measurement = rows.find((entry) => entry.caseName === caseName && entry.workload === workload)?.measurement;
      if (measurement === undefined || measurement === null) continue;
      references.push({
        caseName, legs, workload, iops: measurement.iops, bytesPerSec: measurement.bytesPerSec,
        clatMeanUs: measurement.clatMeanUs, clatP99Us: measurement.clatP99Us,
      });
    }
  }
  // The verdict compares modes: only write workloads that ran in more than one mode.
  const copies = workloads.filter((workload) => workload.includes('write') &&
    new Set(cells.filter((cell) => cell.workload === workload).map((cell) => cell.mode)).size > 1)
    .flatMap((workload) => copiesVerdict(workload, cells) ?? []);
  return { cells, references, copies };
}

function fixed(value: number | null, digits: number): string {
  return value === null ? '-' : value.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

function throughputText(workload: string, iops: number | null, bytesPerSec: number | null): string {
  if (workload.includes('-1m-')) return bytesPerSec === null ? '-' : `${fixed(bytesPerSec / 1e6, 0)} MB/s`;
  return iops === null ? '-' : `${fixed(iops / 1000, 1)}k`;
}

/**
 * Per workload: a mode x legs table of throughput, x direct, x qemu quorum of the same N,
 * mean latency and copies per WRITE; then the reference points.
 */
export function matrixBlock(summary: MatrixSummary): string {
  const blocks: string[] = [];
  const workloads = [...new Set(summary.cells.map((cell) => cell.workload))];
  for (const workload of workloads) {
    const header = ['mode'];
    for (const legs of kMirrorLegCounts) header.push(`N=${legs}`, 'x dir', 'x qrm', 'mean us', 'cp/wr');
    const modes = kMirrorModes.filter((mode) =>
      summary.cells.some((entry) => entry.workload === workload && entry.mode === mode));
    const lines = modes.map((mode) => {
      const line: string[] = [mode];
      for (const legs of kMirrorLegCounts) {
        const cell = summary.cells.find((entry) => entry.workload === workload && entry.mode === mode && entry.legs === legs);
        if (cell === undefined) {
          line.push('', '', '', '', '');
          continue;
        }
        line.push(cell.error !== null ? 'FAILED' : throughputText(workload, cell.iops, cell.bytesPerSec),
          fixed(cell.versusDirect, 2), fixed(cell.versusQuorum, 2), fixed(cell.clatMeanUs, 0), fixed(cell.copiesPerWrite, 2));
      }
      return line;
    });
    const references = summary.references.filter((point) => point.workload === workload).map((point) =>
      `${point.caseName} ${throughputText(workload, point.iops, point.bytesPerSec)} (mean ${fixed(point.clatMeanUs, 0)} us)`);
    blocks.push([`${workload}: throughput; x direct (${kDirectCase}); x qemu-quorum<N>; mean clat; userspace copies per WRITE`,
      formatTable(header, lines, 1), `  references: ${references.join('; ') || 'none ran'}`].join('\n'));
  }
  return blocks.join('\n\n');
}

export function copiesBlock(summary: MatrixSummary): string | null {
  if (summary.copies.length === 0) return null;
  return ['copies per WRITE (issue: 1 in shared mode for any N, 0 with direct receive, vs N in per-leg mode)',
    ...summary.copies.map((verdict) =>
      `  ${verdict.workload}: ${verdict.text}: ${verdict.met === null ? 'NO DATA' : verdict.met ? 'MET' : 'MISSED'}`)].join('\n');
}
