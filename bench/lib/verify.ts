/**
 * Verify measurements (issue 14, "Performance of verify"): how fast `enbd verify` checks two
 * nbdkit memory legs, against `nbdcopy` of one leg to `null:` (the anchor: reading one copy as
 * fast as libnbd can), the CPU it costs per GiB, and how it scales with 1, 2 and 4 hash-pool
 * threads; plus the same verify with sha256 and blake2b512 in the pool (the hash choice) and
 * with 16 lanes instead of the engine's default (the lanes choice); plus two bounds measured in
 * the same run: two nbdcopy readers of both legs at once (the C ceiling for any reader of both
 * copies) and the CPU bound of the default configuration (below).
 * Threads: harness main thread. The mirror runs in this process (MirrorDevice, its connection
 * actors and the piscina hash workers on worker threads); legs are `nbdkit memory` children.
 *
 * Scenario (legs filled once from `nbdkit pattern`: non-zero data, nothing skipped as zero):
 *   anchor   nbdcopy leg0 -> null:, before and after the verifies (the mean is the anchor)
 *   two readers  `nbdcopy leg0 null:` and `nbdcopy leg1 null:` started together, after the
 *            first anchor and before the last: device bytes / wall time of the later one
 *   verify   per configuration (threads, algorithm): open a mirror over both legs, an untimed
 *            warm-up verify of 64 MiB (JIT, pool start), then a timed verify of the device;
 *            CPU = this process's user and system time (every thread: engine, actors, hash
 *            workers) and the legs' nbdkit CPU, per GiB of device verified
 *   CPU bound  cores (os.availableParallelism()) / (default config's enbd system + legs CPU
 *            per GiB): the rate a verifier that spent zero user-space CPU, but the same kernel
 *            and leg work, could not exceed on this machine
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
import { availableParallelism } from 'node:os';
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
  /** VerifyOptions.lanes; null = the engine's default. */
  lanes: number | null;
}

export interface VerifyRun extends VerifyConfig {
  wallMs: number;
  bytesPerSec: number;
  /** This process's CPU (every thread, user + system) per GiB of device verified. */
  enbdCpuSecPerGiB: number;
  /** Its user-space part. */
  enbdUserSecPerGiB: number;
  /** Its kernel part (socket receive of both legs, wake-ups). */
  enbdSysSecPerGiB: number;
  /** The two nbdkit legs' CPU per GiB of device verified. */
  legsCpuSecPerGiB: number;
  mismatchChunks: number;
  /** bytesPerSec / the anchor's. */
  ratio: number | null;
  error: string | null;
}

/** Both legs read at once by two nbdcopy processes (the C ceiling for a reader of both copies). */
export interface TwoReadersResult {
  method: string;
  /** Wall time of the later finisher, per run (before and after the verifies). */
  wallMs: number[];
  /** Device bytes / the mean of wallMs. */
  bytesPerSec: number | null;
  /** Per run: device bytes / wallMs / the anchor's rate. */
  ratios: number[];
  /** bytesPerSec / the anchor's. */
  ratio: number | null;
  /** The two legs' CPU per GiB of device (both copies read), mean over the runs. */
  legsCpuSecPerGiB: number | null;
}

/** What even a verifier with no user-space CPU could not beat, from the default config's run. */
export interface CpuBound {
  cpus: number;
  /** enbd system + legs CPU per GiB of device, default config. */
  secPerGiB: number;
  /** cpus / secPerGiB, as bytes/s. */
  bytesPerSec: number;
  /** bytesPerSec / the anchor's. */
  ratio: number | null;
}

export interface VerifyResults {
  sizeBytes: number;
  legs: string;
  anchor: { wallMs: number[]; bytesPerSec: number | null; cpuSecPerGiB: number | null; method: string };
  twoReaders: TwoReadersResult;
  runs: VerifyRun[];
  cpuBound: CpuBound | null;
  /** The default configuration's ratio (2 threads, xxh64, default lanes). */
  throughputRatio: number | null;
  /** The default configuration's rate / the two readers' (how close to the C ceiling). */
  twoReadersRatio: number | null;
  target: typeof kVerifyTarget;
  met: boolean | null;
  error: string | null;
}

const kDefaultConfig: VerifyConfig = { threads: 2, algorithm: 'xxh64', lanes: null };
const kLanesRow = 16;

export function isDefaultConfig(config: VerifyConfig): boolean {
  return config.threads === kDefaultConfig.threads && config.algorithm === kDefaultConfig.algorithm && config.lanes === kDefaultConfig.lanes;
}

/** Pool scaling with the default hash, the default with 16 lanes, then the other hashes at the default pool size. */
export function verifyConfigs(quick: boolean): VerifyConfig[] {
  const configs: VerifyConfig[] = [1, 2, 4].map((threads) => ({ threads, algorithm: 'xxh64' as const, lanes: null }));
  configs.push({ ...kDefaultConfig, lanes: kLanesRow });
  const others: HashAlgorithm[] = quick ? ['sha256'] : ['sha256', 'blake2b512'];
  for (const algorithm of others) configs.push({ threads: 2, algorithm, lanes: null });
  return configs;
}

function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function mean(values: readonly number[]): number {
  return values.reduce((sum, value) => sum + value, 0) / values.length;
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

  /** nbdcopy leg0 -> null: and leg1 -> null: started together (wall ms of the later, leg CPU seconds). */
  async twoReaders(): Promise<{ wallMs: number; legCpuSec: number }> {
    const cpuBefore = treeCpuSeconds(this.legPids());
    const startedAt = performance.now();
    const runs = await Promise.all(this.legUris.map(async (uri) => {
      const run = await runTool('nbdcopy', [uri, 'null:'], kToolTimeoutMs);
      return { ...run, endMs: performance.now() - startedAt };
    }));
    for (const run of runs) {
      if (run.status !== 0) throw new Error(`two readers: nbdcopy to null: exited ${String(run.status)}: ${run.output}`);
    }
    return { wallMs: Math.max(...runs.map((run) => run.endMs)), legCpuSec: treeCpuSeconds(this.legPids()) - cpuBefore };
  }

  async verify(config: VerifyConfig): Promise<Omit<VerifyRun, 'ratio'>> {
    const mirror = await MirrorDevice.open({
      legs: this.legUris, actorEntry: kConnectionActorEntry, logger: this.logger, logLevel: 'warn',
      verify: {
        threads: config.threads, algorithm: config.algorithm, workerEntry: kHashWorkerEntry,
        ...(config.lanes === null ? {} : { lanes: config.lanes }),
      },
    });
    try {
      assert(mirror.sizeBytes === this.options.sizeBytes, 'mirror has the legs\' size');
      mirror.startVerify({ lengthBytes: Math.min(kWarmupBytes, mirror.sizeBytes) });
      await mirror.verifyDone();
      const cpuBefore = process.cpuUsage();
      const legsBefore = treeCpuSeconds(this.legPids());
      const startedAt = performance.now();
      mirror.startVerify({});
      await mirror.verifyDone();
      const wallMs = performance.now() - startedAt;
      const enbdCpu = process.cpuUsage(cpuBefore);
      const legsCpu = treeCpuSeconds(this.legPids()) - legsBefore;
      const progress = mirror.verifyStatus().current;
      assert(progress !== null, 'a verify ran');
      const gib = this.options.sizeBytes / kGiB;
      const error = progress.bytesChecked !== this.options.sizeBytes
        ? `checked ${progress.bytesChecked} of ${this.options.sizeBytes} bytes`
        : progress.mismatchChunks !== 0 ? `${progress.mismatchChunks} mismatched chunks on equal legs` : null;
      return {
        ...config, wallMs, bytesPerSec: this.options.sizeBytes / (wallMs / 1000),
        enbdCpuSecPerGiB: (enbdCpu.user + enbdCpu.system) / 1e6 / gib,
        enbdUserSecPerGiB: enbdCpu.user / 1e6 / gib, enbdSysSecPerGiB: enbdCpu.system / 1e6 / gib,
        legsCpuSecPerGiB: legsCpu / gib,
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

function twoReadersEmpty(): TwoReadersResult {
  return { method: 'nbdcopy leg0 null: & nbdcopy leg1 null:', wallMs: [], bytesPerSec: null, ratios: [], ratio: null, legsCpuSecPerGiB: null };
}

function failedRun(config: VerifyConfig, error: string): VerifyRun {
  return {
    ...config, wallMs: 0, bytesPerSec: 0, enbdCpuSecPerGiB: 0, enbdUserSecPerGiB: 0, enbdSysSecPerGiB: 0,
    legsCpuSecPerGiB: 0, mismatchChunks: 0, ratio: null, error,
  };
}

/**
 * Fills the derived fields of results from its raw runs: the anchor's and the two readers'
 * rates (device bytes / mean wall time), every ratio, the default config's CPU bound
 * (cpus / (enbd system + legs CPU per GiB)) and the target verdict. Pure (no I/O).
 */
export function summarizeVerify(results: VerifyResults, raw: { anchorLegCpuSec: readonly number[]; twoReadersLegCpuSec: readonly number[]; cpus: number }): void {
  const sizeBytes = results.sizeBytes;
  const gib = sizeBytes / kGiB;
  if (results.anchor.wallMs.length > 0) {
    results.anchor.bytesPerSec = sizeBytes / (mean(results.anchor.wallMs) / 1000);
    results.anchor.cpuSecPerGiB = mean(raw.anchorLegCpuSec) / gib;
  }
  const anchor = results.anchor.bytesPerSec;
  const two = results.twoReaders;
  if (two.wallMs.length > 0) {
    two.bytesPerSec = sizeBytes / (mean(two.wallMs) / 1000);
    two.legsCpuSecPerGiB = mean(raw.twoReadersLegCpuSec) / gib;
    if (anchor !== null) {
      two.ratios = two.wallMs.map((ms) => sizeBytes / (ms / 1000) / anchor);
      two.ratio = two.bytesPerSec / anchor;
    }
  }
  for (const run of results.runs) run.ratio = anchor === null || run.error !== null ? null : run.bytesPerSec / anchor;
  const defaultRun = results.runs.find((run) => isDefaultConfig(run) && run.error === null);
  const secPerGiB = defaultRun === undefined ? 0 : defaultRun.enbdSysSecPerGiB + defaultRun.legsCpuSecPerGiB;
  if (defaultRun !== undefined && secPerGiB > 0) {
    const cpus = raw.cpus;
    const bytesPerSec = cpus / secPerGiB * kGiB;
    results.cpuBound = { cpus, secPerGiB, bytesPerSec, ratio: anchor === null ? null : bytesPerSec / anchor };
  }
  results.throughputRatio = results.runs.find((run) => isDefaultConfig(run))?.ratio ?? null;
  results.twoReadersRatio = defaultRun === undefined || two.bytesPerSec === null ? null : defaultRun.bytesPerSec / two.bytesPerSec;
  results.met = results.throughputRatio === null ? null : results.throughputRatio >= kVerifyTarget.throughputRatioMin;
}

export async function runVerifyBench(options: VerifyBenchOptions): Promise<VerifyResults> {
  assert(options.sizeBytes % (1024 * 1024) === 0, 'verify device size is whole MiB');
  const results: VerifyResults = {
    sizeBytes: options.sizeBytes,
    legs: 'two nbdkit memory legs on Unix sockets (nbdkit pattern data); mirror in the harness process',
    anchor: { wallMs: [], bytesPerSec: null, cpuSecPerGiB: null, method: 'nbdcopy leg0 null:' },
    twoReaders: twoReadersEmpty(),
    runs: [], cpuBound: null, throughputRatio: null, twoReadersRatio: null, target: { ...kVerifyTarget }, met: null, error: null,
  };
  const scenario = new VerifyScenario(options);
  const anchorCpu: number[] = [];
  const twoReadersCpu: number[] = [];
  const twoReaders = async (): Promise<void> => {
    options.log('verify: two readers (nbdcopy of both legs at once) ...');
    const run = await scenario.twoReaders();
    results.twoReaders.wallMs.push(run.wallMs);
    twoReadersCpu.push(run.legCpuSec);
  };
  try {
    options.log(`verify: filling two ${options.sizeBytes / 2 ** 20} MiB legs ...`);
    await scenario.startLegs();
    const first = await scenario.anchor();
    results.anchor.wallMs.push(first.wallMs);
    anchorCpu.push(first.legCpuSec);
    await twoReaders();
    for (const config of verifyConfigs(options.quick)) {
      options.log(`verify: ${config.threads} thread(s), ${config.algorithm}, lanes ${config.lanes ?? 'default'} ...`);
      try {
        results.runs.push({ ...(await scenario.verify(config)), ratio: null });
      } catch (error) {
        results.runs.push(failedRun(config, describe(error)));
      }
    }
    await twoReaders();
    const last = await scenario.anchor();
    results.anchor.wallMs.push(last.wallMs);
    anchorCpu.push(last.legCpuSec);
  } catch (error) {
    results.error = describe(error);
    options.log(`verify failed: ${results.error}`);
  } finally {
    await scenario.stop().catch((error: unknown) => options.log(`verify cleanup: ${describe(error)}`));
  }
  summarizeVerify(results, { anchorLegCpuSec: anchorCpu, twoReadersLegCpuSec: twoReadersCpu, cpus: availableParallelism() });
  return results;
}

export function unavailableVerify(sizeBytes: number, reason: string): VerifyResults {
  return {
    sizeBytes, legs: '', anchor: { wallMs: [], bytesPerSec: null, cpuSecPerGiB: null, method: 'nbdcopy leg0 null:' },
    twoReaders: twoReadersEmpty(), runs: [], cpuBound: null, throughputRatio: null, twoReadersRatio: null, target: { ...kVerifyTarget }, met: null, error: reason,
  };
}

function mib(bytesPerSec: number | null): string {
  return bytesPerSec === null ? '-' : `${(bytesPerSec / 2 ** 20).toFixed(0)} MiB/s`;
}

function times(ratio: number | null): string {
  return ratio === null ? '-' : `${ratio.toFixed(2)}x`;
}

/** The verify block of the report. */
export function verifyBlock(results: VerifyResults): string {
  const lines = [`verify (issue 14): ${results.sizeBytes / 2 ** 20} MiB device, ${results.legs}`];
  if (results.error !== null) lines.push(`  error: ${results.error}`);
  lines.push(`  anchor ${results.anchor.method}: ${mib(results.anchor.bytesPerSec)} (runs ${results.anchor.wallMs.map((ms) => `${ms.toFixed(0)} ms`).join(', ')}), leg CPU ${results.anchor.cpuSecPerGiB?.toFixed(2) ?? '-'} s/GiB`);
  const two = results.twoReaders;
  const twoRuns = two.wallMs.map((ms, index) => `${ms.toFixed(0)} ms ${times(two.ratios[index] ?? null)}`).join(', ');
  lines.push(`  two readers (${two.method}, the C ceiling for a reader of both legs): ${mib(two.bytesPerSec)} ${times(two.ratio)} of the anchor (runs ${twoRuns}), legs CPU ${two.legsCpuSecPerGiB?.toFixed(2) ?? '-'} s/GiB`);
  lines.push('  threads  hash        lanes    verify      / anchor  enbd CPU s/GiB (user  sys)  legs CPU s/GiB');
  for (const run of results.runs) {
    const cpu = `${run.enbdCpuSecPerGiB.toFixed(2).padStart(14)} (${run.enbdUserSecPerGiB.toFixed(2)} ${run.enbdSysSecPerGiB.toFixed(2)})`;
    const row = `  ${String(run.threads).padStart(7)}  ${run.algorithm.padEnd(10)}  ${String(run.lanes ?? 'default').padStart(7)}  ${mib(run.bytesPerSec).padStart(10)}  ${times(run.ratio).padStart(8)}  ${cpu.padEnd(27)}  ${run.legsCpuSecPerGiB.toFixed(2).padStart(14)}`;
    lines.push(run.error === null ? row : `${row}  error: ${run.error}`);
  }
  const bound = results.cpuBound;
  if (bound !== null) {
    lines.push(`  CPU bound (default config): ${bound.cpus} CPUs / (enbd sys + legs ${bound.secPerGiB.toFixed(2)} s/GiB) = ${mib(bound.bytesPerSec)}, ${times(bound.ratio)} of the anchor (no verifier with zero user CPU beats this here)`);
  }
  const met = results.met === null ? 'not measured' : results.met ? 'met' : 'NOT met';
  lines.push(`  target: verify (2 threads, xxh64, default lanes) >= ${kVerifyTarget.throughputRatioMin}x nbdcopy to null: -> ${results.throughputRatio?.toFixed(2) ?? '-'}x, ${met}; ${times(results.twoReadersRatio)} of the two readers`);
  return lines.join('\n');
}
