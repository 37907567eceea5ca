/**
 * Text output of the TLS measurements (lib/tls.ts): per pair, both servers' rows (throughput,
 * latency, CPU seconds per GiB of the front server, of its legs, and both together) with the
 * pair's ratio as the last column; then one summary table of every pair's ratios. Pure
 * formatting, no I/O.
 * Threads: harness main thread.
 */
import { formatTable } from './report.js';
import type { RatioResult, RowResult } from './results.js';
import { totalCpuSecPerGiB, type TlsResults } from './tls.js';

const kMiB = 1024 * 1024;
const kErrorChars = 140;

function fixed(value: number | null | undefined, digits: number): string {
  if (value === null || value === undefined || !Number.isFinite(value)) return '-';
  return value.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

function shortError(text: string): string {
  const first = text.split('\n').find((line) => line.trim() !== '') ?? 'no result';
  return first.length > kErrorChars ? `${first.slice(0, kErrorChars - 3)}...` : first;
}

function ratioFor(ratios: readonly RatioResult[], caseName: string, versus: string, workload: string): RatioResult | undefined {
  return ratios.find((ratio) => ratio.caseName === caseName && ratio.versus === versus && ratio.workload === workload);
}

/** The rows of one pair (both servers, every workload), last column: caseName / versus. */
export function tlsPairTable(rows: readonly RowResult[], ratios: readonly RatioResult[], caseName: string, versus: string): string {
  const header = ['workload', 'server', 'IOPS', 'MB/s', 'mean us', 'p99 us', 'srv CPU%', 'srv s/GiB',
    'legs CPU%', 'legs s/GiB', 'total s/GiB', 'spread%', `x ${versus}`];
  const workloads = [...new Set(rows.map((row) => row.workload))];
  const lines: string[][] = [];
  for (const workload of workloads) {
    let first = true;
    for (const name of [caseName, versus]) {
      const row = rows.find((entry) => entry.caseName === name && entry.workload === workload);
      if (row === undefined) continue;
      const workloadCell = first ? workload : '';
      first = false;
      const measurement = row.measurement;
      if (measurement === null) {
        lines.push([workloadCell, name, `-- ${shortError(row.error ?? 'no result')}`]);
        continue;
      }
      const ratio = name === versus ? 1 : ratioFor(ratios, caseName, versus, workload)?.throughputRatio;
      lines.push([
        workloadCell, name,
        fixed(measurement.iops, 0), fixed(measurement.bytesPerSec / 1e6, 0),
        fixed(measurement.clatMeanUs, 0), fixed(measurement.clatP99Us, 0),
        fixed(measurement.serverCpuPercent, 0), fixed(measurement.serverCpuSecPerGiB, 2),
        fixed(measurement.legCpuPercent, 0), fixed(measurement.legCpuSecPerGiB, 2),
        fixed(totalCpuSecPerGiB(measurement), 2),
        fixed(row.spreadPercent, 0), fixed(ratio, 2),
      ]);
    }
  }
  return formatTable(header, lines, 2);
}

function totalCpuRatio(rows: readonly RowResult[], ratio: RatioResult): number | null {
  const mine = rows.find((row) => row.caseName === ratio.caseName && row.workload === ratio.workload)?.measurement;
  const theirs = rows.find((row) => row.caseName === ratio.versus && row.workload === ratio.workload)?.measurement;
  if (mine == null || theirs == null) return null;
  const top = totalCpuSecPerGiB(mine);
  const bottom = totalCpuSecPerGiB(theirs);
  return Number.isFinite(top) && Number.isFinite(bottom) && bottom > 0 ? top / bottom : null;
}

export function tlsBlock(results: TlsResults): string {
  const lines = [
    `TLS (${results.source}), side by side in one run: 4 KiB randwrite QD32 and 1 MiB seq write QD8; ` +
    `nbdkit memory legs of ${fixed(results.sizeBytes / kMiB, 0)} MiB on Unix sockets, TLS = --tls=require with a P-256 certificate`,
    `  client: ${results.client}`,
    '  srv = the server fio talks to (enbd or nbdkit); legs = the nbdkit memory legs behind it; s/GiB = CPU seconds per GiB fio moved',
  ];
  for (const server of results.servers) {
    if (server.status !== 'ok') lines.push(`  ${server.name}: ${shortError(server.status)}`);
  }
  for (const pair of results.pairs) {
    const rows = results.rows.filter((row) => row.caseName === pair.caseName || row.caseName === pair.versus);
    if (rows.length === 0) continue;
    lines.push('', `${pair.title}: ${pair.caseName} / ${pair.versus}`, tlsPairTable(rows, results.ratios, pair.caseName, pair.versus));
  }
  if (results.ratios.length > 0) {
    const header = ['case / versus', 'workload', 'throughput', 'srv CPU/GiB', 'total CPU/GiB'];
    const table = results.ratios.map((ratio) => [
      `${ratio.caseName} / ${ratio.versus}`, ratio.workload,
      ratio.throughputRatio === null ? 'n/a' : `${fixed(ratio.throughputRatio, 2)}x`,
      ratio.cpuPerGiBRatio === null ? '-' : `${fixed(ratio.cpuPerGiBRatio, 2)}x`,
      ((value) => (value === null ? '-' : `${fixed(value, 2)}x`))(totalCpuRatio(results.rows, ratio)),
    ]);
    lines.push('', 'TLS ratios (throughput paired per round; CPU/GiB: lower is better; no targets in the issue)', formatTable(header, table, 2));
  }
  if (results.error !== null) lines.push(`FAILED: ${shortError(results.error)}`);
  return lines.join('\n');
}
