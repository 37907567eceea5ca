/**
 * fio runner and JSON parser: builds the command line for one workload against one NBD URI
 * (`--ioengine=nbd`, time based, JSON to a file so fio's "connected to NBD server" chatter
 * never mixes with it), runs it as a child, and extracts IOPS, bytes/s and completion
 * latency (mean and p99) from fio's JSON.
 * Threads: harness main thread.
 *
 * Invariants:
 * - fio's JSON report excludes the ramp period; the harness's CPU window lies inside the
 *   measured period (see run.ts), so both describe the same steady state.
 * - Every number returned is finite and >= 0, or parsing throws (a malformed report must
 *   surface as a failed row, never as a silent zero).
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { assert } from '../../src/core/assert.js';
import type { Workload } from './workloads.js';

const kNsPerUs = 1000;
const kP99Key = '99.000000';
/** Extra time fio may take beyond ramp + runtime before the harness kills it. */
const kFioSlackMs = 30_000;

export interface FioOptions {
  uri: string;
  runtimeSec: number;
  rampSec: number;
  sizeBytes: number;
  outputPath: string;
  /** Start of the region fio works on (default 0); the region is [offsetBytes, + sizeBytes). */
  offsetBytes?: number;
  /**
   * Random patterns: keep fio's random map, so no block is written twice in one pass (default
   * false: `--norandommap`, blocks may repeat).
   */
  randomMap?: boolean;
  /**
   * true (default): run for rampSec + runtimeSec whatever was done. false: one pass over
   * sizeBytes, cut short after runtimeSec.
   */
  timeBased?: boolean;
  /**
   * fio's environment (default: the harness's). The TLS phase sets HOME to a directory whose
   * .pki/libnbd/ca-cert.pem is its CA: fio's nbd engine cannot pass `tls-certificates=DIR`
   * in its URI (libnbd refuses that local-file parameter unless the program allows it), but
   * libnbd looks for certificates in $HOME/.pki/libnbd when the URI names none.
   */
  env?: NodeJS.ProcessEnv;
}

export interface FioResult {
  iops: number;
  bytesPerSec: number;
  ioBytes: number;
  clatMeanUs: number;
  clatP99Us: number;
  /** fio's own CPU (usr + sys) in percent of one core. */
  fioCpuPercent: number;
  runtimeMs: number;
}

export function fioArgs(workload: Workload, options: FioOptions): string[] {
  assert(options.runtimeSec > 0 && options.rampSec >= 0);
  assert(options.sizeBytes >= workload.blockBytes);
  const args = [
    `--name=${workload.name}`,
    '--ioengine=nbd',
    `--uri=${options.uri}`,
    `--rw=${workload.pattern}`,
    `--bs=${workload.blockBytes}`,
    `--iodepth=${workload.queueDepth}`,
    `--size=${options.sizeBytes}`,
    ...(options.offsetBytes === undefined ? [] : [`--offset=${options.offsetBytes}`]),
    '--numjobs=1',
    ...(options.timeBased === false ? [] : ['--time_based']),
    // In milliseconds: fio reads a bare "0.5" as 0 seconds.
    `--runtime=${Math.round(options.runtimeSec * 1000)}ms`,
    `--ramp_time=${Math.round(options.rampSec * 1000)}ms`,
    '--output-format=json',
    `--output=${options.outputPath}`,
  ];
  if (workload.pattern.startsWith('rand')) {
    args.push(...(options.randomMap === true ? [] : ['--norandommap']), '--randrepeat=0');
  }
  return args;
}

interface FioDirection {
  io_bytes: number;
  bw_bytes: number;
  iops: number;
  total_ios: number;
  runtime: number;
  clat_ns: { mean: number; percentile?: Record<string, number> };
}

function finite(value: unknown, what: string): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value < 0) {
    throw new Error(`fio JSON: ${what} is not a non-negative number (${String(value)})`);
  }
  return value;
}

function direction(job: Record<string, unknown>, name: 'read' | 'write'): FioDirection {
  const value = job[name];
  if (typeof value !== 'object' || value === null) throw new Error(`fio JSON: job has no "${name}"`);
  return value as FioDirection;
}

/** Parses fio's --output-format=json text for a single-job run. */
export function parseFioJson(text: string): FioResult {
  const report = JSON.parse(text) as { jobs?: Array<Record<string, unknown>> };
  const job = report.jobs?.[0];
  if (job === undefined) throw new Error('fio JSON: no jobs');
  if (job['error'] !== 0) throw new Error(`fio JSON: job error ${String(job['error'])}`);
  const sides = [direction(job, 'read'), direction(job, 'write')].filter((side) => side.total_ios > 0);
  if (sides.length === 0) throw new Error('fio JSON: no I/O completed');
  let iops = 0;
  let bytesPerSec = 0;
  let ioBytes = 0;
  let clatWeightedNs = 0;
  let totalIos = 0;
  let clatP99Ns = 0;
  let runtimeMs = 0;
  for (const side of sides) {
    iops += finite(side.iops, 'iops');
    bytesPerSec += finite(side.bw_bytes, 'bw_bytes');
    ioBytes += finite(side.io_bytes, 'io_bytes');
    clatWeightedNs += finite(side.clat_ns.mean, 'clat_ns.mean') * side.total_ios;
    totalIos += finite(side.total_ios, 'total_ios');
    // Mixed workloads: p99 of the slower direction (an upper bound of the combined p99).
    clatP99Ns = Math.max(clatP99Ns, finite(side.clat_ns.percentile?.[kP99Key], 'clat p99'));
    runtimeMs = Math.max(runtimeMs, finite(side.runtime, 'runtime'));
  }
  assert(totalIos > 0);
  const fioCpuPercent = finite(job['usr_cpu'], 'usr_cpu') + finite(job['sys_cpu'], 'sys_cpu');
  return {
    iops, bytesPerSec, ioBytes, runtimeMs, fioCpuPercent,
    clatMeanUs: clatWeightedNs / totalIos / kNsPerUs,
    clatP99Us: clatP99Ns / kNsPerUs,
  };
}

/** Runs fio to completion and parses its report; rejects with fio's stderr on failure. */
export async function runFio(workload: Workload, options: FioOptions): Promise<FioResult> {
  const args = fioArgs(workload, options);
  const timeoutMs = (options.runtimeSec + options.rampSec) * 1000 + kFioSlackMs;
  type Outcome = { status: number | null; stderr: string };
  const { status, stderr } = await new Promise<Outcome>((resolveRun) => {
    const child = spawn('fio', args, { stdio: ['ignore', 'ignore', 'pipe'], env: options.env ?? process.env });
    let stderrText = '';
    child.stderr.on('data', (chunk: Buffer) => (stderrText += chunk.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.once('error', (error) => {
      clearTimeout(timer);
      resolveRun({ status: null, stderr: String(error) });
    });
    child.once('close', (code) => {
      clearTimeout(timer);
      resolveRun({ status: code, stderr: stderrText });
    });
  });
  if (status !== 0) {
    const detail = stderr.replace(/fio: connected to NBD server\n?/g, '').trim().slice(-1000);
    throw new Error(`fio exited ${String(status)}: ${detail}`);
  }
  return parseFioJson(readFileSync(options.outputPath, 'utf8'));
}
