/**
 * Text output of the on-leg metadata measurements (lib/metadata.ts): the rows of both mirrors
 * in the harness's table format (last column: metadata / none), the targets with their
 * verdicts, and the crash-and-restart summary. Pure formatting, no I/O.
 * Threads: harness main thread.
 */
import { kMetaCase, kNoMetaCase, type CrashResult, type MetadataResults } from './metadata.js';
import { ratioBlock, resultsTable } from './report.js';
import { comparisonText } from './resync-report.js';

const kMiB = 1024 * 1024;

function fixed(value: number | null | undefined, digits: number): string {
  if (value === null || value === undefined || !Number.isFinite(value)) return '-';
  return value.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

function size(bytes: number): string {
  if (bytes >= kMiB) return `${fixed(bytes / kMiB, bytes % kMiB === 0 ? 0 : 1)} MiB`;
  return `${fixed(bytes / 1024, 0)} KiB`;
}

function crashLines(crash: CrashResult): string[] {
  const lines = [
    `crash: SIGKILL after ${fixed(crash.loadMs / 1000, 1)} s of 4 KiB random writes QD32 over the first ` +
    `${size(crash.workingSetBytes)} of a ${crash.deviceBytes === 0 ? '?' : size(crash.deviceBytes)} device ` +
    `(bitmap chunk ${crash.chunkBytes === 0 ? '?' : size(crash.chunkBytes)}), then a restart on the same legs`,
  ];
  if (crash.afterKill !== null) {
    // Expected to differ now and then: writes in flight at the kill reached one leg only.
    const text = crash.afterKill.status === 'differ'
      ? `differ in ${crash.afterKill.differingBlocks} block(s) of 4 KiB (writes in flight at the kill reached one leg only)`
      : comparisonText(crash.afterKill);
    lines.push(`  legs after the kill:   ${text} (working set only)`);
  }
  if (crash.assembledRoles.length > 0) {
    const legs = crash.assembledRoles.map((role, index) =>
      `leg ${index} ${role}, ${fixed((crash.assembledDirtyBytes[index] ?? Number.NaN) / kMiB, 1)} MiB marked`);
    lines.push(`  restart assembled:    ${legs.join('; ')}`);
  }
  if (crash.resyncedBytes !== null && crash.deviceBytes > 0) {
    lines.push(`  resynced:             ${fixed(crash.resyncedBytes / kMiB, 1)} MiB of ${fixed(crash.deviceBytes / kMiB, 0)} MiB ` +
      `(${fixed((crash.resyncedBytes / crash.deviceBytes) * 100, 1)} % of the device; working set ` +
      `${fixed((crash.workingSetBytes / crash.deviceBytes) * 100, 1)} %), every leg in sync ` +
      `${fixed((crash.inSyncMs ?? Number.NaN) / 1000, 2)} s after the restart`);
  }
  if (crash.afterResync !== null) lines.push(`  legs after the resync: ${comparisonText(crash.afterResync)}`);
  if (crash.error !== null) lines.push(`  FAILED: ${crash.error.split('\n')[0] ?? ''}`);
  return lines;
}

export function metadataBlock(results: MetadataResults): string {
  const lines = [
    `on-leg metadata (issue 11), side by side: ${kMetaCase} = enbd create --assume-clean, then --metadata leg ` +
    `(chunk ${size(results.warmChunkBytes)}; cold: ${size(results.coldChunkBytes)}); ${kNoMetaCase} = --metadata none; ` +
    `2 nbdkit memory legs each, region ${size(results.sizeBytes)}`,
  ];
  for (const step of results.steps) lines.push(`  ${step.name}: ${step.description}`);
  if (results.rows.length > 0) lines.push('', resultsTable(results.rows, results.ratios, kNoMetaCase));
  if (results.ratios.some((ratio) => ratio.minRatio !== null)) {
    lines.push('', `targets (${results.source}; paired per round)`, ratioBlock(results.ratios));
  }
  if (results.keeper.length > 0) {
    lines.push('', `keeper of ${kMetaCase} over each measured run (mirror.metadataStatus() before/after; fio writes include the ramp):`);
    for (const entry of results.keeper) {
      const perWrite = entry.writeRequests === null || entry.writeRequests === 0 ? '' : ` (${fixed(entry.intentWaits / entry.writeRequests, 3)} per write)`;
      lines.push(`  ${entry.step} round ${entry.round + 1}: ${fixed(entry.writeRequests, 0)} writes, ${fixed(entry.intentWaits, 0)} waited for a bitmap write${perWrite}, ` +
        `${fixed(entry.bitmapWrites, 0)} bitmap writes, ${fixed(entry.superblockWrites, 0)} superblock writes; ${fixed(entry.dirtyChunks, 0)} of ${fixed(entry.chunkCount, 0)} chunks dirty after`);
    }
  }
  const cold = results.ratios.find((ratio) => ratio.workload.endsWith('-cold'));
  if (cold !== undefined) lines.push(`cold (every write dirties a clean chunk): ${fixed(cold.throughputRatio, 2)}x of --metadata none (reported, no target)`);
  if (results.error !== null) lines.push(`FAILED: ${results.error.split('\n')[0] ?? ''}`);
  if (results.crash !== null) lines.push('', ...crashLines(results.crash));
  return lines.join('\n');
}
