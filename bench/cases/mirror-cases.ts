/**
 * Mirror cases over `nbdkit memory` legs on Unix sockets: one factory, several named cases
 * (this file exports a list). `enbd-mirror2-shared` (the design), `-per-leg` (a payload copy
 * per leg), `-inline` (actors on the main thread), `enbd-mirror3-shared`, and the peer
 * `nbdkit-nbd-proxy` (nbdkit's nbd plugin as a 1-leg C pass-through).
 * Targets (issue: mirror engine): 2-leg 4 KiB randwrite >= 1.5x the pass-through, randread >= 2x.
 *
 * Write-path cost of the bitmaps (issue: resync, "IOPS with the bitmap in place within 5 % of
 * without"), each pair measured in one run:
 * - `enbd-mirror2-shared` vs `enbd-mirror2-untracked` (`--flush-tracking off`: no per-write
 *   "unflushed since the last FLUSH" record): the bitmap every healthy write pays.
 * - `enbd-mirror2-degraded` (leg 1's nbdkit is killed once the mirror is up, reconnects
 *   pushed out by an hour, so every write marks leg 1's dirty map) vs `enbd-mirror1` (one
 *   leg, no other leg to mark): the dirty-map mark a degraded mirror pays per write.
 * Threads: harness main thread (servers are child processes).
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { BenchCase, CaseContext, RatioTarget } from '../lib/case.js';
import { unixUri } from '../lib/case.js';
import type { ManagedProcess } from '../lib/proc.js';

function enbdMain(context: CaseContext): string {
  return process.env['ENBD_BENCH_MAIN'] ?? join(context.distRoot, 'src/cli/main.js');
}

const kWritePathSource = 'issue: resync (write path with the bitmap vs without)';
const kDegradedWaitMs = 10_000;
const kDegradedPollMs = 20;
/** Reconnect backoff of the degraded case: no attempt during a bench run. */
const kNoReconnectMs = '3600000';

interface StartedLegs {
  uris: string[];
  processes: ManagedProcess[];
}

async function startLegs(context: CaseContext, prefix: string, count: number): Promise<StartedLegs> {
  const uris: string[] = [];
  const processes: ManagedProcess[] = [];
  for (let index = 0; index < count; index += 1) {
    const socketPath = join(context.runDir, `${prefix}-leg${index}.sock`);
    processes.push(await context.spawn({
      label: `${prefix}-leg${index}`,
      command: 'nbdkit',
      args: ['-f', '--unix', socketPath, 'memory', String(context.sizeBytes)],
      socketPath,
      role: 'leg',
    }));
    uris.push(unixUri(socketPath));
  }
  return { uris, processes };
}

const proxyTargets: readonly RatioTarget[] = [{
  versus: 'nbdkit-nbd-proxy',
  source: 'issue: mirror engine (2 legs vs nbdkit nbd pass-through)',
  minRatio: (workload) => (workload.name.includes('randwrite') ? 1.5 : workload.name.includes('randread') ? 2 : undefined),
}];

/** Write-path target: this case / versus >= 0.95 on random writes (the IOPS the issue names). */
function writePathTarget(versus: string): RatioTarget {
  return {
    versus, source: kWritePathSource,
    minRatio: (workload) => (workload.pattern === 'randwrite' ? 0.95 : undefined),
  };
}

interface MirrorCaseOptions {
  extra?: string[];
  quick?: boolean;
  description?: string;
  targets?: readonly RatioTarget[];
  /** Runs once the mirror is up (e.g. take a leg down). */
  afterStart?: (context: CaseContext, legs: StartedLegs, server: ManagedProcess) => Promise<void>;
}

/** Kills leg 1's nbdkit (a crash) and waits until the mirror logs that the leg degraded. */
async function takeLeg1Down(_context: CaseContext, legs: StartedLegs, server: ManagedProcess): Promise<void> {
  const leg = legs.processes[1];
  if (leg === undefined) throw new Error('degraded case needs two legs');
  await leg.stop('SIGKILL');
  const deadline = Date.now() + kDegradedWaitMs;
  while (!server.logTail().includes('leg degraded')) {
    if (!server.running) throw new Error(`mirror exited after leg 1 went down: ${server.exitDescription()}`);
    if (Date.now() > deadline) throw new Error(`mirror did not report leg 1 degraded within ${kDegradedWaitMs} ms`);
    await sleep(kDegradedPollMs);
  }
}

function mirrorCase(name: string, legs: number, order: number, caseOptions: MirrorCaseOptions = {}): BenchCase {
  const extra = caseOptions.extra ?? [];
  return {
    name,
    description: caseOptions.description ?? `enbd mirror, ${legs} nbdkit memory legs ${extra.join(' ')}`.trim(),
    order,
    quick: caseOptions.quick ?? false,
    tools: ['nbdkit'],
    unavailableReason(context) {
      const main = enbdMain(context);
      return existsSync(main) ? null : `enbd not built (${main} missing)`;
    },
    async start(context) {
      const started = await startLegs(context, name, legs);
      const socketPath = join(context.runDir, `${name}.sock`);
      const server = await context.spawn({
        label: name,
        command: process.execPath,
        args: [enbdMain(context), 'mirror', ...started.uris.flatMap((uri) => ['--leg', uri]), '--socket', socketPath, '--log-level', 'warn', ...extra],
        socketPath,
        role: 'server',
        env: { ...process.env, ENBD_LOG_JSON: '1' },
      });
      await caseOptions.afterStart?.(context, started, server);
      return { uri: unixUri(socketPath) };
    },
    targets: caseOptions.targets ?? proxyTargets,
  };
}

const proxy: BenchCase = {
  name: 'nbdkit-nbd-proxy',
  description: "nbdkit's nbd plugin in front of one nbdkit memory leg (C proxy hop)",
  order: 30,
  quick: false,
  tools: ['nbdkit'],
  unavailableReason: () => null,
  async start(context) {
    const [legUri] = (await startLegs(context, 'proxy', 1)).uris;
    const legSocket = (legUri ?? '').replace(/^nbd\+unix:\/\/\/\?socket=/, '');
    const socketPath = join(context.runDir, 'proxy.sock');
    await context.spawn({
      label: 'nbdkit-nbd-proxy',
      command: 'nbdkit',
      args: ['-f', '--unix', socketPath, 'nbd', `socket=${legSocket}`],
      socketPath,
      role: 'server',
    });
    return { uri: unixUri(socketPath) };
  },
};

const cases: BenchCase[] = [
  proxy,
  mirrorCase('enbd-mirror2-shared', 2, 40, {
    quick: true, targets: [...proxyTargets, writePathTarget('enbd-mirror2-untracked')],
  }),
  mirrorCase('enbd-mirror2-per-leg', 2, 41, { extra: ['--copy-mode', 'per-leg'] }),
  mirrorCase('enbd-mirror2-inline', 2, 42, { extra: ['--placement', 'inline'] }),
  mirrorCase('enbd-mirror2-direct', 2, 43, { extra: ['--receive', 'direct'] }),
  mirrorCase('enbd-mirror3-shared', 3, 44, {}),
  mirrorCase('enbd-mirror2-untracked', 2, 45, {
    extra: ['--flush-tracking', 'off'], quick: true, targets: proxyTargets,
    description: 'enbd-mirror2-shared with --flush-tracking off (no per-write unflushed record)',
  }),
  mirrorCase('enbd-mirror1', 1, 46, {
    quick: true, targets: [],
    description: 'enbd mirror of one nbdkit memory leg (no other leg: no dirty map is ever marked)',
  }),
  mirrorCase('enbd-mirror2-degraded', 2, 47, {
    extra: ['--reconnect-min', kNoReconnectMs, '--reconnect-max', kNoReconnectMs], quick: true,
    targets: [writePathTarget('enbd-mirror1')], afterStart: takeLeg1Down,
    description: 'enbd mirror of 2 legs with leg 1 down: every write marks its dirty map',
  }),
];

export default cases;
