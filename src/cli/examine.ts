/**
 * `enbd examine URI [--json]`: prints one leg's enbd metadata, like `mdadm --examine`, with no
 * daemon running: both superblock copies (valid, blank, or torn/invalid with the reason), which
 * copy is used, the array and leg identity, generation (events), members, owner record, the
 * layout cross-checked against the leg size, the number of dirty bitmap chunks, and the
 * checkpoints (changed-block tracking) the superblock stores: name, state, granularity, the
 * unit they are stored at (coarser than the granularity when the runs did not fit) and the
 * bytes they list as changed.
 * Exit 0 when a valid copy was found; otherwise the report is still printed and the command
 * fails with `enbd: error: ...` (exit 1) saying there is no (valid) metadata.
 * Thread: main thread. Output goes to stdout.
 */
import type { Command } from 'commander';
import { EnbdError } from '../core/errors.js';
import { formatBytes } from '../control/format.js';
import { computeLayout, type LegLayout } from '../meta/layout.js';
import { LegMeta, bitmapCount, type CopyReport, type LegMetaRead } from '../meta/leg-meta.js';
import type { CheckpointRecord, Superblock } from '../meta/superblock.js';
import { decodeRuns } from '../engine/checkpoints.js';
import { openLegDevices } from './create.js';

interface ExamineOptions {
  json: boolean;
}

export interface ExamineReport {
  uri: string;
  legSizeBytes: number;
  usedCopy: number | null;
  copies: Omit<CopyReport, 'superblock'>[];
  superblock: Superblock | null;
  /** Problems of the used superblock against the leg (e.g. the leg changed size). */
  layoutProblems: string[];
  dirtyChunks: number | null;
  chunkCount: number | null;
  /** The checkpoints in the used superblock (empty: none, or older metadata). */
  checkpoints: ExamineCheckpoint[];
}

export interface ExamineCheckpoint {
  name: string;
  createdMs: number;
  state: 'active' | 'frozen';
  granularityBytes: number;
  /** The unit the map is stored at (> granularityBytes: coarsened to fit the superblock). */
  unitBytes: number;
  /** Bytes the stored map lists as changed (within the data size); null: the runs are unreadable. */
  changedBytes: number | null;
}

function describeCheckpoint(record: CheckpointRecord, dataSizeBytes: number): ExamineCheckpoint {
  let changedBytes = 0;
  const whole = decodeRuns(record.runs, record.unitBytes, (offsetBytes, lengthBytes) => {
    changedBytes += Math.max(0, Math.min(dataSizeBytes, offsetBytes + lengthBytes) - offsetBytes);
  });
  return {
    name: record.name, createdMs: record.createdMs, state: record.frozen ? 'frozen' : 'active',
    granularityBytes: record.granularityBytes, unitBytes: record.unitBytes, changedBytes: whole ? changedBytes : null,
  };
}

function layoutProblems(superblock: Superblock, legSizeBytes: number): { layout: LegLayout | null; problems: string[] } {
  const problems: string[] = [];
  if (superblock.legSizeBytes !== legSizeBytes) problems.push(`created on a ${superblock.legSizeBytes}-byte leg, the leg is now ${legSizeBytes} bytes`);
  let layout: LegLayout | null = null;
  try {
    layout = computeLayout(legSizeBytes, superblock.bitmapChunkBytes);
  } catch (error) {
    problems.push(error instanceof Error ? error.message : String(error));
    return { layout: null, problems };
  }
  if (layout.dataSizeBytes !== superblock.dataSizeBytes) problems.push(`data size ${superblock.dataSizeBytes} differs from the layout's ${layout.dataSizeBytes}`);
  if (layout.bitmapOffsetBytes !== superblock.bitmapOffsetBytes || layout.bitmapAreaBytes !== superblock.bitmapAreaBytes) {
    problems.push(`bitmap at ${superblock.bitmapOffsetBytes} (+${superblock.bitmapAreaBytes}) differs from the layout's ${layout.bitmapOffsetBytes} (+${layout.bitmapAreaBytes})`);
  }
  return { layout: problems.length === 0 ? layout : null, problems };
}

export async function examineLeg(uri: string, meta: LegMeta): Promise<ExamineReport> {
  const found: LegMetaRead = await meta.read();
  const report: ExamineReport = {
    uri,
    legSizeBytes: found.legSizeBytes,
    usedCopy: found.usedCopy,
    copies: found.copies.map(({ superblock: _unused, ...copy }) => copy),
    superblock: found.superblock,
    layoutProblems: [],
    dirtyChunks: null,
    chunkCount: null,
    checkpoints: (found.superblock?.checkpoints ?? []).map((record) => describeCheckpoint(record, found.superblock?.dataSizeBytes ?? 0)),
  };
  if (found.superblock !== null) {
    const { layout, problems } = layoutProblems(found.superblock, found.legSizeBytes);
    report.layoutProblems = problems;
    if (layout !== null) {
      report.chunkCount = layout.chunkCount;
      report.dirtyChunks = bitmapCount(await meta.readBitmap(layout), layout.chunkCount);
    }
  }
  return report;
}

function copyLine(copy: Omit<CopyReport, 'superblock'>, usedCopy: number | null): string {
  const used = copy.copyIndex === usedCopy ? ' (used)' : '';
  if (copy.status === 'valid') return `copy ${copy.copyIndex} at ${copy.offsetBytes}: valid, sequence ${copy.sequence}, events ${copy.events}${used}`;
  if (copy.status === 'blank') return `copy ${copy.copyIndex} at ${copy.offsetBytes}: blank (never written)`;
  return `copy ${copy.copyIndex} at ${copy.offsetBytes}: INVALID: ${copy.reason ?? ''}`;
}

function time(ms: number): string {
  return new Date(ms).toISOString();
}

export function formatExamine(report: ExamineReport, nowMs = Date.now()): string[] {
  const lines = [`${report.uri}:`, `        Leg size : ${report.legSizeBytes} bytes (${formatBytes(report.legSizeBytes)})`];
  for (const copy of report.copies) lines.push(`    Superblock ${copy.copyIndex} : ${copyLine(copy, report.usedCopy).replace(/^copy \d /, '')}`);
  const torn = report.copies.filter((copy) => copy.status === 'invalid');
  if (report.usedCopy !== null && torn.length > 0) lines.push(`            Used : copy ${report.usedCopy} (copy ${torn.map((copy) => copy.copyIndex).join(', ')} is torn or invalid)`);
  else if (report.usedCopy !== null) lines.push(`            Used : copy ${report.usedCopy} (newest sequence)`);
  const sb = report.superblock;
  if (sb === null) return lines;
  const owner = sb.owner === null ? 'none' : `${sb.owner.host} pid ${sb.owner.pid}, heartbeat ${time(sb.owner.heartbeatMs)} (${Math.round((nowMs - sb.owner.heartbeatMs) / 1000)} s ago)`;
  lines.push(
    `      Array UUID : ${sb.arrayUuid}`,
    `      Array name : ${sb.arrayName}`,
    `        Leg UUID : ${sb.legUuid}`,
    `        Leg slot : ${sb.slotIndex} of ${sb.members.length}`,
    `       Data size : ${sb.dataSizeBytes} bytes (${formatBytes(sb.dataSizeBytes)}) from offset 0`,
    `    Bitmap chunk : ${sb.bitmapChunkBytes} bytes (${formatBytes(sb.bitmapChunkBytes)})`,
    `   Bitmap offset : ${sb.bitmapOffsetBytes} (${formatBytes(sb.bitmapAreaBytes)} on the leg)`,
    `    Dirty chunks : ${report.dirtyChunks === null ? 'unknown (layout mismatch)' : `${report.dirtyChunks} of ${report.chunkCount ?? 0}`}`,
    `          Events : ${sb.events}`,
    `      Generation : ${sb.generations === undefined ? 'none recorded (metadata from before generation history)' : `${sb.generations[0] ?? ''}${sb.generations.length > 1 ? ` (after ${sb.generations.length - 1}: ${sb.generations.slice(1, 4).join(', ')}${sb.generations.length > 4 ? ', ...' : ''})` : ''}`}`,
    `           State : ${sb.state}`,
    `           Owner : ${owner}`,
    `         Created : ${time(sb.createdMs)}`,
    `         Updated : ${time(sb.updatedMs)}`,
    '         Members : slot leg-uuid                             state           events',
  );
  for (const [slot, member] of sb.members.entries()) {
    const self = slot === sb.slotIndex ? '  (this leg)' : '';
    lines.push(`                   ${String(slot).padEnd(4)} ${member.legUuid.padEnd(36)} ${member.state.padEnd(15)} ${member.events}${self}`);
  }
  if (report.checkpoints.length > 0) lines.push('     Checkpoints : name             state   granularity  stored at    changed (as stored)   created');
  for (const view of report.checkpoints) {
    const changed = view.changedBytes === null ? 'unreadable runs' : formatBytes(view.changedBytes);
    const coarse = view.unitBytes > view.granularityBytes ? '  (stored coarser: lists more than changed)' : '';
    lines.push(`                   ${view.name.padEnd(16)} ${view.state.padEnd(7)} ${formatBytes(view.granularityBytes).padEnd(12)} ${formatBytes(view.unitBytes).padEnd(12)} ${changed.padEnd(21)} ${time(view.createdMs)}${coarse}`);
  }
  for (const problem of report.layoutProblems) lines.push(`         WARNING : ${problem}`);
  return lines;
}

function noMetadataError(report: ExamineReport): EnbdError {
  if (report.copies.every((copy) => copy.status === 'blank')) {
    return new EnbdError('ENBD_ERR_META', `${report.uri} carries no enbd metadata (both superblock copies are blank); write it with enbd create`);
  }
  const reasons = report.copies.map((copy) => `copy ${copy.copyIndex}: ${copy.reason ?? copy.status}`).join('; ');
  return new EnbdError('ENBD_ERR_META', `${report.uri} has no valid enbd superblock (${reasons})`);
}

export async function runExamine(uri: string, options: ExamineOptions): Promise<void> {
  const [device] = await openLegDevices([uri]);
  if (device === undefined) throw new EnbdError('ENBD_ERR_LEG', `cannot open leg ${uri}`);
  const meta = new LegMeta(device);
  let report: ExamineReport;
  try {
    report = await examineLeg(uri, meta);
  } finally {
    await meta.close();
  }
  if (options.json) process.stdout.write(JSON.stringify(report, null, 2) + '\n');
  else process.stdout.write(formatExamine(report).join('\n') + '\n');
  if (report.superblock === null) throw noMetadataError(report);
}

export function registerExamineCommand(program: Command): void {
  program
    .command('examine')
    .description('print a leg\'s enbd metadata (superblock copies, identity, events, bitmap), like mdadm --examine')
    .argument('<uri>', 'the leg: nbd://..., nbd+unix:///...?socket=PATH, file:///path or a path')
    .option('--json', 'print the report as JSON', false)
    .action(async (uri: string, options: ExamineOptions) => {
      await runExamine(uri, options);
    });
}
