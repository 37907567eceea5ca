/**
 * Text for people: the status table of `enbd status`, the REPL's `.legs`, `.bitmap` and
 * `.slots`, and byte/rate/duration formatting. Pure functions of the protocol's result types.
 *
 * Thread: the CLI's main thread.
 */
import type { BitmapResult, LegView, ResyncProgressView, SlotsResult, StatusResult, VerifyProgressView, VerifyView } from './protocol.js';

const kUnits = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'] as const;

/** 0 B, 512 B, 4.0 KiB, 64.0 MiB, 1.5 GiB. */
export function formatBytes(bytes: number): string {
  if (!Number.isFinite(bytes) || bytes < 1024) return `${Math.max(0, Math.round(bytes))} B`;
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < kUnits.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(1)} ${kUnits[unit] ?? 'B'}`;
}

export function formatRate(bytesPerSecond: number): string {
  return `${formatBytes(bytesPerSecond)}/s`;
}

/** A ceiling of 0 means unlimited. */
export function formatCeiling(bytesPerSecond: number): string {
  return bytesPerSecond === 0 ? 'unlimited' : formatRate(bytesPerSecond);
}

/** 7 s, 2 min 05 s, 1 h 02 min; '?' when unknown. */
export function formatDuration(seconds: number | null): string {
  if (seconds === null || !Number.isFinite(seconds) || seconds < 0) return '?';
  const whole = Math.round(seconds);
  if (whole < 60) return `${whole} s`;
  if (whole < 3600) return `${Math.floor(whole / 60)} min ${String(whole % 60).padStart(2, '0')} s`;
  return `${Math.floor(whole / 3600)} h ${String(Math.floor((whole % 3600) / 60)).padStart(2, '0')} min`;
}

export function formatLatency(ms: number | null): string {
  if (ms === null) return '-';
  return ms < 10 ? `${ms.toFixed(2)} ms` : `${ms.toFixed(1)} ms`;
}

/** Fraction done of a resync, 0..1. */
export function resyncFraction(resync: ResyncProgressView): number {
  if (resync.bytesTotal <= 0) return 1;
  return Math.min(1, Math.max(0, (resync.bytesTotal - resync.bytesLeft) / resync.bytesTotal));
}

/** "resync 45.0% 12.0 MiB of 64.0 MiB left, 8.0 MiB/s, ETA 2 s" (+ " paused"). */
export function formatResync(resync: ResyncProgressView): string {
  const percent = (resyncFraction(resync) * 100).toFixed(1);
  const paused = resync.paused ? ', paused' : '';
  return `resync ${percent}% ${formatBytes(resync.bytesLeft)} of ${formatBytes(resync.bytesTotal)} left, ${formatRate(resync.bytesPerSecond)}, ETA ${formatDuration(resync.etaSeconds)}${paused}`;
}

/** Fraction done of a verify, 0..1. */
export function verifyFraction(verify: VerifyProgressView): number {
  if (verify.lengthBytes <= 0) return 1;
  return Math.min(1, Math.max(0, verify.bytesDone / verify.lengthBytes));
}

/**
 * "verify 45.0% of 1.0 GiB at 0, 200.0 MiB/s, ETA 3 s, 2 mismatched chunks" while it runs;
 * "verify (last): complete, ... " after.
 */
export function formatVerify(verify: VerifyView): string {
  const current = verify.current;
  const chunk = formatBytes(verify.chunkBytes);
  if (current === null) return `verify: none run yet (${verify.threads} hash threads, ${verify.algorithm}, chunks of ${chunk}${verify.intervalMs > 0 ? `, every ${formatDuration(verify.intervalMs / 1000)}` : ''})`;
  const range = `${formatBytes(current.lengthBytes)} at ${current.offsetBytes}`;
  const mode = current.repair ? 'repair' : 'check';
  const found = `${current.mismatchChunks} mismatched chunk${current.mismatchChunks === 1 ? '' : 's'} of ${chunk}${current.repair ? `, ${current.repairedChunks} repaired` : ''}`;
  const skipped = `${formatBytes(current.bytesSkipped)} zero skipped${current.bytesUnchecked > 0 ? `, ${formatBytes(current.bytesUnchecked)} not compared` : ''}`;
  if (current.running) {
    const percent = (verifyFraction(current) * 100).toFixed(1);
    return `verify (${mode}): ${percent}% of ${range}, ${formatRate(current.bytesPerSecond)}, ETA ${formatDuration(current.etaSeconds)}, ${found}, ${skipped}`;
  }
  const how = current.stopped ? 'stopped' : 'complete';
  const seconds = current.finishedAt === null ? null : (current.finishedAt - current.startedAt) / 1000;
  return `verify (${mode}, last): ${how} after ${formatDuration(seconds)}, ${formatBytes(current.bytesDone)} of ${range}, ${found}, ${skipped}`;
}

function pad(text: string, width: number): string {
  return text.length >= width ? text : text + ' '.repeat(width - text.length);
}

const kLegColumns = ['LEG', 'STATE', 'IN-FLIGHT', 'LATENCY', 'DIRTY', 'URI'] as const;

/** One row per leg (plus a resync line under a resyncing leg, and the reason of a failed one). */
export function formatLegTable(legs: readonly LegView[]): string[] {
  const rows = legs.map((leg) => [leg.name, leg.state, String(leg.inFlight), formatLatency(leg.latencyMeanMs), formatBytes(leg.dirtyBytes), `${leg.uri} (${leg.kind})`]);
  const widths = kLegColumns.map((title, column) => Math.max(title.length, ...rows.map((row) => (row[column] ?? '').length)));
  const line = (cells: readonly string[]): string => cells.map((cell, column) => (column === cells.length - 1 ? cell : pad(cell, widths[column] ?? 0))).join('  ');
  const lines = [line(kLegColumns)];
  for (const [at, leg] of legs.entries()) {
    lines.push(line(rows[at] ?? []));
    if (leg.resync !== null) lines.push(`    ${formatResync(leg.resync)}`);
    if (leg.failureReason !== null && leg.state !== 'in-sync') lines.push(`    reason: ${leg.failureReason}`);
    if ((leg.readRepairs ?? 0) > 0 || leg.writeMostly === true) {
      const parts = [`reads ${leg.reads ?? 0}`];
      if ((leg.readRepairs ?? 0) > 0) parts.push(`read errors repaired ${leg.readRepairs}`);
      if (leg.writeMostly === true) parts.push(`write-mostly, ${formatBytes(leg.behindBytes ?? 0)} behind`);
      lines.push(`    ${parts.join(', ')}`);
    }
  }
  return lines;
}

export function formatExportLine(status: StatusResult): string {
  const name = status.export.name === '' ? '""' : `"${status.export.name}"`;
  const clients = status.export.clients === 1 ? '1 client' : `${status.export.clients} clients`;
  return `export ${name}: ${formatBytes(status.export.sizeBytes)} (${status.export.sizeBytes} bytes), ${clients}, ring ${status.stats.ringSlotsInUse}/${status.stats.ringSlots} slots in use`;
}

export function formatStatus(status: StatusResult): string[] {
  const lines = [formatExportLine(status)];
  const resync = status.resync;
  // idle: no leg is being resynced (running or paused says what a resync does, or would do)
  const copying = status.legs.some((leg) => leg.resync !== null);
  lines.push(`resync: ${!copying ? (resync.paused ? 'idle (paused)' : 'idle') : resync.paused ? 'paused' : 'running'}, floor ${formatRate(resync.minBytesPerSecond)}, ceiling ${formatCeiling(resync.maxBytesPerSecond)}`);
  const meta = status.metadata;
  lines.push(meta === null || meta === undefined
    ? 'metadata: none (--metadata none: unprotected against crashes, restarts while degraded, stale legs)'
    : `metadata: array "${meta.arrayName}" ${meta.arrayUuid}, events ${meta.events}, write-intent ${meta.dirtyChunks} of ${meta.chunkCount} chunks of ${formatBytes(meta.bitmapChunkBytes)} set`);
  if (status.verify !== undefined) lines.push(formatVerify(status.verify));
  lines.push(...formatLegTable(status.legs));
  const latency = Object.entries(status.latency).filter(([, view]) => view.count > 0).map(([kind, view]) => `${kind} ${view.count} (mean ${formatLatency(view.meanMs)})`);
  lines.push(`requests: ${latency.length === 0 ? 'none yet' : latency.join(', ')}`);
  lines.push(`daemon: pid ${status.daemon.pid}, up ${formatDuration(status.daemon.uptimeSeconds)}, log level ${status.daemon.logLevel}, control ${status.daemon.control}`);
  return lines;
}

export function formatBitmap(bitmap: BitmapResult): string[] {
  const lines = [
    `leg ${bitmap.leg} dirty map: ${formatBytes(bitmap.dirtyBytes)} dirty (${bitmap.dirtyChunks} chunks of ${formatBytes(bitmap.chunkBytes)}) of ${formatBytes(bitmap.deviceBytes)}`,
    `pages: ${bitmap.pagesInUse} in use, ${bitmap.freePages} free of ${bitmap.poolPages}, ${bitmap.sentinelPages} sentinel (whole page dirty); memory ${formatBytes(bitmap.memoryBytes)}`,
  ];
  if (bitmap.firstRuns.length === 0) lines.push('no dirty runs');
  else {
    lines.push('first dirty runs:');
    for (const run of bitmap.firstRuns) lines.push(`  ${run.offsetBytes}..${run.offsetBytes + run.lengthBytes} (${formatBytes(run.lengthBytes)})`);
  }
  return lines;
}

export function formatSlots(slots: SlotsResult): string[] {
  const lines = [`ring: ${slots.slotCount} slots of ${formatBytes(slots.slotBytes)}, ${slots.freeCount} free, ${slots.inUse} requests in use`];
  for (const request of slots.requests) {
    lines.push(`  slot ${request.slot}: ${request.command} ${request.state} offset ${request.offsetBytes} length ${request.lengthBytes} (${request.spanSlots} slot${request.spanSlots === 1 ? '' : 's'})`);
  }
  if (slots.inUse > slots.requests.length) lines.push(`  ... and ${slots.inUse - slots.requests.length} more`);
  return lines;
}
