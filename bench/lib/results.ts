/**
 * Result records and the JSON file written per run: bench/results/<ISO date>.json (colons
 * replaced by '-' so the name is portable). The schema is versioned; add fields, never
 * change the meaning of an existing one.
 * Threads: harness main thread.
 */
import { mkdirSync, writeFileSync, renameSync } from 'node:fs';
import { join } from 'node:path';
import { assert } from '../../src/core/assert.js';
import type { MachineLimits } from './limits.js';
import type { MachineInfo, SourceInfo } from './machine.js';
import type { MatrixSummary } from './matrix.js';
import type { Measurement } from './measure.js';
import type { MetadataResults } from './metadata.js';
import type { ResyncResults } from './resync.js';
import type { VerifyResults } from './verify.js';
import type { LegConnResults } from './legconn.js';
import type { ReadPolicyResults } from './readpolicy.js';
import type { TlsResults } from './tls.js';

/**
 * Still 1: later additions are new fields only (`resync`; then `options.allPairs`, `matrix`,
 * `chart`, `counters` in each measurement; then `metadata`, `options.metadataCrashDeviceBytes`; then `tls`,
 * `legCpuPercent` / `legCpuSecPerGiB` in the TLS rows' measurements), so readers of older files keep working.
 */
export const kResultsSchemaVersion = 1;

export interface RowResult {
  caseName: string;
  workload: string;
  /** null when the row ran; otherwise why it did not (not built, failed to start, fio error). */
  error: string | null;
  /** The round with the median IOPS (null when no round succeeded). */
  measurement: Measurement | null;
  /** Every successful round, in run order (length <= rounds). */
  rounds: Measurement[];
  /** (max - min) / median of the rounds' IOPS, percent; NaN with fewer than two rounds. */
  spreadPercent: number;
}

export interface RatioResult {
  caseName: string;
  versus: string;
  workload: string;
  /**
   * Throughput ratio caseName / versus (IOPS; same as MB/s for one workload): the median of
   * per-round ratios when both rows have the same rounds, else the ratio of the median rounds.
   */
  throughputRatio: number | null;
  /** Server CPU s/GiB ratio caseName / versus (lower is better). */
  cpuPerGiBRatio: number | null;
  minRatio: number | null;
  met: boolean | null;
}

export interface RunResults {
  schema: number;
  startedAt: string;
  finishedAt: string;
  options: {
    quick: boolean;
    rounds: number;
    runtimeSec: number;
    rampSec: number;
    sizeBytes: number;
    /** Device size of the resync measurements (null: not run). Added with `resync`. */
    resyncSizeBytes: number | null;
    resyncRounds: number | null;
    cases: string[];
    workloads: string[];
    /** Every selected workload on every selected case (--all-pairs). Added with `matrix`. */
    allPairs?: boolean;
    /** Untimed fio seconds per case and warm-up workload before the first measurement (0: none). */
    warmupSec?: number;
    /** Device size of the metadata crash measurement (null: not run). Added with `metadata`. */
    metadataCrashDeviceBytes?: number | null;
  };
  machine: MachineInfo;
  source: SourceInfo;
  limits: MachineLimits | null;
  cases: Array<{ name: string; description: string; status: string }>;
  rows: RowResult[];
  ratios: RatioResult[];
  /** Resync measurements (lib/resync.ts); null with --no-resync. Absent in older files. */
  resync: ResyncResults | null;
  /** Online verify measurements (lib/verify.ts); null with --no-verify-phase. Absent in older files. */
  verify?: VerifyResults | null;
  /**
   * On-leg metadata measurements (lib/metadata.ts): --metadata leg vs none rows and ratios
   * (warm, cold), the SIGKILL-and-restart resync; null with --no-metadata. Absent in older files.
   */
  metadata?: MetadataResults | null;
  /**
   * TLS measurements (lib/tls.ts): rows of the TLS servers (with their legs' CPU in
   * measurement.legCpuSecPerGiB) and the pairs' ratios; null with --no-tls. Absent in older files.
   */
  tls?: TlsResults | null;
  /**
   * Several connections per leg (lib/legconn.ts, issue 15): IOPS per connection count and the
   * N / 1 ratios; null unless --legconn or --legconn-only. Absent in older files.
   */
  legconn?: LegConnResults | null;
  /**
   * Read policy and slow legs (lib/readpolicy.ts, issue 14): IOPS per mirror (two fast legs,
   * fast + 5 ms leg with least-pending / latency / write-mostly / write-behind) and the ratios to
   * two fast legs; null unless --readpolicy or --readpolicy-only. Absent in older files.
   */
  readpolicy?: ReadPolicyResults | null;
  /**
   * The copy-avoidance matrix (lib/matrix.ts): enbd mirror cells by legs x mode with ratios to
   * the direct leg, the pass-through and qemu quorum, reference points, copies-per-WRITE
   * verdicts. Absent in older files.
   */
  matrix?: MatrixSummary;
  /** The SVG chart written beside this file (file name), or null when none was drawn. */
  chart?: string | null;
}

/** The file name stem of a run's results (JSON and SVG): its ISO start, colons as '-'. */
export function resultsStem(startedAt: string): string {
  return startedAt.replace(/:/g, '-').replace(/\.\d+Z$/, 'Z');
}

/** Writes text atomically (tmp + rename). */
export function writeAtomic(path: string, text: string): void {
  const tmpPath = `${path}.tmp`;
  writeFileSync(tmpPath, text);
  renameSync(tmpPath, path);
}

/** Writes results atomically (tmp + rename) and returns the path. */
export function writeResults(resultsDir: string, results: RunResults): string {
  assert(results.schema === kResultsSchemaVersion);
  mkdirSync(resultsDir, { recursive: true });
  const path = join(resultsDir, `${resultsStem(results.startedAt)}.json`);
  // NaN is not JSON; store unmeasured numbers as null.
  const text = JSON.stringify(results, (_key, value: unknown) =>
    (typeof value === 'number' && !Number.isFinite(value) ? null : value), 2);
  writeAtomic(path, `${text}\n`);
  return path;
}
