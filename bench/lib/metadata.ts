/**
 * What on-leg metadata costs (issue 11: "Performance"), measured side by side in one run: a
 * 2-leg `enbd mirror` assembled from on-leg metadata (`enbd create --assume-clean` on its legs,
 * then `--metadata leg`, the default) against the same mirror with `--metadata none`, and what
 * a restart after a SIGKILL under load resyncs.
 * Threads: harness main thread. Servers are child processes started through the CaseContext
 * (lib/case.ts: the harness owns their PIDs, logs and shutdown); legs come from lib/legs.ts, like
 * every mirror case's.
 *
 * Scenario (the pair: "metadata" = enbd-mirror2-meta, "none" = enbd-mirror2-nometa; same legs,
 * flags and log level apart from the metadata):
 *   start     2 nbdkit memory legs each; `enbd create --assume-clean --bitmap-chunk C` on the
 *             metadata mirror's legs, C = the default chunk of a device the region's size
 *             (256 KiB for 256 MiB); its legs hold twice the region (sparse, never written
 *             beyond it except by the cold step's warm-up); fio works on [0, region) of both
 *   warm-up   untimed fio per mirror (JIT), as the harness does for its cases
 *   warm      for 1 MiB sequential writes QD8, then 4 KiB random writes QD32, per round (order
 *             alternating): write the whole region once (1 MiB, one pass), then measure at
 *             once. Every bitmap chunk is dirty when fio starts, and the workload rewrites each
 *             chunk well within the keeper's 5 s heartbeat, so no bit is cleared mid-run (the
 *             keeper clears bits of chunks not written for a whole heartbeat period). Target
 *             metadata / none >= 0.9 for both.
 *   cold      per round: stop the metadata mirror (clean stop), `enbd create --force
 *             --assume-clean --bitmap-chunk 4K` (a fresh array, every bit clear), start it
 *             again, warm it up (JIT) with writes to [region, 2 x region) only; then 4 KiB
 *             random writes QD32 over the region with fio's random map, one pass cut short at
 *             the runtime, no ramp: no block is written twice, so every write is the first one
 *             to its 4 KiB chunk and waits for its bit to be durable on both legs. The none
 *             mirror runs the same fio job. Reported as a ratio, no target.
 *   crash     a third pair of legs, a device of `crashDeviceBytes` (default chunk), 4 KiB random
 *             writes QD32 over its first `workingSetBytes` (the rest never written); after
 *             `crashLoadMs` the mirror is SIGKILLed mid-load; the legs' working sets are compared
 *             (they may differ: writes in flight reached one leg only); the mirror is started again on
 *             the same legs (unclean stop -> bitmap resync of the marked chunks); the time to
 *             every leg in sync, the bytes resynced (the "resync complete" log records'
 *             bytesDone), and after a clean stop the legs' data areas byte for byte.
 * Around every measured run of the metadata mirror the harness reads its keeper's counters
 * (mirror.metadataStatus() through the control socket's repl.eval): writes that waited for a
 * bitmap write, bitmap and superblock writes. Warm runs must show 0 waits; cold ones >= 1 per
 * write (the keeper resumes every waiter after each bitmap write; one whose bit was not in that
 * write parks, and counts, again).
 *
 * Invariants:
 * - A step that fails becomes a row with an error (or `crash.error`); the phase never throws.
 * - Ratios pair round r of both mirrors (run back to back), like the case rows (lib/report.ts).
 * - The legs are compared straight from nbdkit, never through the mirror; a compare that did
 *   not finish is reported as such, never as "equal".
 * - The caller stops every process this phase started (they are in its CaseContext); the phase
 *   stops the ones it restarts itself.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { assert } from '../../src/core/assert.js';
import { ControlClient } from '../../src/control/client.js';
import type { StatusResult } from '../../src/control/protocol.js';
import { computeLayout, defaultBitmapChunkBytes, kBitmapChunkBytesMin } from '../../src/meta/layout.js';
import { unixUri, type CaseContext } from './case.js';
import { readControlCounters, readControlStatus } from './counters.js';
import { enbdArgs } from './enbd.js';
import { runFio, type FioOptions } from './fio.js';
import { startMemoryLegs, type StartedLegs } from './legs.js';
import { measure, type Measurement } from './measure.js';
import { runTool, type ManagedProcess } from './proc.js';
import { pairedRatio } from './report.js';
import type { RatioResult, RowResult } from './results.js';
import { compareLegs, type LegComparison } from './resync.js';
import { kWorkloads, type Workload } from './workloads.js';
import { describeError } from './numbers.js';

const kMiB = 1024 * 1024;
export const kMetaCase = 'enbd-mirror2-meta';
export const kNoMetaCase = 'enbd-mirror2-nometa';
const kSource = 'issue 11: on-leg metadata (metadata leg / none)';
/** Chunk of the cold case: the smallest, so every 4 KiB write is a chunk of its own. */
const kColdChunkBytes = kBitmapChunkBytesMin;
const kWarmTargetMin = 0.9;
const kToolTimeoutMs = 60_000;
/** The one-pass pre-write (and its 1 MiB writes) is cut short after this. */
const kPrewriteCapSec = 120;
const kPollMs = 20;
const kControlReadyMs = 10_000;
const kControlTimeoutMs = 3_000;
const kInSyncTimeoutMs = 300_000;
const kCompareDeadlineMs = 120_000;
/** fio of the crash load runs "forever"; the SIGKILL of the mirror ends it. */
const kCrashFioRuntimeSec = 600;
const kCrashFioExitMs = 30_000;
const kLogTailChars = 2_000;

function workload(name: string): Workload {
  const found = kWorkloads.find((entry) => entry.name === name);
  assert(found !== undefined, `workload ${name}`);
  return found;
}

/** The harness's own headline write workloads (lib/workloads.ts), so the fio jobs are the same. */
const kRandWrite = workload('randwrite-4k-qd32');
const kSeqWrite = workload('seqwrite-1m-qd8');

/** One measured line of the phase (a row per mirror in the results). */
interface Step {
  /** Row workload name: the fio workload plus -warm or -cold. */
  name: string;
  workload: Workload;
  description: string;
  minRatio: number | null;
}

export const kMetadataSteps: readonly Step[] = [
  {
    name: 'seqwrite-1m-qd8-warm', workload: kSeqWrite, minRatio: kWarmTargetMin,
    description: '1 MiB sequential writes QD8, region written once just before (every chunk dirty)',
  },
  {
    name: 'randwrite-4k-qd32-warm', workload: kRandWrite, minRatio: kWarmTargetMin,
    description: '4 KiB random writes QD32, region written once just before (every chunk dirty)',
  },
  {
    name: 'randwrite-4k-qd32-cold', workload: kRandWrite, minRatio: null,
    description: '4 KiB random writes QD32, fresh array with 4 KiB chunks, no block twice: every write dirties a clean chunk',
  },
];

export interface MetadataBenchOptions {
  /** Spawns through the harness; sizeBytes = the export size fio writes (the region). */
  context: CaseContext;
  rounds: number;
  runtimeSec: number;
  rampSec: number;
  /** Untimed fio seconds per mirror and workload before the first measurement (0: none). */
  warmupSec: number;
  /** Device size of the crash measurement (its working set is context.sizeBytes). */
  crashDeviceBytes: number;
  /** How long the 4 KiB random-write load runs before the SIGKILL. */
  crashLoadMs: number;
  verify: boolean;
  log(message: string): void;
}

/**
 * The metadata mirror's keeper counters over one measured run (mirror.metadataStatus(), read
 * through the control socket's repl.eval before and after): what the writes waited for.
 */
export interface KeeperDelta {
  step: string;
  round: number;
  /** WRITEs of the run (the engine's counter), for "waits per write". */
  writeRequests: number | null;
  /** Data-changing requests that waited for a bitmap write. */
  intentWaits: number;
  bitmapWrites: number;
  superblockWrites: number;
  /** Chunks marked dirty when the run ended, of chunkCount. */
  dirtyChunks: number;
  chunkCount: number;
}

interface KeeperSnapshot {
  intentWaits: number;
  bitmapWrites: number;
  superblockWrites: number;
  dirtyChunks: number;
  chunkCount: number;
}

export interface CrashResult {
  /** Export (data area) size of the crashed array, and its bitmap chunk. */
  deviceBytes: number;
  chunkBytes: number;
  /** The load wrote 4 KiB blocks at random within [0, workingSetBytes). */
  workingSetBytes: number;
  loadMs: number;
  /** The working sets of the legs compared after the kill, before the restart (differing blocks: writes in flight). */
  afterKill: LegComparison | null;
  /** Dirty bytes leg by leg at the restart's assembly ('leg assembled' log records). */
  assembledDirtyBytes: number[];
  /** How each leg was assembled ('in-sync' / 'bitmap-resync' ... and why), from the log. */
  assembledRoles: string[];
  /** Sum of the restart's 'resync complete' bytesDone (null: no such record). */
  resyncedBytes: number | null;
  /** Spawn of the restarted mirror to every leg in sync. */
  inSyncMs: number | null;
  /** Legs' data areas after the resync and a clean stop. */
  afterResync: LegComparison | null;
  error: string | null;
}

export interface MetadataResults {
  sizeBytes: number;
  legs: string;
  /** Bitmap chunk of the metadata mirror in the warm steps (the default for its legs). */
  warmChunkBytes: number;
  coldChunkBytes: number;
  /** Rows of both mirrors (caseName kMetaCase / kNoMetaCase; workload = step name). */
  rows: RowResult[];
  /** kMetaCase / kNoMetaCase per step (minRatio: the target, null for cold). */
  ratios: RatioResult[];
  /** The metadata mirror's keeper over each measured run (absent when it could not be read). */
  keeper: KeeperDelta[];
  steps: Array<{ name: string; description: string }>;
  /** Where the targets come from. */
  source: string;
  crash: CrashResult | null;
  error: string | null;
}


/** The smallest leg size whose data area, at the leg's default chunk, holds `dataBytes`. */
export function legBytesFor(dataBytes: number, chunkBytes?: number): number {
  let legBytes = dataBytes;
  for (;;) {
    const chunk = chunkBytes ?? defaultBitmapChunkBytes(legBytes);
    const layout = computeLayout(legBytes, chunk);
    if (layout.dataSizeBytes >= dataBytes) return legBytes;
    legBytes += chunk;
  }
}

/** One mirror of the pair (or the crash mirror): its legs, its current server, how to restart it. */
class Mirror {
  server: ManagedProcess | null = null;
  private starts = 0;
  readonly socketPath: string;

  constructor(private readonly context: CaseContext, readonly label: string, readonly legs: StartedLegs,
    private readonly flags: readonly string[]) {
    this.socketPath = join(context.runDir, `${label}.sock`);
  }

  get uri(): string {
    return unixUri(this.socketPath);
  }

  get controlPath(): string {
    return `${this.socketPath}.ctl`;
  }

  /** The log of the current (latest) server process. */
  get logPath(): string {
    return join(this.context.runDir, `${this.label}-${this.starts}.log`);
  }

  async start(): Promise<ManagedProcess> {
    assert(this.server === null || !this.server.running, `${this.label}: already running`);
    this.starts += 1;
    this.server = await this.context.spawn({
      label: `${this.label}-${this.starts}`,
      command: process.execPath,
      args: enbdArgs(this.context, [
        'mirror', ...this.legs.uris.flatMap((uri) => ['--leg', uri]), '--socket', this.socketPath, ...this.flags,
      ]),
      socketPath: this.socketPath,
      role: 'server',
      env: { ...process.env, ENBD_LOG_JSON: '1' },
    });
    return this.server;
  }

  async stop(signal: 'SIGTERM' | 'SIGKILL' = 'SIGTERM'): Promise<void> {
    await this.server?.stop(signal);
  }

  running(): ManagedProcess {
    const server = this.server;
    if (server === null || !server.running) {
      throw new Error(`${this.label} is not running: ${server?.exitDescription() ?? 'never started'}\n${server?.logTail() ?? ''}`);
    }
    return server;
  }

  logText(): string {
    try {
      return readFileSync(this.logPath, 'utf8');
    } catch {
      return '';
    }
  }
}

/** `enbd create` on the legs; throws with its output unless it exited 0. */
async function createArray(context: CaseContext, legs: StartedLegs, extra: readonly string[]): Promise<void> {
  const run = await runTool(process.execPath, enbdArgs(context, [
    'create', ...legs.uris.flatMap((uri) => ['--leg', uri]), '--assume-clean', ...extra,
  ]), kToolTimeoutMs);
  if (run.status !== 0) throw new Error(`enbd create exited ${String(run.status)}: ${run.output}`);
}

const kKeeperFields = ['intentWaits', 'bitmapWrites', 'superblockWrites', 'dirtyChunks', 'chunkCount'] as const;
const kKeeperCode = `JSON.stringify(mirror.metadataStatus())`;

/** The keeper's counters via the control socket's repl.eval; null when not available. */
async function readKeeper(controlPath: string): Promise<KeeperSnapshot | null> {
  let client: ControlClient | null = null;
  try {
    client = await ControlClient.connect(controlPath, kControlTimeoutMs);
    const answer = await client.call('repl.eval', { code: kKeeperCode }, kControlTimeoutMs);
    // The output is util.inspect of the JSON string: quoted, double quotes untouched.
    const json = /\{.*\}/s.exec(answer.output);
    if (answer.threw || json === null) return null;
    const parsed = JSON.parse(json[0]) as Record<string, unknown>;
    const snapshot: Record<string, number> = {};
    for (const field of kKeeperFields) {
      const value = parsed[field];
      if (typeof value !== 'number') return null;
      snapshot[field] = value;
    }
    return snapshot as unknown as KeeperSnapshot;
  } catch {
    return null;
  } finally {
    client?.close();
  }
}

/** The first answer of the mirror's control socket (it listens shortly after the export). */
async function waitForStatus(mirror: Mirror): Promise<StatusResult> {
  const deadline = Date.now() + kControlReadyMs;
  for (;;) {
    const view = await readControlStatus(mirror.controlPath);
    if (view !== null) return view;
    mirror.running();
    if (Date.now() > deadline) throw new Error(`${mirror.label}: control socket did not answer within ${kControlReadyMs} ms`);
    await sleep(kPollMs);
  }
}

/** Log records (pino JSON lines) whose msg is `message`. */
function logRecords(text: string, message: string): Array<Record<string, unknown>> {
  const records: Array<Record<string, unknown>> = [];
  for (const line of text.split('\n')) {
    if (!line.startsWith('{')) continue;
    try {
      const record = JSON.parse(line) as Record<string, unknown>;
      if (record['msg'] === message) records.push(record);
    } catch {
      // a banner line or a torn last line
    }
  }
  return records;
}

function numberField(record: Record<string, unknown>, key: string): number | null {
  const value = record[key];
  return typeof value === 'number' && Number.isFinite(value) ? value : null;
}

/** Folds the rounds of one mirror and step into a row, like the harness does for a case. */
function toRow(caseName: string, step: Step, rounds: readonly Measurement[], error: string | null): RowResult {
  const sorted = [...rounds].sort((left, right) => left.iops - right.iops);
  const middle = sorted[Math.floor((sorted.length - 1) / 2)] ?? null;
  const highest = sorted[sorted.length - 1]?.iops ?? 0;
  const lowest = sorted[0]?.iops ?? 0;
  return {
    caseName, workload: step.name, error,
    measurement: error === null ? middle : null,
    rounds: [...rounds],
    spreadPercent: middle !== null && sorted.length > 1 ? ((highest - lowest) / middle.iops) * 100 : Number.NaN,
  };
}

class MetadataScenario {
  private readonly options: MetadataBenchOptions;
  private readonly context: CaseContext;
  private meta: Mirror | null = null;
  private none: Mirror | null = null;
  warmChunkBytes = 0;
  private metaLegs: StartedLegs | null = null;
  readonly keeper: KeeperDelta[] = [];

  constructor(options: MetadataBenchOptions) {
    this.options = options;
    this.context = options.context;
  }

  private fioOptions(label: string, overrides: Partial<FioOptions> = {}): FioOptions {
    return {
      uri: '', runtimeSec: this.options.runtimeSec, rampSec: this.options.rampSec,
      sizeBytes: this.context.sizeBytes, outputPath: join(this.context.runDir, `${label}.fio.json`), ...overrides,
    };
  }

  async startPair(): Promise<void> {
    const sizeBytes = this.context.sizeBytes;
    // The chunk a device of the region's size gets by default; the legs hold twice the region
    // (at both chunks), so a restarted mirror can be warmed up (JIT) beyond it.
    this.warmChunkBytes = defaultBitmapChunkBytes(legBytesFor(sizeBytes));
    const metaLegBytes = legBytesFor(2 * sizeBytes, this.warmChunkBytes);
    assert(computeLayout(metaLegBytes, kColdChunkBytes).dataSizeBytes >= 2 * sizeBytes, 'cold array holds two regions');
    this.metaLegs = await startMemoryLegs({ ...this.context, sizeBytes: metaLegBytes }, kMetaCase, 2);
    await createArray(this.context, this.metaLegs, ['--bitmap-chunk', String(this.warmChunkBytes)]);
    this.meta = new Mirror(this.context, kMetaCase, this.metaLegs, ['--metadata', 'leg', '--log-level', 'warn']);
    await this.meta.start();
    const noneLegs = await startMemoryLegs(this.context, kNoMetaCase, 2);
    this.none = new Mirror(this.context, kNoMetaCase, noneLegs, ['--metadata', 'none', '--log-level', 'warn']);
    await this.none.start();
  }

  private pair(): [Mirror, Mirror] {
    assert(this.meta !== null && this.none !== null, 'pair started');
    return [this.meta, this.none];
  }

  async warmUp(): Promise<void> {
    if (this.options.warmupSec <= 0) return;
    for (const mirror of this.pair()) {
      for (const workload of [kRandWrite, kSeqWrite]) {
        await runFio(workload, this.fioOptions(`${mirror.label}-warmup-${workload.name}`, {
          uri: mirror.uri, runtimeSec: this.options.warmupSec, rampSec: 0,
        }));
      }
    }
  }

  /** Writes the whole region once in 1 MiB writes: every chunk of it dirty. */
  private async prewrite(mirror: Mirror): Promise<void> {
    await runFio(kSeqWrite, this.fioOptions(`${mirror.label}-prewrite`, {
      uri: mirror.uri, runtimeSec: kPrewriteCapSec, rampSec: 0, timeBased: false,
    }));
  }

  /**
   * A fresh array with 4 KiB chunks on the metadata legs, its mirror started on it and warmed
   * up (JIT) by writes beyond the region, so the region's chunks stay clean.
   */
  private async freshColdArray(): Promise<void> {
    const [meta] = this.pair();
    assert(this.metaLegs !== null);
    await meta.stop();
    await createArray(this.context, this.metaLegs, ['--force', '--bitmap-chunk', String(kColdChunkBytes)]);
    await meta.start();
    if (this.options.warmupSec > 0) {
      await runFio(kRandWrite, this.fioOptions(`${meta.label}-cold-warmup`, {
        uri: meta.uri, runtimeSec: this.options.warmupSec, rampSec: 0, offsetBytes: this.context.sizeBytes,
      }));
    }
  }

  private async measureOne(mirror: Mirror, step: Step, round: number): Promise<Measurement> {
    const cold = step.name.endsWith('-cold');
    if (cold && mirror === this.meta) await this.freshColdArray();
    if (!cold) await this.prewrite(mirror);
    const server = mirror.running();
    this.options.log(`metadata: ${step.name} on ${mirror.label} (round ${round + 1}) ...`);
    const before = mirror === this.meta ? await readKeeper(mirror.controlPath) : null;
    const measurement = await measure(step.workload, this.fioOptions(`${mirror.label}-${step.name}-${round}`, {
      uri: mirror.uri,
      ...(cold ? { rampSec: 0, randomMap: true, timeBased: false } : {}),
    }), [server.pid], () => readControlCounters(mirror.controlPath));
    const after = before === null ? null : await readKeeper(mirror.controlPath);
    if (before !== null && after !== null) {
      this.keeper.push({
        step: step.name, round, writeRequests: measurement.counters?.writeRequests ?? null,
        intentWaits: after.intentWaits - before.intentWaits,
        bitmapWrites: after.bitmapWrites - before.bitmapWrites,
        superblockWrites: after.superblockWrites - before.superblockWrites,
        dirtyChunks: after.dirtyChunks, chunkCount: after.chunkCount,
      });
    }
    return measurement;
  }

  /** Rounds of one step on both mirrors (order alternating), as two rows. */
  async step(step: Step): Promise<[RowResult, RowResult]> {
    const [meta, none] = this.pair();
    const measured = new Map<Mirror, Measurement[]>([[meta, []], [none, []]]);
    let error: string | null = null;
    for (let round = 0; round < this.options.rounds && error === null; round += 1) {
      const order = round % 2 === 0 ? [meta, none] : [none, meta];
      for (const mirror of order) {
        try {
          measured.get(mirror)?.push(await this.measureOne(mirror, step, round));
        } catch (caught) {
          error = `${mirror.label}: ${describeError(caught)}`;
          this.options.log(`metadata: ${step.name} failed: ${error}`);
          break;
        }
      }
    }
    return [
      toRow(kMetaCase, step, measured.get(meta) ?? [], error),
      toRow(kNoMetaCase, step, measured.get(none) ?? [], error),
    ];
  }

  async stopPair(): Promise<void> {
    for (const mirror of [this.meta, this.none]) {
      if (mirror === null) continue;
      await mirror.stop();
      for (const leg of mirror.legs.processes) await leg.stop();
    }
  }

  async crash(): Promise<CrashResult> {
    const { options, context } = this;
    const workingSetBytes = context.sizeBytes;
    const result: CrashResult = {
      deviceBytes: 0, chunkBytes: 0, workingSetBytes, loadMs: options.crashLoadMs, afterKill: null,
      assembledDirtyBytes: [], assembledRoles: [], resyncedBytes: null, inSyncMs: null, afterResync: null, error: null,
    };
    let mirror: Mirror | null = null;
    try {
      const legBytes = legBytesFor(options.crashDeviceBytes);
      result.chunkBytes = defaultBitmapChunkBytes(legBytes);
      const legs = await startMemoryLegs({ ...context, sizeBytes: legBytes }, 'enbd-crash', 2);
      await createArray(context, legs, ['--bitmap-chunk', String(result.chunkBytes)]);
      mirror = new Mirror(context, 'enbd-crash', legs, ['--metadata', 'leg', '--log-level', 'info']);
      await mirror.start();
      result.deviceBytes = (await waitForStatus(mirror)).export.sizeBytes;
      options.log(`metadata: crash: 4 KiB random writes over ${workingSetBytes / kMiB} MiB of ${result.deviceBytes / kMiB} MiB, SIGKILL after ${options.crashLoadMs} ms ...`);
      // The load runs until the mirror dies under it (fio then exits with an I/O error).
      const load = runFio(kRandWrite, this.fioOptions('enbd-crash-load', {
        uri: mirror.uri, runtimeSec: kCrashFioRuntimeSec, rampSec: 0, sizeBytes: workingSetBytes,
      })).then(() => 'fio finished before the kill', (error: unknown) => describeError(error));
      await sleep(options.crashLoadMs);
      mirror.running();
      await mirror.stop('SIGKILL');
      const fioOutcome = await Promise.race([load, sleep(kCrashFioExitMs).then(() => null)]);
      if (fioOutcome === null) throw new Error(`fio still running ${kCrashFioExitMs} ms after the mirror was killed`);
      if (fioOutcome === 'fio finished before the kill') throw new Error(fioOutcome);
      const [leg0, leg1] = legs.uris;
      assert(leg0 !== undefined && leg1 !== undefined);
      // Only the working set can differ now (the rest was never written): compare just that.
      if (options.verify) result.afterKill = await compareLegs([leg0, leg1], workingSetBytes, kCompareDeadlineMs);
      options.log('metadata: crash: restarting the mirror on the same legs ...');
      const startedAt = performance.now();
      await mirror.start();
      const deadline = Date.now() + kInSyncTimeoutMs;
      for (;;) {
        const view = await readControlStatus(mirror.controlPath);
        if (view !== null && view.legs.length === 2 && view.legs.every((leg) => leg.state === 'in-sync')) break;
        mirror.running();
        if (Date.now() > deadline) throw new Error(`legs not in sync ${kInSyncTimeoutMs} ms after the restart`);
        await sleep(kPollMs);
      }
      result.inSyncMs = performance.now() - startedAt;
      const log = mirror.logText();
      for (const record of logRecords(log, 'leg assembled')) {
        result.assembledDirtyBytes.push(numberField(record, 'dirtyBytes') ?? Number.NaN);
        result.assembledRoles.push(`${String(record['role'])} (${String(record['why'])})`);
      }
      const completions = logRecords(log, 'resync complete').map((record) => numberField(record, 'bytesDone') ?? 0);
      result.resyncedBytes = completions.length === 0 ? null : completions.reduce((sum, value) => sum + value, 0);
      if (result.resyncedBytes === null && result.assembledRoles.every((role) => role.startsWith('in-sync'))) {
        result.resyncedBytes = 0; // nothing to resync: no resync ran, so no record
      }
      await mirror.stop();
      if (options.verify) result.afterResync = await compareLegs([leg0, leg1], result.deviceBytes, kCompareDeadlineMs);
      for (const leg of legs.processes) await leg.stop();
    } catch (error) {
      result.error = describeError(error);
      const tail = mirror?.logText().slice(-kLogTailChars).trim() ?? '';
      if (tail !== '') result.error += `\n${tail}`;
      options.log(`metadata: crash failed: ${result.error}`);
    }
    return result;
  }
}

export async function runMetadataBench(options: MetadataBenchOptions): Promise<MetadataResults> {
  assert(Number.isInteger(options.rounds) && options.rounds >= 1);
  assert(options.crashDeviceBytes >= options.context.sizeBytes, 'crash device holds the working set');
  const scenario = new MetadataScenario(options);
  const results: MetadataResults = {
    sizeBytes: options.context.sizeBytes,
    legs: 'two nbdkit memory legs per mirror on Unix sockets; enbd mirror as a child process',
    warmChunkBytes: 0, coldChunkBytes: kColdChunkBytes,
    rows: [], ratios: [], keeper: [],
    steps: kMetadataSteps.map((step) => ({ name: step.name, description: step.description })),
    source: kSource, crash: null, error: null,
  };
  try {
    options.log('metadata: starting the pair (enbd create --assume-clean; --metadata leg vs none) ...');
    await scenario.startPair();
    results.warmChunkBytes = scenario.warmChunkBytes;
    await scenario.warmUp();
    for (const step of kMetadataSteps) {
      const [mine, theirs] = await scenario.step(step);
      results.rows.push(mine, theirs);
      const throughputRatio = pairedRatio(mine, theirs, (measurement) => measurement.iops);
      results.ratios.push({
        caseName: kMetaCase, versus: kNoMetaCase, workload: step.name, throughputRatio,
        cpuPerGiBRatio: pairedRatio(mine, theirs, (measurement) => measurement.serverCpuSecPerGiB),
        minRatio: step.minRatio,
        met: step.minRatio === null || throughputRatio === null ? null : throughputRatio >= step.minRatio,
      });
    }
  } catch (error) {
    results.error = describeError(error);
    options.log(`metadata failed: ${results.error}`);
  }
  results.keeper = scenario.keeper;
  await scenario.stopPair().catch((error: unknown) => options.log(`metadata cleanup: ${describeError(error)}`));
  results.crash = await scenario.crash();
  return results;
}

/** The results of a phase that could not run at all (a tool or the build missing). */
export function unavailableMetadata(sizeBytes: number, reason: string): MetadataResults {
  return {
    sizeBytes, legs: 'not run', warmChunkBytes: 0, coldChunkBytes: kColdChunkBytes, rows: [], ratios: [], keeper: [],
    steps: kMetadataSteps.map((step) => ({ name: step.name, description: step.description })),
    source: kSource, crash: null, error: reason,
  };
}
