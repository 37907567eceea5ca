/**
 * One measurement: run one fio workload against one case while sampling the CPU of the
 * case's server process trees over a window inside fio's steady (post-ramp) period.
 * Threads: harness main thread.
 *
 * Timeline (t = 0 when fio is spawned; fio connects within a few ms):
 *
 *   0 -- ramp --+----------- runtime (fio's report) -----------+ exit
 *               | +kWindowStartGuardMs     -kWindowEndGuardMs |
 *               |  [=========== CPU window ===========]        |
 *
 * Invariants: the CPU window is strictly inside the measured period, so CPU seconds per
 * GiB = (CPU seconds / window seconds) / (fio GiB per second). A sample that cannot be
 * taken (process gone, fio ended early) yields NaN, never a made-up number.
 */
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { assert } from '../../src/core/assert.js';
import { counterDelta, type CounterDelta, type CounterSnapshot } from './counters.js';
import { treeCpuSeconds } from './cpu.js';
import { runFio, type FioOptions, type FioResult } from './fio.js';
import type { Workload } from './workloads.js';

const kWindowStartGuardMs = 300;
const kWindowEndGuardMs = 200;
const kBytesPerGiB = 1024 ** 3;

export interface Measurement extends FioResult {
  /** Server trees' CPU in percent of one core over the window (NaN if not sampled). */
  serverCpuPercent: number;
  /** Server trees' CPU seconds per GiB transferred (NaN if not sampled). */
  serverCpuSecPerGiB: number;
  /**
   * The server's WRITE-path counters over the whole fio run (ramp included: the ratios per
   * WRITE do not depend on the window); null for servers without counters (nbdkit, qemu).
   */
  counters: CounterDelta | null;
  /**
   * The legs' CPU over the same window (percent of one core, and seconds per GiB the client
   * moved), only when measure() was given leg pids (the TLS phase: TLS legs decrypt too).
   */
  legCpuPercent?: number;
  legCpuSecPerGiB?: number;
}

interface Sample {
  cpuSeconds: number;
  legCpuSeconds: number;
  wallMs: number;
}

function sampleAfter(delayMs: number, pids: readonly number[], legPids: readonly number[],
  fioDone: () => boolean): Promise<Sample | null> {
  return sleep(delayMs).then(() => {
    if (fioDone()) return null;
    return {
      cpuSeconds: treeCpuSeconds(pids),
      legCpuSeconds: legPids.length === 0 ? 0 : treeCpuSeconds(legPids),
      wallMs: performance.now(),
    };
  });
}

export async function measure(workload: Workload, options: FioOptions,
  serverPids: readonly number[], counters?: () => Promise<CounterSnapshot | null>,
  legPids: readonly number[] = []): Promise<Measurement> {
  assert(serverPids.length > 0, 'measure needs the server pids');
  const countersBefore = counters === undefined ? null : await counters();
  const rampMs = options.rampSec * 1000;
  const windowStartMs = rampMs + kWindowStartGuardMs;
  const windowEndMs = rampMs + options.runtimeSec * 1000 - kWindowEndGuardMs;
  assert(windowEndMs > windowStartMs, 'runtime too short for a CPU window');
  let done = false;
  const fio = runFio(workload, options).finally(() => (done = true));
  const startSample = sampleAfter(windowStartMs, serverPids, legPids, () => done);
  const endSample = sampleAfter(windowEndMs, serverPids, legPids, () => done);
  const [result, start, end] = await Promise.all([fio, startSample, endSample]);
  const countersAfter = counters === undefined ? null : await counters();
  let serverCpuPercent = Number.NaN;
  let serverCpuSecPerGiB = Number.NaN;
  let legCpuPercent = Number.NaN;
  let legCpuSecPerGiB = Number.NaN;
  if (start !== null && end !== null && end.wallMs > start.wallMs) {
    const windowSec = (end.wallMs - start.wallMs) / 1000;
    const cpuRate = (end.cpuSeconds - start.cpuSeconds) / windowSec;
    const legCpuRate = (end.legCpuSeconds - start.legCpuSeconds) / windowSec;
    serverCpuPercent = cpuRate * 100;
    legCpuPercent = legCpuRate * 100;
    if (result.bytesPerSec > 0) {
      serverCpuSecPerGiB = cpuRate / (result.bytesPerSec / kBytesPerGiB);
      legCpuSecPerGiB = legCpuRate / (result.bytesPerSec / kBytesPerGiB);
    }
  }
  const counterFields = { counters: counterDelta(countersBefore, countersAfter) };
  if (legPids.length === 0) return { ...result, serverCpuPercent, serverCpuSecPerGiB, ...counterFields };
  return { ...result, serverCpuPercent, serverCpuSecPerGiB, ...counterFields, legCpuPercent, legCpuSecPerGiB };
}
