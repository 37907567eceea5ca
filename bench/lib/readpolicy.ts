/**
 * Read policy and slow legs (issue 14, "Read policy and slow legs"), measured side by side in
 * one run: 2-leg `enbd mirror`s over `nbdkit memory` legs, one set with two fast legs (the
 * reference) and the others with leg 1 behind nbdkit's delay filter (kReadPolicyDelayMs per
 * read and per write, kSlowLegThreads nbdkit threads), on 4 KiB random reads and writes at QD32.
 * Threads: harness main thread; servers are child processes of the phase's CaseContext.
 *
 * Mirrors (each with fresh legs):
 *   fast              two fast legs, least-pending (the reference)
 *   slow-least        fast + slow, least-pending (today's default: the slow leg gets reads)
 *   slow-latency      fast + slow, --read-policy latency
 *   slow-wmostly      fast + slow, --write-mostly 1
 *   slow-wbehind      fast + slow, --write-mostly 1 --write-behind kWriteBehindMiB
 * Reads: every slow-* mirror / fast. Writes: slow-least (a write waits for both legs: the
 * slow leg sets the pace) and slow-wbehind / fast. Ratio = IOPS / IOPS(fast) of the same round
 * (round order alternates), median over rounds. Targets of the issue: randread with latency or
 * write-mostly >= 0.9x; randwrite with write-behind >= 0.8x.
 *
 * Invariants:
 * - Every mirror gets legs started the same way (fresh `nbdkit memory` of the export size).
 * - A server that cannot start or dies becomes an error row; the phase never throws.
 * - The caller stops every process the phase started (they are in its CaseContext).
 */
import { join } from 'node:path';
import type { CaseContext } from './case.js';
import { startTwoLegMirror } from './legs.js';
import { measure } from './measure.js';
import type { ManagedProcess } from './proc.js';
import { kWorkloads, type Workload } from './workloads.js';
import { describeError, median } from './numbers.js';

export const kReadPolicyDelayMs = 5;
/**
 * nbdkit threads of the slow leg. The leg models latency, not a throughput cap: with T threads
 * a leg of D ms serves at most T / D requests per second (16, nbdkit's default, caps a 5 ms leg
 * at 3,200/s; 64 at 12,800/s, under what two fast legs do here, so no write-behind could reach
 * 0.8x of them). 256 threads: 51,200/s, above the fast legs.
 */
export const kSlowLegThreads = 256;
export const kWriteBehindMiB = 64;
export const kReadPolicyTargets = { read: 0.9, writeBehind: 0.8 } as const;

interface MirrorSpec {
  name: string;
  slow: boolean;
  flags: string[];
  /** Which workloads this mirror runs, and the target of its ratio (null: shown, no target). */
  read: number | null | undefined;
  write: number | null | undefined;
}

/** undefined: the workload is not run on this mirror. */
const kMirrors: readonly MirrorSpec[] = [
  { name: 'fast', slow: false, flags: [], read: null, write: null },
  { name: 'slow-least', slow: true, flags: ['--read-policy', 'least-pending'], read: null, write: null },
  { name: 'slow-latency', slow: true, flags: ['--read-policy', 'latency'], read: kReadPolicyTargets.read, write: undefined },
  { name: 'slow-wmostly', slow: true, flags: ['--write-mostly', '1'], read: kReadPolicyTargets.read, write: undefined },
  { name: 'slow-wbehind', slow: true, flags: ['--write-mostly', '1', '--write-behind', String(kWriteBehindMiB)], read: undefined, write: kReadPolicyTargets.writeBehind },
];

export interface ReadPolicyRow {
  mirror: string;
  workload: string;
  round: number;
  iops: number | null;
  clatMeanUs: number | null;
  error: string | null;
}

export interface ReadPolicyRatio {
  mirror: string;
  workload: string;
  /** Median over rounds of IOPS(mirror) / IOPS(fast) of the same round. */
  ratio: number | null;
  target: number | null;
  met: boolean | null;
}

export interface ReadPolicyResults {
  delayMs: number;
  writeBehindMiB: number;
  sizeBytes: number;
  rows: ReadPolicyRow[];
  ratios: ReadPolicyRatio[];
  error: string | null;
}

export interface ReadPolicyOptions {
  context: CaseContext;
  rounds: number;
  runtimeSec: number;
  rampSec: number;
  log(message: string): void;
}

interface Server {
  spec: MirrorSpec;
  uri: string;
  pids: number[];
  process: ManagedProcess | null;
  error: string | null;
}



async function startServer(context: CaseContext, spec: MirrorSpec): Promise<Server> {
  try {
    // The slow leg models latency, not a throughput cap (kSlowLegThreads).
    const started = await startTwoLegMirror(context, `rp-${spec.name}`, (index) => spec.slow && index === 1
      ? ['--threads', String(kSlowLegThreads), '--filter=delay', 'memory', String(context.sizeBytes), `delay-read=${kReadPolicyDelayMs}ms`, `delay-write=${kReadPolicyDelayMs}ms`]
      : ['memory', String(context.sizeBytes)], spec.flags);
    return { spec, uri: started.uri, pids: [started.process.pid], process: started.process, error: null };
  } catch (error) {
    return { spec, uri: '', pids: [], process: null, error: describeError(error) };
  }
}

function runsOn(spec: MirrorSpec, kind: 'read' | 'write'): boolean {
  return spec[kind] !== undefined;
}

export async function runReadPolicyBench(options: ReadPolicyOptions): Promise<ReadPolicyResults> {
  const { context } = options;
  const results: ReadPolicyResults = { delayMs: kReadPolicyDelayMs, writeBehindMiB: kWriteBehindMiB, sizeBytes: context.sizeBytes, rows: [], ratios: [], error: null };
  const workloads: Array<{ workload: Workload; kind: 'read' | 'write' }> = [];
  for (const [name, kind] of [['randread-4k-qd32', 'read'], ['randwrite-4k-qd32', 'write']] as const) {
    const workload = kWorkloads.find((candidate) => candidate.name === name);
    if (workload !== undefined) workloads.push({ workload, kind });
  }
  const servers: Server[] = [];
  for (const spec of kMirrors) {
    options.log(`readpolicy: starting mirror ${spec.name} ...`);
    servers.push(await startServer(context, spec));
  }
  for (const { workload, kind } of workloads) {
    const mine = servers.filter((server) => runsOn(server.spec, kind));
    for (let round = 0; round < options.rounds; round += 1) {
      const order = round % 2 === 0 ? mine : [...mine].reverse();
      for (const server of order) {
        const row: ReadPolicyRow = { mirror: server.spec.name, workload: workload.name, round, iops: null, clatMeanUs: null, error: server.error };
        results.rows.push(row);
        if (server.error !== null) continue;
        if (server.process !== null && !server.process.running) {
          row.error = `server ${server.process.exitDescription()}`;
          continue;
        }
        options.log(`readpolicy: ${workload.name} round ${round + 1}, ${server.spec.name} ...`);
        try {
          const measured = await measure(workload, {
            uri: server.uri, runtimeSec: options.runtimeSec, rampSec: options.rampSec, sizeBytes: context.sizeBytes,
            outputPath: join(context.runDir, `rp-${server.spec.name}-${workload.name}-${round}.json`),
          }, server.pids);
          row.iops = measured.iops;
          row.clatMeanUs = measured.clatMeanUs;
        } catch (error) {
          row.error = describeError(error);
        }
      }
    }
    for (const server of mine) {
      if (server.spec.name === 'fast') continue;
      const perRound: number[] = [];
      for (let round = 0; round < options.rounds; round += 1) {
        const row = results.rows.find((candidate) => candidate.workload === workload.name && candidate.round === round && candidate.mirror === server.spec.name);
        const base = results.rows.find((candidate) => candidate.workload === workload.name && candidate.round === round && candidate.mirror === 'fast');
        if (row?.iops != null && base?.iops != null && base.iops > 0) perRound.push(row.iops / base.iops);
      }
      const ratio = median(perRound);
      const target = server.spec[kind] ?? null;
      results.ratios.push({ mirror: server.spec.name, workload: workload.name, ratio, target, met: ratio === null || target === null ? null : ratio >= target });
    }
  }
  return results;
}

export function readPolicyBlock(results: ReadPolicyResults): string {
  const lines = [`read policy and slow legs (issue 14): 2-leg mirrors over nbdkit memory; "slow" = leg 1 behind ` +
    `the delay filter (${results.delayMs} ms per read and write); write-behind ${results.writeBehindMiB} MiB; 4 KiB QD32`];
  if (results.error !== null) lines.push(`  ERROR: ${results.error}`);
  lines.push('  mirror        workload            round  IOPS      mean us');
  for (const row of results.rows) {
    const iops = row.iops === null ? `- ${row.error ?? ''}` : Math.round(row.iops).toLocaleString('en-US');
    const latency = row.clatMeanUs === null ? '' : Math.round(row.clatMeanUs).toLocaleString('en-US');
    lines.push(`  ${row.mirror.padEnd(12)}  ${row.workload.padEnd(18)}  ${String(row.round + 1).padEnd(5)}  ${iops.padEnd(8)}  ${latency}`);
  }
  for (const ratio of results.ratios) {
    const verdict = ratio.target === null ? '' : ` (target >= ${ratio.target.toFixed(2)}x ${ratio.met === null ? 'NO DATA' : ratio.met ? 'MET' : 'MISSED'})`;
    lines.push(`  ${ratio.workload}: ${ratio.mirror} / fast = ${ratio.ratio === null ? '-' : ratio.ratio.toFixed(2)}x${verdict}`);
  }
  return lines.join('\n');
}

export function unavailableReadPolicy(sizeBytes: number, reason: string): ReadPolicyResults {
  return { delayMs: kReadPolicyDelayMs, writeBehindMiB: kWriteBehindMiB, sizeBytes, rows: [], ratios: [], error: reason };
}
