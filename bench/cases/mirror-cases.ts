/**
 * Mirror cases over `nbdkit memory` legs on Unix sockets (lib/legs.ts): one factory, a list of
 * named cases (this file's default export).
 *
 * The copy-avoidance matrix (issue: bench harness for copy-avoidance experiments):
 * `enbd-mirror<N>-<mode>` for N = 1, 2, 3 legs and
 *
 * | mode    | flags                   | WRITE payload path                                       |
 * |---------|-------------------------|----------------------------------------------------------|
 * | per-leg | --copy-mode per-leg     | socket chunk -> ring slot, then one copy per leg (N + 1)   |
 * | shared  | --receive stream        | socket chunk -> ring slot, legs send from the slot (1)     |
 * | direct  | --receive direct        | shared, payloads >= 64 KiB read straight into the slot (~0) |
 * | inline  | --placement inline      | shared, leg actors on the main thread instead of workers  |
 *
 * `--receive direct` is the default since the receive-into-the-ring work (issue 15); the
 * other modes pass `--receive stream` so each keeps measuring the path its name says (and
 * the copies-per-WRITE expectations stay: shared 1, per-leg N + 1).
 *
 * The harness reads every enbd case's counters on its control socket (`<socket>.ctl`) before
 * and after each fio run, for copies per WRITE (lib/counters.ts). `--metrics` stays off: the
 * opt-in `enbd-mirror2-shared-metrics` (with `--metrics 127.0.0.1:PORT`, counters scraped
 * from it) measures what serving the endpoint costs.
 * Every case here runs `--metadata none` (legs without enbd metadata, the engine as it was
 * before on-leg metadata), so these numbers stay comparable with older runs; the cost of the
 * metadata (`--metadata leg`, the default) is measured by lib/metadata.ts, side by side.
 * The peer `nbdkit-nbd-proxy` is nbdkit's nbd plugin as a 1-leg C pass-through.
 * Earlier names still accepted by --cases: enbd-mirror1 (= enbd-mirror1-shared).
 *
 * Targets (issue: mirror engine and issue: bench harness), all on the shared ring (the design):
 * - enbd-mirror2-shared: 4K randwrite QD32 >= 1.5x nbdkit-nbd-proxy and >= 2.5x qemu-quorum2;
 *   4K randread QD32 >= 2x nbdkit-nbd-proxy; 1M seq write >= 2x qemu-quorum2; workers >= 0.9x
 *   inline placement (4K randwrite QD32).
 * - enbd-mirror3-shared: 4K randwrite QD32 >= 2.5x qemu-quorum3; workers ahead of inline.
 * - copies per WRITE (shared 1 for any N, per-leg N + 1): checked in lib/matrix.ts.
 * Every matrix case also gets ratios, without a target, to nbdkit-memory ("direct"), to the
 * pass-through and to qemu-quorum<N> (qemu-quorum1 for one leg).
 *
 * Write-path cost of the bitmaps (issue: resync, "IOPS with the bitmap in place within 5 % of
 * without"), each pair measured in one run:
 * - `enbd-mirror2-shared` vs `enbd-mirror2-untracked` (`--flush-tracking off`: no per-write
 *   "unflushed since the last FLUSH" record): the bitmap every healthy write pays.
 * - `enbd-mirror2-degraded` (leg 1's nbdkit is killed once the mirror is up, reconnects
 *   pushed out by an hour, so every write marks leg 1's dirty map) vs `enbd-mirror1-shared`
 *   (one leg, no other leg to mark): the dirty-map mark a degraded mirror pays per write.
 * Threads: harness main thread (servers are child processes).
 */
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { BenchCase, CaseContext, RatioTarget } from '../lib/case.js';
import { unixUri } from '../lib/case.js';
import { freeTcpPort, readControlCounters, readControlStatus, scrapeCounters } from '../lib/counters.js';
import { enbdArgs, enbdUnavailable } from '../lib/enbd.js';
import { startMemoryLegs, type StartedLegs } from '../lib/legs.js';
import {
  kDirectCase, kMirrorLegCounts, kMirrorModes, kProxyCase, matrixCaseName, quorumCaseName, type MirrorMode,
} from '../lib/matrix.js';
import type { ManagedProcess } from '../lib/proc.js';
import type { Workload } from '../lib/workloads.js';

const kModeFlags: Readonly<Record<MirrorMode, readonly string[]>> = {
  'per-leg': ['--copy-mode', 'per-leg', '--receive', 'stream'],
  shared: ['--receive', 'stream'],
  direct: ['--receive', 'direct'],
  inline: ['--placement', 'inline', '--receive', 'stream'],
};

const kModeDescriptions: Readonly<Record<MirrorMode, string>> = {
  'per-leg': 'a payload copy per leg (--copy-mode per-leg)',
  shared: 'one shared ring copy, an actor thread per leg (the design)',
  direct: 'shared ring, payloads read straight into the slot (--receive direct: the default flags)',
  inline: 'shared ring, leg actors on the main thread (--placement inline)',
};

const kMatrixSource = 'issue: bench harness for copy-avoidance experiments';
const kEngineSource = 'issue: mirror engine (2 legs vs nbdkit nbd pass-through)';
const kSpeedSource = 'issue: speed to the physical limit (default flags)';
const kWritePathSource = 'issue: resync (write path with the bitmap vs without)';
const kDegradedWaitMs = 10_000;
const kDegradedPollMs = 20;
const kMetricsReadyMs = 10_000;
const kMetricsPollMs = 50;
/** Reconnect backoff of the degraded case: no attempt during a bench run. */
const kNoReconnectMs = '3600000';

/** Minimum ratios by workload name; a workload not listed has no target (ratio only). */
type MinByWorkload = Readonly<Record<string, number>>;

function target(versus: string, source: string, minimums: MinByWorkload = {}): RatioTarget {
  return { versus, source, minRatio: (workload: Workload) => minimums[workload.name] };
}

/**
 * Issue 15's targets, on the matrix case that runs the daemon's default flags (`direct`:
 * `--receive direct` is the default): the ceiling is half the direct leg (a 2-leg mirror writes
 * every byte twice), so ">= 0.9x the ceiling" is ">= 0.45x the direct leg".
 */
function speedTargets(legs: number): RatioTarget[] {
  if (legs < 2) return [target(kDirectCase, kMatrixSource)];
  return [
    target(kDirectCase, kSpeedSource, legs === 2 ? { 'randwrite-4k-qd32': 0.45, 'seqwrite-1m-qd8': 0.45 } : {}),
    target(kProxyCase, kSpeedSource, legs === 2 ? { 'randwrite-4k-qd32': 1.5, 'randread-4k-qd32': 2.5 } : {}),
    target(quorumCaseName(legs), kSpeedSource, legs === 2 ? { 'randwrite-4k-qd32': 2.5, 'seqwrite-1m-qd8': 1.6 } : { 'randwrite-4k-qd32': 2.5 }),
  ];
}

/** The reference ratios every matrix case gets (no minimum), plus the issues' targets. */
function matrixTargets(legs: number, mode: MirrorMode): RatioTarget[] {
  if (mode === 'direct') return speedTargets(legs);
  const targets: RatioTarget[] = [target(kDirectCase, kMatrixSource)];
  const shared = mode === 'shared';
  targets.push(target(kProxyCase, kEngineSource, shared && legs === 2
    ? { 'randwrite-4k-qd32': 1.5, 'randread-4k-qd32': 2 }
    : {}));
  // qemu quorum of the same leg count (qemu-quorum1 for one leg: no target there).
  const quorum: MinByWorkload = !shared || legs === 1 ? {} : legs === 2
    ? { 'randwrite-4k-qd32': 2.5, 'seqwrite-1m-qd8': 2 }
    : { 'randwrite-4k-qd32': 2.5 };
  targets.push(target(quorumCaseName(legs), kMatrixSource, quorum));
  if (shared && legs >= 2) {
    // Workers vs inline placement: >= 0.9x at 2 legs, ahead (>= 1.0x) at 3.
    targets.push(target(matrixCaseName(legs, 'inline'), kMatrixSource,
      { 'randwrite-4k-qd32': legs === 2 ? 0.9 : 1.0 }));
  }
  return targets;
}

/** Write-path target: this case / versus >= 0.95 on 4K random writes QD32. */
function writePathTarget(versus: string): RatioTarget {
  return target(versus, kWritePathSource, { 'randwrite-4k-qd32': 0.95 });
}

interface MirrorCaseOptions {
  extra?: readonly string[];
  quick?: boolean;
  optIn?: boolean;
  aliases?: readonly string[];
  description?: string;
  targets?: readonly RatioTarget[];
  runsWorkload?: (workload: Workload) => boolean;
  /** Serve --metrics and read the counters there instead of the control socket (default false). */
  metrics?: boolean;
  /** Runs once the mirror is up (e.g. take a leg down); controlPath: its control socket. */
  afterStart?: (context: CaseContext, legs: StartedLegs, server: ManagedProcess, controlPath: string) => Promise<void>;
}

/**
 * Kills leg 1's nbdkit (a crash) and waits until the mirror's control socket reports the leg
 * 'degraded' (fenced, waiting for its reconnect timer: every write now marks its dirty map).
 */
async function takeLeg1Down(_context: CaseContext, legs: StartedLegs, server: ManagedProcess,
  controlPath: string): Promise<void> {
  const leg = legs.processes[1];
  if (leg === undefined) throw new Error('degraded case needs two legs');
  await leg.stop('SIGKILL');
  const deadline = Date.now() + kDegradedWaitMs;
  while ((await readControlStatus(controlPath))?.legs[1]?.state !== 'degraded') {
    if (!server.running) throw new Error(`mirror exited after leg 1 went down: ${server.exitDescription()}`);
    if (Date.now() > deadline) throw new Error(`mirror did not report leg 1 degraded within ${kDegradedWaitMs} ms`);
    await sleep(kDegradedPollMs);
  }
}

/** Waits until the metrics endpoint answers (it starts listening after the NBD socket). */
async function waitForMetrics(port: number, server: ManagedProcess): Promise<void> {
  const deadline = Date.now() + kMetricsReadyMs;
  while ((await scrapeCounters('127.0.0.1', port)) === null) {
    if (!server.running) throw new Error(`mirror exited: ${server.exitDescription()}\n${server.logTail()}`);
    if (Date.now() > deadline) throw new Error(`metrics endpoint on port ${port} did not answer within ${kMetricsReadyMs} ms`);
    await sleep(kMetricsPollMs);
  }
}

function mirrorCase(name: string, legs: number, order: number, caseOptions: MirrorCaseOptions = {}): BenchCase {
  const extra = caseOptions.extra ?? [];
  const metrics = caseOptions.metrics ?? false;
  return {
    name,
    description: caseOptions.description ?? `enbd mirror, ${legs} nbdkit memory legs ${extra.join(' ')}`.trim(),
    order,
    quick: caseOptions.quick ?? false,
    ...(caseOptions.optIn === true ? { optIn: true } : {}),
    ...(caseOptions.aliases !== undefined ? { aliases: caseOptions.aliases } : {}),
    ...(caseOptions.runsWorkload !== undefined ? { runsWorkload: caseOptions.runsWorkload } : {}),
    tools: ['nbdkit'],
    unavailableReason: enbdUnavailable,
    async start(context) {
      const started = await startMemoryLegs(context, name, legs);
      const socketPath = join(context.runDir, `${name}.sock`);
      const port = metrics ? await freeTcpPort() : 0;
      const server = await context.spawn({
        label: name,
        command: process.execPath,
        args: enbdArgs(context, [
          'mirror', ...started.uris.flatMap((uri) => ['--leg', uri]), '--socket', socketPath,
          '--metadata', 'none', '--log-level', 'warn', ...(metrics ? ['--metrics', `127.0.0.1:${port}`] : []), ...extra,
        ]),
        socketPath,
        role: 'server',
        env: { ...process.env, ENBD_LOG_JSON: '1' },
      });
      if (metrics) await waitForMetrics(port, server);
      const controlPath = `${socketPath}.ctl`;
      await caseOptions.afterStart?.(context, started, server, controlPath);
      return {
        uri: unixUri(socketPath),
        counters: metrics ? () => scrapeCounters('127.0.0.1', port) : () => readControlCounters(controlPath),
      };
    },
    targets: caseOptions.targets ?? [],
  };
}

const proxy: BenchCase = {
  name: kProxyCase,
  description: "nbdkit's nbd plugin in front of one nbdkit memory leg (C pass-through hop)",
  order: 31,
  quick: true,
  tools: ['nbdkit'],
  unavailableReason: () => null,
  async start(context) {
    const legs = await startMemoryLegs(context, 'proxy', 1);
    const socketPath = join(context.runDir, 'proxy.sock');
    await context.spawn({
      label: kProxyCase,
      command: 'nbdkit',
      args: ['-f', '--unix', socketPath, 'nbd', `socket=${legs.socketPaths[0] ?? ''}`],
      socketPath,
      role: 'server',
    });
    return { uri: unixUri(socketPath) };
  },
};

/** The matrix: N legs x mode; shared mode runs every workload, the others the headline ones. */
function matrixCases(): BenchCase[] {
  const cases: BenchCase[] = [];
  for (const legs of kMirrorLegCounts) {
    for (const [modeIndex, mode] of kMirrorModes.entries()) {
      const name = matrixCaseName(legs, mode);
      const targets = matrixTargets(legs, mode);
      if (legs === 2 && mode === 'shared') targets.push(writePathTarget('enbd-mirror2-untracked'));
      cases.push(mirrorCase(name, legs, 40 + legs * 5 + modeIndex, {
        extra: kModeFlags[mode],
        quick: legs === 2,
        description: `enbd mirror, ${legs} nbdkit memory leg${legs === 1 ? '' : 's'}: ${kModeDescriptions[mode]}`,
        targets,
        ...(legs === 1 && mode === 'shared' ? { aliases: ['enbd-mirror1'] } : {}),
        ...(mode === 'shared' ? {} : { runsWorkload: (workload: Workload) => workload.headline }),
      }));
    }
  }
  return cases;
}

/** The pair of the bitmap write-path check: 4K random writes, and 4K random reads as control. */
const writePathWorkloads = (workload: Workload): boolean => workload.name === 'randwrite-4k-qd32' ||
  workload.name === 'randread-4k-qd32';

const cases: BenchCase[] = [
  proxy,
  ...matrixCases(),
  mirrorCase('enbd-mirror2-untracked', 2, 60, {
    extra: ['--flush-tracking', 'off'], runsWorkload: writePathWorkloads,
    description: 'enbd-mirror2-shared with --flush-tracking off (no per-write unflushed record)',
  }),
  mirrorCase('enbd-mirror2-degraded', 2, 61, {
    extra: ['--reconnect-min', kNoReconnectMs, '--reconnect-max', kNoReconnectMs], runsWorkload: writePathWorkloads,
    targets: [writePathTarget(matrixCaseName(1, 'shared'))], afterStart: takeLeg1Down,
    description: 'enbd mirror of 2 legs with leg 1 down: every write marks its dirty map',
  }),
  mirrorCase('enbd-mirror2-shared-metrics', 2, 62, {
    optIn: true, metrics: true, runsWorkload: (workload) => workload.headline,
    targets: [target(matrixCaseName(2, 'shared'), 'diagnostic: cost of --metrics')],
    description: 'enbd-mirror2-shared with --metrics 127.0.0.1:PORT (what serving the endpoint costs; diagnostic)',
  }),
];

export default cases;
