/**
 * The matrix chart: hand-written SVG text (no dependency), one panel per workload of
 * kChartWorkloads (4K randwrite QD32 in kIOPS, 1M seq write in MB/s), throughput against the
 * leg count (1, 2, 3), one line per enbd mode, with qemu's quorum of the same leg counts and
 * the direct leg and the C pass-through as reference lines.
 * Pure function of the summary; run.ts writes it to bench/results/<date>.svg and, when the
 * run covered every leg count, copies it to bench/chart-latest.svg.
 * Threads: harness main thread.
 */
import { assert } from '../../src/core/assert.js';
import {
  kChartWorkloads, kDirectCase, kMirrorLegCounts, kMirrorModes, kProxyCase, type MatrixSummary, type MirrorMode,
} from './matrix.js';

const kPanelWidth = 470;
const kPanelHeight = 380;
const kMarginLeft = 64;
const kMarginRight = 16;
const kMarginTop = 84;
const kMarginBottom = 44;
const kLegendHeight = 70;
const kGridLines = 5;
const kFont = 'font-family="sans-serif"';

const kModeColors: Readonly<Record<MirrorMode, string>> = {
  'per-leg': '#d62728',
  shared: '#1f77b4',
  direct: '#2ca02c',
  inline: '#ff7f0e',
};
const kQuorumColor = '#7f7f7f';
const kDirectColor = '#000000';
const kProxyColor = '#9467bd';

export interface ChartMeta {
  title: string;
  subtitle: string;
}

function escapeXml(text: string): string {
  return text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

/** The smallest 1, 2, 2.5 or 5 x 10^k at or above value (value > 0). */
export function niceCeiling(value: number): number {
  assert(value > 0 && Number.isFinite(value), 'niceCeiling of a positive number');
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

interface Panel {
  workload: string;
  unit: string;
  /** Value plotted for a (case's) measurement. */
  scale(iops: number, bytesPerSec: number): number;
}

function panelOf(workload: string): Panel {
  if (workload.includes('-1m-')) return { workload, unit: 'MB/s', scale: (_iops, bytesPerSec) => bytesPerSec / 1e6 };
  return { workload, unit: 'kIOPS', scale: (iops) => iops / 1000 };
}

function fmt(value: number): string {
  return Number.isInteger(value) ? String(value) : value.toFixed(1);
}

function renderPanel(summary: MatrixSummary, panel: Panel, originX: number): string[] {
  const parts: string[] = [];
  const plotWidth = kPanelWidth - kMarginLeft - kMarginRight;
  const plotHeight = kPanelHeight - kMarginTop - kMarginBottom;
  const left = originX + kMarginLeft;
  const top = kMarginTop;
  const bottom = top + plotHeight;
  const cells = summary.cells.filter((cell) => cell.workload === panel.workload && cell.iops !== null);
  const references = summary.references.filter((point) => point.workload === panel.workload);
  const values = [
    ...cells.map((cell) => panel.scale(cell.iops ?? 0, cell.bytesPerSec ?? 0)),
    ...references.map((point) => panel.scale(point.iops, point.bytesPerSec)),
  ];
  const maximum = niceCeiling(Math.max(1, ...values) * 1.05);
  const xOf = (legs: number): number => left + ((legs - 0.5) / kMirrorLegCounts.length) * plotWidth;
  const yOf = (value: number): number => bottom - (value / maximum) * plotHeight;
  parts.push(`<text x="${originX + kPanelWidth / 2}" y="${top - 18}" text-anchor="middle" font-size="14" ${kFont} font-weight="bold">${escapeXml(panel.workload)} (${panel.unit})</text>`);
  for (let line = 0; line <= kGridLines; line += 1) {
    const value = (maximum / kGridLines) * line;
    const y = yOf(value);
    parts.push(`<line x1="${left}" y1="${y.toFixed(1)}" x2="${left + plotWidth}" y2="${y.toFixed(1)}" stroke="#e0e0e0"/>`);
    parts.push(`<text x="${left - 6}" y="${(y + 4).toFixed(1)}" text-anchor="end" font-size="11" ${kFont}>${fmt(value)}</text>`);
  }
  parts.push(`<line x1="${left}" y1="${bottom}" x2="${left + plotWidth}" y2="${bottom}" stroke="#000"/>`);
  parts.push(`<line x1="${left}" y1="${top}" x2="${left}" y2="${bottom}" stroke="#000"/>`);
  for (const legs of kMirrorLegCounts) {
    parts.push(`<text x="${xOf(legs)}" y="${bottom + 18}" text-anchor="middle" font-size="12" ${kFont}>${legs} leg${legs === 1 ? '' : 's'}</text>`);
  }
  const horizontal = (caseName: string, color: string, dash: string, label: string, atLeft: boolean): void => {
    const point = references.find((entry) => entry.caseName === caseName);
    if (point === undefined) return;
    const y = yOf(panel.scale(point.iops, point.bytesPerSec)).toFixed(1);
    parts.push(`<line x1="${left}" y1="${y}" x2="${left + plotWidth}" y2="${y}" stroke="${color}" stroke-width="1.5" stroke-dasharray="${dash}"/>`);
    const labelX = atLeft ? `${left + 4}" text-anchor="start` : `${left + plotWidth - 4}" text-anchor="end`;
    parts.push(`<text x="${labelX}" y="${Number(y) - 4}" font-size="10" fill="${color}" ${kFont}>${escapeXml(label)}</text>`);
  };
  horizontal(kDirectCase, kDirectColor, '6 4', 'direct leg', false);
  horizontal(kProxyCase, kProxyColor, '2 3', 'nbdkit nbd pass-through', true);
  const quorum = references.filter((point) => point.legs !== null)
    .sort((first, second) => (first.legs ?? 0) - (second.legs ?? 0));
  if (quorum.length > 0) {
    const points = quorum.map((point) => `${xOf(point.legs ?? 0).toFixed(1)},${yOf(panel.scale(point.iops, point.bytesPerSec)).toFixed(1)}`);
    parts.push(`<polyline points="${points.join(' ')}" fill="none" stroke="${kQuorumColor}" stroke-width="2" stroke-dasharray="5 3"/>`);
    for (const point of points) {
      const [x, y] = point.split(',').map(Number) as [number, number];
      parts.push(`<rect x="${(x - 4).toFixed(1)}" y="${(y - 4).toFixed(1)}" width="8" height="8" fill="${kQuorumColor}"/>`);
    }
  }
  for (const mode of kMirrorModes) {
    const modeCells = cells.filter((cell) => cell.mode === mode).sort((first, second) => first.legs - second.legs);
    if (modeCells.length === 0) continue;
    const points = modeCells.map((cell) =>
      [xOf(cell.legs), yOf(panel.scale(cell.iops ?? 0, cell.bytesPerSec ?? 0))] as const);
    const color = kModeColors[mode];
    if (points.length > 1) {
      parts.push(`<polyline points="${points.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(' ')}" fill="none" stroke="${color}" stroke-width="2"/>`);
    }
    for (const [x, y] of points) parts.push(`<circle cx="${x.toFixed(1)}" cy="${y.toFixed(1)}" r="4" fill="${color}"/>`);
  }
  if (cells.length === 0 && references.length === 0) {
    parts.push(`<text x="${left + plotWidth / 2}" y="${top + plotHeight / 2}" text-anchor="middle" font-size="12" ${kFont}>not measured in this run</text>`);
  }
  return parts;
}

function legend(y: number, width: number): string[] {
  const entries: Array<[string, string, string]> = [
    ...kMirrorModes.map((mode): [string, string, string] => [`enbd ${mode}`, kModeColors[mode], '']),
    ['qemu quorum (read-pattern=fifo)', kQuorumColor, '5 3'],
    ['direct leg (nbdkit memory)', kDirectColor, '6 4'],
    ['nbdkit nbd pass-through', kProxyColor, '2 3'],
  ];
  const parts: string[] = [];
  const columns = 4;
  const columnWidth = (width - 40) / columns;
  entries.forEach(([label, color, dash], index) => {
    const x = 20 + (index % columns) * columnWidth;
    const rowY = y + Math.floor(index / columns) * 22;
    parts.push(`<line x1="${x}" y1="${rowY}" x2="${x + 26}" y2="${rowY}" stroke="${color}" stroke-width="2"${dash === '' ? '' : ` stroke-dasharray="${dash}"`}/>`);
    parts.push(`<text x="${x + 32}" y="${rowY + 4}" font-size="11" ${kFont}>${escapeXml(label)}</text>`);
  });
  return parts;
}

/** The whole SVG document. */
export function renderChart(summary: MatrixSummary, meta: ChartMeta): string {
  const width = kPanelWidth * kChartWorkloads.length;
  const height = kPanelHeight + kLegendHeight;
  const parts = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}">`,
    `<rect width="${width}" height="${height}" fill="#ffffff"/>`,
    `<text x="${width / 2}" y="18" text-anchor="middle" font-size="14" ${kFont}>${escapeXml(meta.title)}</text>`,
    `<text x="${width / 2}" y="34" text-anchor="middle" font-size="11" fill="#555" ${kFont}>${escapeXml(meta.subtitle)}</text>`,
  ];
  kChartWorkloads.forEach((workload, index) => parts.push(...renderPanel(summary, panelOf(workload), index * kPanelWidth)));
  parts.push(...legend(kPanelHeight + 20, width));
  parts.push('</svg>');
  return `${parts.join('\n')}\n`;
}

/** True when some mode was measured at every leg count on a chart workload (a full matrix). */
export function chartIsComplete(summary: MatrixSummary): boolean {
  return kChartWorkloads.some((workload) => kMirrorModes.some((mode) => kMirrorLegCounts.every((legs) =>
    summary.cells.some((cell) => cell.workload === workload && cell.mode === mode && cell.legs === legs && cell.iops !== null))));
}
