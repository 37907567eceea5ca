/**
 * Verify measurements (issue 14, "Performance of verify"): how fast `enbd verify` checks two
 * nbdkit memory legs, against `nbdcopy` of one leg to `null:` (the anchor: reading one copy as
 * fast as libnbd can), the CPU it costs per GiB, and how it scales with 1, 2 and 4 hash-pool
 * threads; plus the same verify with sha256 and blake2b512 in the pool (the hash choice).
 * Threads: harness main thread. The mirror runs in this process (MirrorDevice, its connection
 * actors and the piscina hash workers on worker threads); legs are `nbdkit memory` children.
 *
 * Scenario (legs filled once from `nbdkit pattern`: non-zero data, nothing skipped as zero):
 *   anchor   nbdcopy leg0 -> null:, before and after the verifies (the mean is the anchor)
 *   verify   per configuration (threads, algorithm): open a mirror over both legs, an untimed
 *            warm-up verify of 64 MiB (JIT, pool start), then a timed verify of the device;
 *            CPU = this process's user+system (every thread: engine, actors, hash workers)
 *            and the legs' nbdkit CPU, per GiB of device verified
 * Ratio: device bytes verified per second / device bytes nbdcopy read per second (verify
 * reads every byte twice, once per leg). Target >= 0.8 at the default pool size.
 * Since the verifier compares equal copies by memcmp (issue 14), the pool hashes nothing on
 * these equal legs: the thread and hash rows run the same path and differ only by noise (they
 * stay to show that, and would show the pool's cost if the legs differed).
 *
 * Invariants:
 * - The verify finds zero mismatches (the legs are equal); a mismatch is reported as an error.
 * - Every process started here is stopped before returning, also on errors.
 */
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { pino } from 'pino';
import { assert } from '../../src/core/assert.js';
import type { Logger } from '../../src/core/log.js';
import { MirrorDevice } from '../../src/engine/mirror.js';
import { kConnectionActorEntry, kHashWorkerEntry } from '../../src/cli/actor-entry.js';
import type { HashAlgorithm } from '../../src/engine/hash-pool.js';
import { unixUri } from './case.js';
import { treeCpuSeconds } from './cpu.js';
import { runTool, type ManagedProcess } from './proc.js';
import { startNbdkitLeg } from './legs.js';

const kToolTimeoutMs = 600_000;
const kWarmupBytes = 64 * 1024 * 1024;
const kGiB = 1024 ** 3;
export const kVerifyTarget = { throughputRatioMin: 0.8 } as const;

export interface VerifyBenchOptions {
  runDir: string;
  sizeBytes: number;
  quick: boolean;
  log: (line: string) => void;
}

export interface VerifyConfig {
  threads: number;
  algorithm: HashAlgorithm;
}

export interface VerifyRun extends VerifyConfig {
  wallMs: number;
  bytesPerSec: number;
  /** This process's CPU (every thread) per GiB of device verified. */
  enbdCpuSecPerGiB: number;
  /** The two nbdkit legs' CPU per GiB of device verified. */
  legsCpuSecPerGiB: number;
  mismatchChunks: number;
  /** bytesPerSec / the anchor's. */
  ratio: number | null;
  error: string | null;
}

export interface VerifyResults {
  sizeBytes: number;
  legs: string;
  anchor: { wallMs: number[]; bytesPerSec: number | null; cpuSecPerGiB: number | null; method: string };
  runs: VerifyRun[];
  /** The default configuration's ratio (2 threads, xxh64). */
  throughputRatio: number | null;
  target: typeof kVerifyTarget;
  met: boolean | null;
  error: string | null;
}

/** Pool scaling with the default hash, then the other hashes at the default pool size. */
export function verifyConfigs(quick: boolean): VerifyConfig[] {
  const configs: VerifyConfig[] = [1, 2, 4].map((threads) => ({ threads, algorithm: 'xxh64' as const }));
  const others: HashAlgorithm[] = quick ? ['sha256'] : ['sha256', 'blake2b512'];
  for (const algorithm of others) configs.push({ threads: 2, algorithm });
  return configs;
}

function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function processCpuSeconds(): number {
  const usage = process.cpuUsage();
  return (usage.user + usage.system) / 1e6;
}

class VerifyScenario {
  private readonly processes: ManagedProcess[] = [];
  private readonly legSockets: [string, string];
  private readonly logger: Logger;

  constructor(private readonly options: VerifyBenchOptions) {
    this.legSockets = [join(options.runDir, 'verify-leg0.sock'), join(options.runDir, 'verify-leg1.sock')];
    this.logger = pino({ level: 'warn', base: { name: 'enbd-bench-verify' } },
      pino.destination({ dest: join(options.runDir, 'verify-mirror.log'), sync: true }));
  }

  private get legUris(): string[] {
    return this.legSockets.map((socket) => unixUri(socket));
  }

  private async spawn(label: string, socketPath: string, args: readonly string[]): Promise<ManagedProcess> {
    const managed = await startNbdkitLeg(this.options.runDir, label, socketPath, args);
    this.processes.push(managed);
    return managed;
  }

  private legPids(): number[] {
    return this.processes.filter((managed) => managed.spec.label.startsWith('verify-leg')).map((managed) => managed.pid);
  }

  async startLegs(): Promise<void> {
    const size = String(this.options.sizeBytes);
    await this.spawn('verify-leg0', this.legSockets[0], ['memory', size]);
    await this.spawn('verify-leg1', this.legSockets[1], ['memory', size]);
    const patternSocket = join(this.options.runDir, 'verify-pattern.sock');
    const pattern = await this.spawn('verify-pattern', patternSocket, ['pattern', size]);
    const runs = await Promise.all(this.legUris.map((uri) => runTool('nbdcopy', [unixUri(patternSocket), uri], kToolTimeoutMs)));
    await pattern.stop();
    for (const run of runs) {
      if (run.status !== 0) throw new Error(`filling a leg: nbdcopy exited ${String(run.status)}: ${run.output}`);
    }
  }

  /** nbdcopy leg0 -> null: (wall ms, leg CPU seconds). */
  async anchor(): Promise<{ wallMs: number; legCpuSec: number }> {
    const cpuBefore = treeCpuSeconds(this.legPids());
    const run = await runTool('nbdcopy', [this.legUris[0] as string, 'null:'], kToolTimeoutMs);
    if (run.status !== 0) throw new Error(`nbdcopy to null: exited ${String(run.status)}: ${run.output}`);
    return { wallMs: run.wallMs, legCpuSec: treeCpuSeconds(this.legPids()) - cpuBefore };
  }

  async verify(config: VerifyConfig): Promise<Omit<VerifyRun, 'ratio'>> {
    const mirror = await MirrorDevice.open({
      legs: this.legUris, actorEntry: kConnectionActorEntry, logger: this.logger, logLevel: 'warn',
      verify: { threads: config.threads, algorithm: config.algorithm, workerEntry: kHashWorkerEntry },
    });
    try {
      assert(mirror.sizeBytes === this.options.sizeBytes, 'mirror has the legs\' size');
      mirror.startVerify({ lengthBytes: Math.min(kWarmupBytes, mirror.sizeBytes) });
      await mirror.verifyDone();
      const cpuBefore = processCpuSeconds();
      const legsBefore = treeCpuSeconds(this.legPids());
      const startedAt = performance.now();
      mirror.startVerify({});
      await mirror.verifyDone();
      const wallMs = performance.now() - startedAt;
      const enbdCpu = processCpuSeconds() - cpuBefore;
      const legsCpu = treeCpuSeconds(this.legPids()) - legsBefore;
      const progress = mirror.verifyStatus().current;
      assert(progress !== null, 'a verify ran');
      const gib = this.options.sizeBytes / kGiB;
      const error = progress.bytesChecked !== this.options.sizeBytes
        ? `checked ${progress.bytesChecked} of ${this.options.sizeBytes} bytes`
        : progress.mismatchChunks !== 0 ? `${progress.mismatchChunks} mismatched chunks on equal legs` : null;
      return {
        ...config, wallMs, bytesPerSec: this.options.sizeBytes / (wallMs / 1000),
        enbdCpuSecPerGiB: enbdCpu / gib, legsCpuSecPerGiB: legsCpu / gib,
        mismatchChunks: progress.mismatchChunks, error,
      };
    } finally {
      await mirror.close();
    }
  }

  async stop(): Promise<void> {
    await Promise.all(this.processes.map(async (managed) => await managed.stop()));
    this.logger.flush();
  }
}

export async function runVerifyBench(options: VerifyBenchOptions): Promise<VerifyResults> {
  assert(options.sizeBytes % (1024 * 1024) === 0, 'verify device size is whole MiB');
  const results: VerifyResults = {
    sizeBytes: options.sizeBytes,
    legs: 'two nbdkit memory legs on Unix sockets (nbdkit pattern data); mirror in the harness process',
    anchor: { wallMs: [], bytesPerSec: null, cpuSecPerGiB: null, method: 'nbdcopy leg0 null:' },
    runs: [], throughputRatio: null, target: { ...kVerifyTarget }, met: null, error: null,
  };
  const scenario = new VerifyScenario(options);
  const anchorCpu: number[] = [];
  try {
    options.log(`verify: filling two ${options.sizeBytes / 2 ** 20} MiB legs ...`);
    await scenario.startLegs();
    const first = await scenario.anchor();
    results.anchor.wallMs.push(first.wallMs);
    anchorCpu.push(first.legCpuSec);
    for (const config of verifyConfigs(options.quick)) {
      options.log(`verify: ${config.threads} thread(s), ${config.algorithm} ...`);
      try {
        results.runs.push({ ...(await scenario.verify(config)), ratio: null });
      } catch (error) {
        results.runs.push({ ...config, wallMs: 0, bytesPerSec: 0, enbdCpuSecPerGiB: 0, legsCpuSecPerGiB: 0, mismatchChunks: 0, ratio: null, error: describe(error) });
      }
    }
    const last = await scenario.anchor();
    results.anchor.wallMs.push(last.wallMs);
    anchorCpu.push(last.legCpuSec);
  } catch (error) {
    results.error = describe(error);
    options.log(`verify failed: ${results.error}`);
  } finally {
    await scenario.stop().catch((error: unknown) => options.log(`verify cleanup: ${describe(error)}`));
  }
  if (results.anchor.wallMs.length > 0) {
    const meanMs = results.anchor.wallMs.reduce((sum, value) => sum + value, 0) / results.anchor.wallMs.length;
    results.anchor.bytesPerSec = options.sizeBytes / (meanMs / 1000);
    results.anchor.cpuSecPerGiB = anchorCpu.reduce((sum, value) => sum + value, 0) / anchorCpu.length / (options.sizeBytes / kGiB);
  }
  const anchor = results.anchor.bytesPerSec;
  for (const run of results.runs) run.ratio = anchor === null || run.error !== null ? null : run.bytesPerSec / anchor;
  results.throughputRatio = results.runs.find((run) => run.threads === 2 && run.algorithm === 'xxh64')?.ratio ?? null;
  results.met = results.throughputRatio === null ? null : results.throughputRatio >= kVerifyTarget.throughputRatioMin;
  return results;
}

export function unavailableVerify(sizeBytes: number, reason: string): VerifyResults {
  return {
    sizeBytes, legs: '', anchor: { wallMs: [], bytesPerSec: null, cpuSecPerGiB: null, method: 'nbdcopy leg0 null:' },
    runs: [], throughputRatio: null, target: { ...kVerifyTarget }, met: null, error: reason,
  };
}

function mib(bytesPerSec: number | null): string {
  return bytesPerSec === null ? '-' : `${(bytesPerSec / 2 ** 20).toFixed(0)} MiB/s`;
}

/** The verify block of the report. */
export function verifyBlock(results: VerifyResults): string {
  const lines = [`verify (issue 14): ${results.sizeBytes / 2 ** 20} MiB device, ${results.legs}`];
  if (results.error !== null) lines.push(`  error: ${results.error}`);
  lines.push(`  anchor ${results.anchor.method}: ${mib(results.anchor.bytesPerSec)} (runs ${results.anchor.wallMs.map((ms) => `${ms.toFixed(0)} ms`).join(', ')}), leg CPU ${results.anchor.cpuSecPerGiB?.toFixed(2) ?? '-'} s/GiB`);
  lines.push('  threads  hash        verify      / anchor  enbd CPU s/GiB  legs CPU s/GiB');
  for (const run of results.runs) {
    const ratio = run.ratio === null ? '-' : `${run.ratio.toFixed(2)}x`;
    const row = `  ${String(run.threads).padStart(7)}  ${run.algorithm.padEnd(10)}  ${mib(run.bytesPerSec).padStart(10)}  ${ratio.padStart(8)}  ${run.enbdCpuSecPerGiB.toFixed(2).padStart(14)}  ${run.legsCpuSecPerGiB.toFixed(2).padStart(14)}`;
    lines.push(run.error === null ? row : `${row}  error: ${run.error}`);
  }
  const met = results.met === null ? 'not measured' : results.met ? 'met' : 'NOT met';
  lines.push(`  target: verify (2 threads, xxh64) >= ${kVerifyTarget.throughputRatioMin}x nbdcopy to null: -> ${results.throughputRatio?.toFixed(2) ?? '-'}x, ${met}`);
  return lines.join('\n');
}
