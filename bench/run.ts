/**
 * `npm run bench` entry: starts every selected case's servers (children of this process,
 * sockets in a tmp dir, data on /dev/shm), runs every selected fio workload against each
 * case that runs it (workload-major, so cases of one workload run back to back and drift hits
 * them alike), then (once every case has stopped) the on-leg metadata measurements of
 * lib/metadata.ts (a --metadata leg mirror against --metadata none, warm, cold, and a SIGKILL
 * and restart), the TLS measurements of lib/tls.ts (TLS legs and TLS exports against nbdkit
 * over TLS) and the resync measurements of lib/resync.ts with a mirror in this process,
 * prints a table, the copy-avoidance matrix (lib/matrix.ts),
 * the targets, the metadata block, the TLS block and the resync block, and writes bench/results/<ISO date>.json and, when the
 * matrix workloads ran, bench/results/<ISO date>.svg (lib/chart.ts; copied to
 * bench/chart-latest.svg when every leg count was measured).
 * Threads: main thread of the harness process.
 *
 * Invariants:
 * - A case that is unavailable, fails to start, or dies mid-run becomes rows with an error
 *   text; the harness never crashes because of a case.
 * - Every child process and scratch directory is removed on exit, including Ctrl-C.
 * - Performance numbers are compared only within one run (noise between runs is 15-20 %).
 */
import { closeSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import { assert } from '../src/core/assert.js';
import { loadCases, type BenchCase, type CaseContext, type CaseSetup } from './lib/case.js';
import { chartIsComplete, renderChart } from './lib/chart.js';
import { measureLimits, type MachineLimits } from './lib/limits.js';
import { hasTool, machineInfo, sourceInfo } from './lib/machine.js';
import { buildMatrix, copiesBlock, matrixBlock, type MatrixSummary } from './lib/matrix.js';
import { measure, type Measurement } from './lib/measure.js';
import { killAllSync, startProcess, type ManagedProcess } from './lib/proc.js';
import { computeRatios, limitsLine, ratioBlock, resultsTable } from './lib/report.js';
import { resyncBlock, unavailableResync, writePathLine } from './lib/resync-report.js';
import { runResyncBench, type ResyncResults } from './lib/resync.js';
import { enbdUnavailable } from './lib/enbd.js';
import { runMetadataBench, unavailableMetadata, type MetadataResults } from './lib/metadata.js';
import { metadataBlock } from './lib/metadata-report.js';
import { runTlsBench, unavailableTls, type TlsResults } from './lib/tls.js';
import { tlsBlock } from './lib/tls-report.js';
import { runVerifyBench, unavailableVerify, verifyBlock, type VerifyResults } from './lib/verify.js';
import { cbtBlock, runCbtBench, type CbtResults } from './lib/cbt.js';
import { legConnBlock, runLegConnBench, unavailableLegConn, type LegConnResults } from './lib/legconn.js';
import { readPolicyBlock, runReadPolicyBench, unavailableReadPolicy, type ReadPolicyResults } from './lib/readpolicy.js';
import { kResultsSchemaVersion, resultsStem, writeAtomic, writeResults } from './lib/results.js';
import type { RowResult, RunResults } from './lib/results.js';
import { runFio } from './lib/fio.js';
import { kWorkloads, type Workload } from './lib/workloads.js';

// Budget: the full run (~80 fio runs) under 10 minutes, --quick under 2 (README, "Run time").
// One round: cases of one workload run back to back, so their ratios share the drift.
const kDefaultRuntimeSec = 3;
const kCbtBackupGiB = 4;
const kQuickRuntimeSec = 2;
const kDefaultRounds = 1;
const kQuickRounds = 1;
const kRampSec = 1;
/** 256 MiB: ~35 nbdkit memory legs run at once in a full run, each filled by 1 MiB writes. */
const kDefaultSizeMiB = 256;
const kQuickSizeMiB = 256;
const kLimitsDurationMs = 1000;
const kDefaultBaseline = 'nbdkit-memory';
const kMiB = 1024 * 1024;
const kTableErrorChars = 140;
const kDeathNoticeMs = 200;
const kMaxRounds = 20;
const kDefaultResyncSizeMiB = 4096;
const kQuickResyncSizeMiB = 512;
const kDefaultResyncRounds = 2;
const kDefaultVerifySizeMiB = 1024;
const kQuickVerifySizeMiB = 256;
const kResyncDirtyFraction = 0.01;
/**
 * Untimed fio per case and warm-up workload before the first measurement, so a Node server's
 * first measured workload does not pay its JIT warm-up (round 1 ran ~5-10 % slower without).
 */
const kWarmupSec = 0.5;
const kWarmupWorkloads: readonly string[] = ['randwrite-4k-qd32', 'seqwrite-1m-qd8'];
/** The metadata crash measurement: device = this x the export size (its working set). */
const kMetadataCrashDeviceFactor = 4;
const kMetadataCrashLoadMs = 2000;

const distRoot = fileURLToPath(new URL('../', import.meta.url));
const repoRoot = fileURLToPath(new URL('../../', import.meta.url));
const casesDir = fileURLToPath(new URL('./cases/', import.meta.url));

const kHelp = `usage: node dist/bench/run.js [options]

  --quick              ${kQuickRuntimeSec} s per workload, ${kQuickRounds} round, ${kQuickSizeMiB} MiB export, quick cases/workloads,
                       no limits, resync on ${kQuickResyncSizeMiB} MiB
  --rounds N           run each (workload, case) N times, interleaved, report the median
                       (default ${kDefaultRounds}, quick ${kQuickRounds})
  --runtime S          seconds per workload, after a ${kRampSec} s ramp (default ${kDefaultRuntimeSec}, quick ${kQuickRuntimeSec})
  --size-mib N         export size in MiB (default ${kDefaultSizeMiB}, quick ${kQuickSizeMiB})
  --cases a,b          only these cases (default: all but opt-in ones; --quick: the quick ones)
  --workloads x,y      only these workloads
  --all-pairs          run every selected workload on every selected case (default: a case runs
                       the workloads its file names; non-headline ones on the references only)
  --baseline NAME      case the ratio column compares with (default ${kDefaultBaseline})
  --limits / --no-limits  measure memcpy and Unix-socket limits (default: on unless --quick)
  --no-warmup          skip the untimed ${kWarmupSec * 1000} ms warm-up runs (${kWarmupWorkloads.join(', ')}) per case
  --no-resync          skip the resync measurements (default: run them after the workloads)
  --resync-only        only the resync measurements (no cases, no workloads)
  --resync-size-mib N  device size for the resync measurements (default ${kDefaultResyncSizeMiB}, quick ${kQuickResyncSizeMiB})
  --resync-rounds N    rounds of (1 % resync, nbdcopy anchor, full resync) (default ${kDefaultResyncRounds})
  --no-verify          do not byte-compare the legs after each resync (nor in the metadata crash)
  --no-metadata        skip the on-leg metadata measurements (default: run them after the workloads)
  --metadata-only      only the metadata measurements (no cases, no workloads, no resync)
  --no-tls             skip the TLS measurements (default: run them after the metadata part;
                       --quick: the two issue pairs, full: also TLS on both sides and TLS / plain)
  --tls-only           only the TLS measurements (no cases, no workloads, no metadata, no resync)
  --no-verify-phase    skip the online-verify measurements (default: run them after the resync)
  --verify-only        only the verify measurements: enbd verify vs nbdcopy to null:, 1/2/4
                       hash threads, 16 lanes, sha256/blake2b512, two nbdcopy readers at once
                       and the CPU bound (device --verify-size-mib)
  --verify-size-mib N  device size for the verify measurements (default ${kDefaultVerifySizeMiB}, quick ${kQuickVerifySizeMiB})
  --no-cbt             skip the changed-block tracking measurements (default: run them after TLS)
  --cbt-only           only the changed-block tracking measurements: 4K randwrite with 0/1/4
                       checkpoints, backup of 1 % changed of a ${kCbtBackupGiB} GiB device vs nbdcopy
  --no-cbt-writes      changed-block tracking without the randwrite part (the backup only)
  --legconn            also measure several connections per leg (--leg-connections 1, 2, 4 over
                       legs serialising per connection, 1 ms per request; default off)
  --legconn-only       only that (no cases, no workloads, no metadata, no TLS, no resync)
  --readpolicy         also measure read policies and write-behind with a slow leg (one leg
                       behind a 5 ms delay filter vs two fast legs, 4 KiB QD32; default off)
  --readpolicy-only    only that (no cases, no workloads, no metadata, no TLS, no resync)
  --no-save            do not write bench/results/<date>.json and .svg (nor bench/chart-latest.svg)
  --list               list cases and workloads, then exit
  --help               this text
Environment: ENBD_BENCH_MAIN overrides the enbd entry (default <dist>/src/cli/main.js);
ENBD_BENCH_NODE_ARGS adds Node options to every enbd server (e.g. "--cpu-prof --cpu-prof-dir=DIR").`;

interface Options {
  quick: boolean;
  rounds: number;
  runtimeSec: number;
  sizeBytes: number;
  caseNames: string[] | null;
  workloadNames: string[] | null;
  allPairs: boolean;
  warmup: boolean;
  baseline: string;
  limits: boolean;
  save: boolean;
  list: boolean;
  resync: boolean;
  resyncOnly: boolean;
  resyncSizeBytes: number;
  resyncRounds: number;
  verify: boolean;
  metadata: boolean;
  metadataOnly: boolean;
  tls: boolean;
  tlsOnly: boolean;
  verifyPhase: boolean;
  verifyOnly: boolean;
  verifySizeBytes: number;
  cbt: boolean;
  cbtOnly: boolean;
  cbtWrites: boolean;
  legconn: boolean;
  legconnOnly: boolean;
  readpolicy: boolean;
  readpolicyOnly: boolean;
}

function parseOptions(argv: string[]): Options | null {
  const { values } = parseArgs({
    args: argv,
    options: {
      quick: { type: 'boolean', default: false },
      runtime: { type: 'string' },
      rounds: { type: 'string' },
      'size-mib': { type: 'string' },
      cases: { type: 'string' },
      workloads: { type: 'string' },
      'all-pairs': { type: 'boolean', default: false },
      'no-warmup': { type: 'boolean', default: false },
      baseline: { type: 'string', default: kDefaultBaseline },
      limits: { type: 'boolean' },
      'no-limits': { type: 'boolean', default: false },
      'no-save': { type: 'boolean', default: false },
      'no-resync': { type: 'boolean', default: false },
      'resync-only': { type: 'boolean', default: false },
      'resync-size-mib': { type: 'string' },
      'resync-rounds': { type: 'string' },
      'no-verify': { type: 'boolean', default: false },
      'no-metadata': { type: 'boolean', default: false },
      'metadata-only': { type: 'boolean', default: false },
      'no-tls': { type: 'boolean', default: false },
      'tls-only': { type: 'boolean', default: false },
      'no-verify-phase': { type: 'boolean', default: false },
      'verify-only': { type: 'boolean', default: false },
      'verify-size-mib': { type: 'string' },
      'no-cbt': { type: 'boolean', default: false },
      'cbt-only': { type: 'boolean', default: false },
      'no-cbt-writes': { type: 'boolean', default: false },
      legconn: { type: 'boolean', default: false },
      'legconn-only': { type: 'boolean', default: false },
      readpolicy: { type: 'boolean', default: false },
      'readpolicy-only': { type: 'boolean', default: false },
      list: { type: 'boolean', default: false },
      help: { type: 'boolean', default: false },
    },
    strict: true,
  });
  if (values.help) return null;
  const quick = values.quick;
  const runtimeSec = Number(values.runtime ?? (quick ? kQuickRuntimeSec : kDefaultRuntimeSec));
  if (!Number.isInteger(runtimeSec) || runtimeSec < 1) {
    throw new RangeError('--runtime must be an integer >= 1');
  }
  const rounds = Number(values.rounds ?? (quick ? kQuickRounds : kDefaultRounds));
  if (!Number.isInteger(rounds) || rounds < 1 || rounds > kMaxRounds) {
    throw new RangeError(`--rounds must be an integer in 1..${kMaxRounds}`);
  }
  const sizeMiB = Number(values['size-mib'] ?? (quick ? kQuickSizeMiB : kDefaultSizeMiB));
  if (!Number.isInteger(sizeMiB) || sizeMiB < 16) {
    throw new RangeError('--size-mib must be an integer >= 16');
  }
  const resyncSizeMiB = Number(values['resync-size-mib'] ?? (quick ? kQuickResyncSizeMiB : kDefaultResyncSizeMiB));
  if (!Number.isInteger(resyncSizeMiB) || resyncSizeMiB < 16) {
    throw new RangeError('--resync-size-mib must be an integer >= 16');
  }
  const resyncRounds = Number(values['resync-rounds'] ?? kDefaultResyncRounds);
  if (!Number.isInteger(resyncRounds) || resyncRounds < 1 || resyncRounds > kMaxRounds) {
    throw new RangeError(`--resync-rounds must be an integer in 1..${kMaxRounds}`);
  }
  if (values['no-resync'] && values['resync-only']) throw new RangeError('--no-resync and --resync-only exclude each other');
  if (values['no-metadata'] && values['metadata-only']) throw new RangeError('--no-metadata and --metadata-only exclude each other');
  if (values['resync-only'] && values['metadata-only']) throw new RangeError('--resync-only and --metadata-only exclude each other');
  if (values['no-tls'] && values['tls-only']) throw new RangeError('--no-tls and --tls-only exclude each other');
  if (values['tls-only'] && (values['resync-only'] || values['metadata-only'])) {
    throw new RangeError('--tls-only excludes --resync-only and --metadata-only');
  }
  if (values['no-verify-phase'] && values['verify-only']) throw new RangeError('--no-verify-phase and --verify-only exclude each other');
  if (values['verify-only'] && (values['resync-only'] || values['metadata-only'] || values['tls-only'])) {
    throw new RangeError('--verify-only excludes --resync-only, --metadata-only and --tls-only');
  }
  const verifySizeMiB = Number(values['verify-size-mib'] ?? (quick ? kQuickVerifySizeMiB : kDefaultVerifySizeMiB));
  if (!Number.isInteger(verifySizeMiB) || verifySizeMiB < 128) {
    throw new RangeError('--verify-size-mib must be an integer >= 128');
  }
  const verifyOnly = values['verify-only'];
  if (values['no-cbt'] && values['cbt-only']) throw new RangeError('--no-cbt and --cbt-only exclude each other');
  const cbtOnly = values['cbt-only'];
  if (cbtOnly && (values['resync-only'] || values['metadata-only'] || values['tls-only'] || verifyOnly)) throw new RangeError('--cbt-only excludes the other --*-only switches');
  const legconnOnly = values['legconn-only'];
  if (legconnOnly && (values['resync-only'] || values['metadata-only'] || values['tls-only'] || cbtOnly || verifyOnly)) {
    throw new RangeError('--legconn-only excludes the other --*-only switches');
  }
  const readpolicyOnly = values['readpolicy-only'];
  if (readpolicyOnly && (values['resync-only'] || values['metadata-only'] || values['tls-only'] || cbtOnly || verifyOnly || legconnOnly)) {
    throw new RangeError('--readpolicy-only excludes the other --*-only switches');
  }
  const only = values['resync-only'] || values['metadata-only'] || values['tls-only'] || cbtOnly || verifyOnly || legconnOnly || readpolicyOnly;
  const split = (text: string | undefined): string[] | null => {
    if (text === undefined) return null;
    return text.split(',').map((name) => name.trim()).filter((name) => name !== '');
  };
  return {
    quick, rounds, runtimeSec, sizeBytes: sizeMiB * kMiB,
    caseNames: split(values.cases), workloadNames: split(values.workloads),
    allPairs: values['all-pairs'],
    warmup: !values['no-warmup'],
    baseline: values.baseline,
    limits: values['no-limits'] ? false : (values.limits ?? (!quick && !only)),
    save: !values['no-save'],
    list: values.list,
    resync: !values['no-resync'] && !values['metadata-only'] && !values['tls-only'] && !cbtOnly && !verifyOnly && !legconnOnly && !readpolicyOnly,
    resyncOnly: values['resync-only'],
    resyncSizeBytes: resyncSizeMiB * kMiB,
    resyncRounds,
    verify: !values['no-verify'],
    metadata: !values['no-metadata'] && !values['resync-only'] && !values['tls-only'] && !cbtOnly && !verifyOnly && !legconnOnly && !readpolicyOnly,
    metadataOnly: values['metadata-only'],
    tls: !values['no-tls'] && !values['resync-only'] && !values['metadata-only'] && !cbtOnly && !verifyOnly && !legconnOnly && !readpolicyOnly,
    tlsOnly: values['tls-only'],
    cbt: !values['no-cbt'] && !values['resync-only'] && !values['metadata-only'] && !values['tls-only'] && !verifyOnly && !legconnOnly && !readpolicyOnly,
    cbtOnly,
    cbtWrites: !values['no-cbt-writes'],
    verifyPhase: !values['no-verify-phase'] && !values['resync-only'] && !values['metadata-only'] && !values['tls-only'] && !cbtOnly && !legconnOnly && !readpolicyOnly,
    verifyOnly,
    verifySizeBytes: verifySizeMiB * kMiB,
    legconn: values.legconn || legconnOnly,
    legconnOnly,
    readpolicy: values.readpolicy || readpolicyOnly,
    readpolicyOnly,
  };
}

interface Selectable {
  name: string;
  quick: boolean;
  optIn?: boolean;
  /** Earlier names that select this item too. */
  aliases?: readonly string[];
}

function select<T extends Selectable>(all: readonly T[], names: string[] | null, quick: boolean,
  what: string): T[] {
  if (names === null) return all.filter((item) => (!quick || item.quick) && item.optIn !== true);
  const matches = (item: T, name: string): boolean => item.name === name || (item.aliases ?? []).includes(name);
  const unknown = names.filter((name) => !all.some((item) => matches(item, name)));
  if (unknown.length > 0) {
    const known = all.map((item) => item.name).join(', ');
    throw new RangeError(`unknown ${what}: ${unknown.join(', ')} (known: ${known})`);
  }
  return all.filter((item) => names.some((name) => matches(item, name)));
}

function log(message: string): void {
  process.stderr.write(`[bench] ${message}\n`);
}

/** One line for the table: the error's first line, plus the last line of a server log. */
function shortError(error: unknown): string {
  const text = error instanceof Error ? error.message : String(error);
  const lines = text.split('\n').filter((line) => line.trim() !== '');
  const first = lines[0] ?? 'unknown error';
  const last = lines.length > 1 ? ` | ${lines[lines.length - 1]?.trim() ?? ''}` : '';
  const short = `${first}${last}`;
  return short.length > kTableErrorChars ? `${short.slice(0, kTableErrorChars - 3)}...` : short;
}

function fillImage(path: string, sizeBytes: number): void {
  assert(sizeBytes % kMiB === 0);
  const chunk = Buffer.alloc(kMiB);
  for (let index = 0; index < kMiB; index++) chunk[index] = (index * 131 + 7) & 0xff;
  const fd = openSync(path, 'w');
  try {
    for (let offsetBytes = 0; offsetBytes < sizeBytes; offsetBytes += kMiB) {
      writeSync(fd, chunk, 0, kMiB, offsetBytes);
    }
  } finally {
    closeSync(fd);
  }
}

interface CaseState {
  benchCase: BenchCase;
  context: CaseContext;
  processes: ManagedProcess[];
  runDir: string;
  setup: CaseSetup | null;
  /** 'ok', or why the case cannot be measured. */
  status: string;
}

interface OwnedContext {
  context: CaseContext;
  /** Every process spawned through the context, in spawn order. */
  processes: ManagedProcess[];
}

/** A scratch dir, a tmpfs data dir and a spawn that records what it started, under `name`. */
function makeContext(name: string, runRoot: string, dataRoot: string, sizeBytes: number,
  sharedImage: () => string): OwnedContext {
  const runDir = join(runRoot, name);
  const dataDir = join(dataRoot, name);
  mkdirSync(runDir);
  mkdirSync(dataDir);
  const processes: ManagedProcess[] = [];
  const context: CaseContext = {
    runDir, dataDir, sizeBytes, distRoot, repoRoot, sharedImage,
    spawn: async (spec) => {
      const managed = await startProcess({ ...spec, logPath: join(runDir, `${spec.label}.log`) });
      processes.push(managed);
      return managed;
    },
  };
  return { context, processes };
}

function makeCaseState(benchCase: BenchCase, runRoot: string, dataRoot: string, sizeBytes: number,
  sharedImage: () => string): CaseState {
  const { context, processes } = makeContext(benchCase.name, runRoot, dataRoot, sizeBytes, sharedImage);
  return { benchCase, context, processes, runDir: context.runDir, setup: null, status: 'not started' };
}

async function startCase(state: CaseState): Promise<void> {
  const { benchCase, context } = state;
  const missingTools = benchCase.tools.filter((tool) => !hasTool(tool));
  const reason = missingTools.length > 0
    ? `tool(s) missing: ${missingTools.join(', ')}`
    : benchCase.unavailableReason(context);
  if (reason !== null) {
    state.status = `unavailable: ${reason}`;
    log(`${benchCase.name}: ${state.status}`);
    return;
  }
  try {
    state.setup = await benchCase.start(context);
    state.status = 'ok';
    log(`${benchCase.name}: started (${state.setup.uri})`);
  } catch (error) {
    state.status = `failed to start: ${error instanceof Error ? error.message : String(error)}`;
    log(`${benchCase.name}: ${state.status}`);
    await stopCase(state);
  }
}

async function stopCase(state: CaseState): Promise<void> {
  for (const managed of [...state.processes].reverse()) await managed.stop();
  state.processes.length = 0;
}

function deadProcess(state: CaseState): ManagedProcess | undefined {
  // A process the case stopped itself (a leg taken down on purpose) is not a death.
  return state.processes.find((managed) => !managed.running && !managed.stopRequested);
}

interface Attempt {
  error: string | null;
  measurement: Measurement | null;
}

async function runOnce(state: CaseState, workload: Workload, options: Options): Promise<Attempt> {
  if (state.status !== 'ok' || state.setup === null) {
    return { error: state.status, measurement: null };
  }
  const servers = state.processes.filter((managed) => managed.spec.role === 'server');
  const measured = servers.length > 0 ? servers : state.processes;
  const attempt: Attempt = { error: null, measurement: null };
  try {
    log(`${workload.name} on ${state.benchCase.name} ...`);
    attempt.measurement = await measure(workload, {
      uri: state.setup.uri, runtimeSec: options.runtimeSec, rampSec: kRampSec,
      sizeBytes: options.sizeBytes,
      outputPath: join(state.runDir, `${workload.name}.fio.json`),
    }, measured.map((managed) => managed.pid), state.setup.counters);
  } catch (error) {
    attempt.error = error instanceof Error ? error.message : String(error);
    await sleep(kDeathNoticeMs); // let a crashed server's 'exit' event arrive
  }
  const dead = deadProcess(state);
  if (dead !== undefined) {
    state.status = `server died: ${dead.spec.label} ${dead.exitDescription()}\n${dead.logTail()}`;
    attempt.error = attempt.error === null ? state.status : `${state.status}\n${attempt.error}`;
    attempt.measurement = null;
  }
  return attempt;
}

/** Folds the rounds of one (case, workload) into a row: the median-IOPS round, and spread. */
function toRow(state: CaseState, workload: Workload, attempts: readonly Attempt[]): RowResult {
  assert(attempts.length > 0);
  const rounds = attempts.flatMap((attempt) => (attempt.measurement ?? []));
  const failed = attempts.find((attempt) => attempt.error !== null);
  const sorted = [...rounds].sort((left, right) => left.iops - right.iops);
  const median = sorted[Math.floor((sorted.length - 1) / 2)] ?? null;
  const highest = sorted[sorted.length - 1]?.iops ?? 0;
  const lowest = sorted[0]?.iops ?? 0;
  const spreadPercent = median !== null && sorted.length > 1
    ? ((highest - lowest) / median.iops) * 100
    : Number.NaN;
  // A case that failed in any round is reported failed: a half-measured row would mislead.
  return {
    caseName: state.benchCase.name, workload: workload.name, error: failed?.error ?? null,
    measurement: failed === undefined ? median : null, rounds, spreadPercent,
  };
}

/** Whether a case runs a workload: its own choice, unless --all-pairs. */
function runsWorkload(state: CaseState, workload: Workload, options: Options): boolean {
  return options.allPairs || (state.benchCase.runsWorkload?.(workload) ?? true);
}

async function runWorkload(allStates: readonly CaseState[], workload: Workload,
  options: Options): Promise<RowResult[]> {
  const states = allStates.filter((state) => runsWorkload(state, workload, options));
  const attempts = new Map<CaseState, Attempt[]>(states.map((state) => [state, []]));
  for (let round = 0; round < options.rounds; round++) {
    // Alternate the order so no case always runs first (warm caches, thermal drift).
    const order = round % 2 === 0 ? states : [...states].reverse();
    for (const state of order) attempts.get(state)?.push(await runOnce(state, workload, options));
  }
  return states.map((state) => toRow(state, workload, attempts.get(state) ?? []));
}

/** Untimed short fio runs against every started case; failures show up in the timed runs. */
async function warmUp(states: readonly CaseState[], options: Options): Promise<void> {
  const workloads = kWorkloads.filter((workload) => kWarmupWorkloads.includes(workload.name));
  for (const state of states) {
    if (state.status !== 'ok' || state.setup === null) continue;
    log(`warming up ${state.benchCase.name} ...`);
    for (const workload of workloads) {
      try {
        await runFio(workload, {
          uri: state.setup.uri, runtimeSec: kWarmupSec, rampSec: 0, sizeBytes: options.sizeBytes,
          outputPath: join(state.runDir, `warmup-${workload.name}.fio.json`),
        });
      } catch (error) {
        log(`${state.benchCase.name}: warm-up ${workload.name} failed: ${shortError(error)}`);
      }
    }
  }
}

async function runLimits(runRoot: string): Promise<MachineLimits | null> {
  try {
    log('measuring machine limits ...');
    return await measureLimits(runRoot, kLimitsDurationMs);
  } catch (error) {
    log(`machine limits failed: ${shortError(error)}`);
    return null;
  }
}

async function main(): Promise<number> {
  const options = parseOptions(process.argv.slice(2));
  if (options === null) {
    process.stdout.write(`${kHelp}\n`);
    return 0;
  }
  const allCases = await loadCases(casesDir);
  if (options.list) {
    const width = Math.max(...allCases.map((benchCase) => benchCase.name.length),
      ...kWorkloads.map((workload) => workload.name.length));
    for (const benchCase of allCases) {
      const tags = `${benchCase.quick ? ' [quick]' : ''}${benchCase.optIn === true ? ' [opt-in]' : ''}` +
        `${benchCase.aliases === undefined ? '' : ` [also: ${benchCase.aliases.join(', ')}]`}`;
      process.stdout.write(`case      ${benchCase.name.padEnd(width)} ${benchCase.description}${tags}\n`);
    }
    for (const workload of kWorkloads) {
      const tags = `${workload.quick ? ' [quick]' : ''}${workload.headline ? '' : ' [references and shared-mode cases only]'}`;
      process.stdout.write(`workload  ${workload.name.padEnd(width)} ${workload.description}${tags}\n`);
    }
    process.stdout.write(`metadata  ${'metadata'.padEnd(width)} --metadata leg vs none: warm, cold, SIGKILL + restart (--no-metadata, --metadata-only)\n`);
    process.stdout.write(`tls       ${'tls'.padEnd(width)} TLS legs / exports vs nbdkit over TLS, 4K randwrite + 1M write (--no-tls, --tls-only)\n`);
    process.stdout.write(`resync    ${'resync'.padEnd(width)} 1 % scattered and full resync vs nbdcopy (--no-resync, --resync-only)\n`);
    process.stdout.write(`verify    ${'verify'.padEnd(width)} enbd verify of 2 legs vs nbdcopy to null:, 1/2/4 hash threads (--no-verify-phase, --verify-only)\n`);
    return 0;
  }
  const noCases = options.resyncOnly || options.metadataOnly || options.tlsOnly || options.cbtOnly || options.verifyOnly || options.legconnOnly || options.readpolicyOnly;
  const cases = noCases ? [] : select(allCases, options.caseNames, options.quick, 'case');
  const workloads = noCases ? [] : select(kWorkloads, options.workloadNames, options.quick, 'workload');
  if ((workloads.length > 0 || options.metadata || options.tls || options.legconn || options.readpolicy) && !hasTool('fio')) throw new Error('fio is not installed (apt-get install -y fio)');
  const startedAt = new Date().toISOString();
  const machine = machineInfo();
  const runRoot = mkdtempSync(join(tmpdir(), 'enbd-bench-'));
  const dataPrefix = existsSync('/dev/shm') ? '/dev/shm/enbd-bench-' : join(tmpdir(), 'enbd-bench-data-');
  const dataRoot = mkdtempSync(dataPrefix);
  const cleanup = (): void => {
    killAllSync();
    rmSync(runRoot, { recursive: true, force: true });
    rmSync(dataRoot, { recursive: true, force: true });
  };
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.once(signal, () => {
      cleanup();
      process.exit(130);
    });
  }
  try {
    const limits = options.limits ? await runLimits(runRoot) : null;
    let sharedImagePath: string | null = null;
    const sharedImage = (): string => {
      if (sharedImagePath === null) {
        sharedImagePath = join(dataRoot, 'shared-leg.img');
        fillImage(sharedImagePath, options.sizeBytes);
      }
      return sharedImagePath;
    };
    const states = cases.map((benchCase) =>
      makeCaseState(benchCase, runRoot, dataRoot, options.sizeBytes, sharedImage));
    for (const state of states) await startCase(state);
    if (options.warmup && workloads.length > 0) await warmUp(states, options);
    const rows: RowResult[] = [];
    for (const workload of workloads) rows.push(...await runWorkload(states, workload, options));
    for (const state of states) await stopCase(state);
    const metadata = options.metadata ? await runMetadata(options, runRoot, dataRoot, sharedImage) : null;
    const tls = options.tls ? await runTls(options, runRoot, dataRoot, sharedImage) : null;
    const legconn = options.legconn ? await runLegConn(options, runRoot, dataRoot, sharedImage) : null;
    const readpolicy = options.readpolicy ? await runReadPolicy(options, runRoot, dataRoot, sharedImage) : null;
    const resync = options.resync ? await runResync(options, runRoot) : null;
    const cbt = options.cbt ? await runCbt(options, runRoot) : null;
    const verify = options.verifyPhase ? await runVerify(options, runRoot) : null;
    const ratios = computeRatios(cases, workloads, rows, options.baseline);
    const matrix = buildMatrix(rows, ratios);
    printReport(options, machine.cpuCount, limits, rows, ratios, matrix, metadata, tls, resync, verify);
    if (cbt !== null) process.stdout.write(`\n${cbtBlock(cbt)}\n`);
    if (legconn !== null) process.stdout.write(`\n${legConnBlock(legconn)}\n`);
    if (readpolicy !== null) process.stdout.write(`\n${readPolicyBlock(readpolicy)}\n`);
    const source = sourceInfo(repoRoot);
    const chartText = matrix.cells.length === 0 ? null : renderChart(matrix, {
      title: `enbd mirror vs qemu quorum: throughput by leg count (run ${resultsStem(startedAt)})`,
      subtitle: `${machine.cpuCount} CPUs ${machine.cpuModel}, node ${machine.node}; ${options.rounds} round(s) x ` +
        `${options.runtimeSec} s, median round; commit ${source.commit.slice(0, 7)}${source.dirty ? ' (dirty)' : ''}; ` +
        'legs: nbdkit memory on Unix sockets',
    });
    const results: RunResults = {
      schema: kResultsSchemaVersion, startedAt, finishedAt: new Date().toISOString(),
      options: {
        quick: options.quick, rounds: options.rounds, runtimeSec: options.runtimeSec, rampSec: kRampSec,
        sizeBytes: options.sizeBytes,
        resyncSizeBytes: options.resync ? options.resyncSizeBytes : null,
        resyncRounds: options.resync ? options.resyncRounds : null,
        cases: cases.map((benchCase) => benchCase.name),
        workloads: workloads.map((workload) => workload.name),
        allPairs: options.allPairs,
        warmupSec: options.warmup ? kWarmupSec : 0,
        metadataCrashDeviceBytes: options.metadata ? options.sizeBytes * kMetadataCrashDeviceFactor : null,
      },
      machine, source, limits,
      cases: states.map((state) => ({
        name: state.benchCase.name, description: state.benchCase.description, status: state.status,
      })),
      rows, ratios, resync, metadata, tls, verify, legconn, readpolicy, matrix,
      chart: options.save && chartText !== null ? `${resultsStem(startedAt)}.svg` : null,
    };
    if (options.save) {
      const resultsDir = join(repoRoot, 'bench/results');
      const path = writeResults(resultsDir, results);
      process.stdout.write(`\nresults: ${path}\n`);
      if (chartText !== null && results.chart !== null && results.chart !== undefined) {
        const chartPath = join(resultsDir, results.chart);
        writeAtomic(chartPath, chartText);
        process.stdout.write(`chart: ${chartPath}\n`);
        // Only a run that measured every leg count replaces the chart the README shows.
        if (chartIsComplete(matrix)) {
          copyFileSync(chartPath, join(repoRoot, 'bench/chart-latest.svg'));
          process.stdout.write(`chart: copied to ${join(repoRoot, 'bench/chart-latest.svg')}\n`);
        }
      }
    }
    return 0;
  } finally {
    cleanup();
  }
}

async function runMetadata(options: Options, runRoot: string, dataRoot: string,
  sharedImage: () => string): Promise<MetadataResults> {
  const owned = makeContext('metadata', runRoot, dataRoot, options.sizeBytes, sharedImage);
  try {
    if (!hasTool('nbdkit')) throw new Error('tool(s) missing: nbdkit');
    const missing = enbdUnavailable(owned.context);
    if (missing !== null) throw new Error(missing);
    return await runMetadataBench({
      context: owned.context, rounds: options.rounds, runtimeSec: options.runtimeSec, rampSec: kRampSec,
      warmupSec: options.warmup ? kWarmupSec : 0,
      crashDeviceBytes: options.sizeBytes * kMetadataCrashDeviceFactor, crashLoadMs: kMetadataCrashLoadMs,
      verify: options.verify, log,
    });
  } catch (error) {
    log(`metadata: ${shortError(error)}`);
    return unavailableMetadata(options.sizeBytes, error instanceof Error ? error.message : String(error));
  } finally {
    for (const managed of [...owned.processes].reverse()) await managed.stop();
  }
}

async function runTls(options: Options, runRoot: string, dataRoot: string,
  sharedImage: () => string): Promise<TlsResults> {
  const owned = makeContext('tls', runRoot, dataRoot, options.sizeBytes, sharedImage);
  try {
    const missing = ['nbdkit', 'openssl'].filter((tool) => !hasTool(tool));
    if (missing.length > 0) throw new Error(`tool(s) missing: ${missing.join(', ')}`);
    const unbuilt = enbdUnavailable(owned.context);
    if (unbuilt !== null) throw new Error(unbuilt);
    return await runTlsBench({
      context: owned.context, quick: options.quick, rounds: options.rounds, runtimeSec: options.runtimeSec,
      rampSec: kRampSec, warmupSec: options.warmup ? kWarmupSec : 0, log,
    });
  } catch (error) {
    log(`tls: ${shortError(error)}`);
    return unavailableTls(options.sizeBytes, options.quick, error instanceof Error ? error.message : String(error));
  } finally {
    for (const managed of [...owned.processes].reverse()) await managed.stop();
  }
}

async function runCbt(options: Options, runRoot: string): Promise<CbtResults> {
  const missing = ['nbdkit', 'nbdcopy', 'fio'].filter((tool) => !hasTool(tool));
  if (missing.length > 0) return { source: 'issue 17', writePath: [], backup: null, error: `tool(s) missing: ${missing.join(', ')}` };
  return await runCbtBench({
    runDir: runRoot, distRoot, rounds: Math.max(options.rounds, 3),
    runtimeSec: options.runtimeSec, rampSec: kRampSec, sizeBytes: options.sizeBytes, writePath: options.cbtWrites,
    backupDeviceBytes: (options.quick ? 1 : kCbtBackupGiB) * 1024 * kMiB, log,
  });
}

async function runLegConn(options: Options, runRoot: string, dataRoot: string,
  sharedImage: () => string): Promise<LegConnResults> {
  const owned = makeContext('legconn', runRoot, dataRoot, options.sizeBytes, sharedImage);
  try {
    if (!hasTool('nbdkit')) throw new Error('tool(s) missing: nbdkit');
    const unbuilt = enbdUnavailable(owned.context);
    if (unbuilt !== null) throw new Error(unbuilt);
    return await runLegConnBench({ context: owned.context, rounds: options.rounds, runtimeSec: options.runtimeSec, rampSec: kRampSec, log });
  } catch (error) {
    log(`legconn: ${shortError(error)}`);
    return unavailableLegConn(options.sizeBytes, error instanceof Error ? error.message : String(error));
  } finally {
    for (const managed of [...owned.processes].reverse()) await managed.stop();
  }
}

async function runReadPolicy(options: Options, runRoot: string, dataRoot: string,
  sharedImage: () => string): Promise<ReadPolicyResults> {
  const owned = makeContext('readpolicy', runRoot, dataRoot, options.sizeBytes, sharedImage);
  try {
    if (!hasTool('nbdkit')) throw new Error('tool(s) missing: nbdkit');
    const unbuilt = enbdUnavailable(owned.context);
    if (unbuilt !== null) throw new Error(unbuilt);
    return await runReadPolicyBench({ context: owned.context, rounds: options.rounds, runtimeSec: options.runtimeSec, rampSec: kRampSec, log });
  } catch (error) {
    log(`readpolicy: ${shortError(error)}`);
    return unavailableReadPolicy(options.sizeBytes, error instanceof Error ? error.message : String(error));
  } finally {
    for (const managed of [...owned.processes].reverse()) await managed.stop();
  }
}

async function runResync(options: Options, runRoot: string): Promise<ResyncResults> {
  const missing = ['nbdkit', 'nbdcopy'].filter((tool) => !hasTool(tool));
  const runDir = join(runRoot, 'resync');
  mkdirSync(runDir);
  if (missing.length > 0) {
    log(`resync: tool(s) missing: ${missing.join(', ')}`);
    return unavailableResync(options.resyncSizeBytes, kResyncDirtyFraction, `tool(s) missing: ${missing.join(', ')}`);
  }
  return await runResyncBench({
    sizeBytes: options.resyncSizeBytes, dirtyFraction: kResyncDirtyFraction, rounds: options.resyncRounds,
    runDir, verify: options.verify, log,
    ...(process.env['ENBD_BENCH_RESYNC_PROFILE'] ? { profileDir: process.env['ENBD_BENCH_RESYNC_PROFILE'] } : {}),
  });
}

async function runVerify(options: Options, runRoot: string): Promise<VerifyResults> {
  const missing = ['nbdkit', 'nbdcopy'].filter((tool) => !hasTool(tool));
  const runDir = join(runRoot, 'verify');
  mkdirSync(runDir);
  if (missing.length > 0) {
    log(`verify: tool(s) missing: ${missing.join(', ')}`);
    return unavailableVerify(options.verifySizeBytes, `tool(s) missing: ${missing.join(', ')}`);
  }
  return await runVerifyBench({ sizeBytes: options.verifySizeBytes, quick: options.quick, runDir, log });
}

function printReport(options: Options, cpuCount: number, limits: MachineLimits | null,
  rows: readonly RowResult[], ratios: ReturnType<typeof computeRatios>, matrix: MatrixSummary,
  metadata: MetadataResults | null, tls: TlsResults | null, resync: ResyncResults | null,
  verify: VerifyResults | null): void {
  const out = (text: string): void => void process.stdout.write(`${text}\n`);
  out(`\nenbd bench: ${options.runtimeSec} s per workload after ${kRampSec} s ramp,` +
    ` ${options.rounds} round(s),` +
    ` export ${options.sizeBytes / kMiB} MiB, ${cpuCount} CPUs` +
    ' (compare only within one run: noise between runs is 15-20 %)');
  if (options.resyncOnly) out('(--resync-only: no cases, no workloads)');
  if (options.metadataOnly) out('(--metadata-only: no cases, no workloads, no resync)');
  if (options.tlsOnly) out('(--tls-only: no cases, no workloads, no metadata, no resync)');
  if (options.verifyOnly) out('(--verify-only: no cases, no workloads, no metadata, no TLS, no resync)');
  if (options.legconnOnly) out('(--legconn-only: no cases, no workloads, no metadata, no TLS, no resync)');
  if (options.readpolicyOnly) out('(--readpolicy-only: no cases, no workloads, no metadata, no TLS, no resync)');
  if (limits !== null) out(`machine limits: ${limitsLine(limits)}`);
  out('');
  const tableRows = rows.map((row) =>
    (row.error === null ? row : { ...row, error: shortError(row.error) }));
  if (rows.length > 0) out(resultsTable(tableRows, ratios, options.baseline));
  if (matrix.cells.length > 0) out(`\ncopy-avoidance matrix (enbd mirror, legs x mode)\n${matrixBlock(matrix)}`);
  if (ratios.some((ratio) => ratio.minRatio !== null)) {
    out('\ntargets (throughput ratios, paired per round; CPU/GiB: lower is better; every ratio is in the JSON)');
    out(ratioBlock(ratios));
  }
  const copies = copiesBlock(matrix);
  if (copies !== null) out(`\n${copies}`);
  const tracking = writePathLine(ratios);
  if (tracking !== null) out(`\n${tracking}`);
  if (metadata !== null) out(`\n${metadataBlock(metadata)}`);
  if (tls !== null) out(`\n${tlsBlock(tls)}`);
  if (resync !== null) out(`\n${resyncBlock(resync)}`);
  if (verify !== null) out(`\n${verifyBlock(verify)}`);
}

main().then((code) => {
  process.exitCode = code;
}, (error: unknown) => {
  process.stderr.write(`bench: ${error instanceof Error ? error.message : String(error)}\n`);
  killAllSync();
  process.exitCode = 2;
});
