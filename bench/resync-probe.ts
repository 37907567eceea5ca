/**
 * Resync probe (issue 15): a small driver that times the scattered 4 KiB resync phase by phase
 * and counts what one copy costs: copies (leg 1 WRITEs), CPU time of the master and of the
 * other threads, context switches (per thread, from /proc/self/task), and, with --perf,
 * syscalls and context switches of the whole process (`perf stat -p`) over the resync.
 * `node dist/bench/resync-probe.js [--size-mib 512] [--writes 1311] [--rounds 4] [--perf]
 *  [--direct] [--verify] [--block 4096] [--gap BYTES] [--lanes N] [--no-chain] [--full] [--timeline]
 *  [--slots N] [--slot-kib K]`
 * (--full: every chunk of leg 1 marked instead of the scattered writes; --timeline: the ms spent
 * with 0-15, 16-31, ... copies in flight while the map was not empty, sampled every ms; --slots,
 * --slot-kib: the ring's shape, default 256 x 256 KiB; the window is at most half its slots).
 * Threads: main thread (the mirror runs in this process, its actors on worker threads); the
 * legs are `nbdkit memory` children on Unix sockets.
 *
 * Design notes
 * - Same mirror setup as lib/resync.ts (4 KiB chunks, rates unthrottled, no metadata), so its
 *   numbers explain the bench's; no fill (the copies read what the writes put on leg 0, the
 *   gaps read zeros).
 * - Phases: reconnect (reconnectLegNow: fence, connect, probation probe), copy (from then to
 *   the leg's 'in-sync' event). copies/s is over the copy phase only.
 * - --direct: fio 4 KiB randwrite QD32 for 2 s on a third memory server (the bench's
 *   reference leg), so the ratio can be printed.
 *
 * Invariant: every child process started here is stopped before exit, also on errors.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { pino } from 'pino';
import { assert } from '../src/core/assert.js';
import type { MirrorEvent } from '../src/engine/mirror.js';
import { NbdClient } from '../src/nbd/client/client.js';
import { openMirrorServer } from '../src/cli/mirror-server.js';
import { kConnectionActorEntry } from '../src/cli/actor-entry.js';
import { unixUri } from './lib/case.js';
import { runFio } from './lib/fio.js';
import { startNbdkitLeg } from './lib/legs.js';
import type { ManagedProcess } from './lib/proc.js';
import { kWorkloads } from './lib/workloads.js';
import { compareLegs, xorshift32 } from './lib/resync.js';

interface ThreadSample {
  cpuTicks: number;
  switches: number;
}

function threadSamples(): Map<number, ThreadSample> {
  const samples = new Map<number, ThreadSample>();
  for (const name of readdirSync('/proc/self/task')) {
    try {
      const stat = readFileSync(`/proc/self/task/${name}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      const cpuTicks = Number(fields[11]) + Number(fields[12]);
      const status = readFileSync(`/proc/self/task/${name}/status`, 'utf8');
      const voluntary = Number(/voluntary_ctxt_switches:\s+(\d+)/.exec(status)?.[1] ?? 0);
      const involuntary = Number(/nonvoluntary_ctxt_switches:\s+(\d+)/.exec(status)?.[1] ?? 0);
      samples.set(Number(name), { cpuTicks, switches: voluntary + involuntary });
    } catch {
      // the thread ended
    }
  }
  return samples;
}

function flag(name: string): boolean {
  return process.argv.includes(name);
}

function numberFlag(name: string, fallback: number): number {
  const at = process.argv.indexOf(name);
  return at >= 0 ? Number(process.argv[at + 1]) : fallback;
}

async function startPerf(): Promise<ChildProcess> {
  const child = spawn('perf', ['stat', '-x', ',', '-e', 'raw_syscalls:sys_enter,context-switches', '-p', String(process.pid)], { stdio: ['ignore', 'ignore', 'pipe'] });
  await sleep(250); // perf attaches
  return child;
}

async function stopPerf(child: ChildProcess): Promise<{ syscalls: number; switches: number }> {
  let text = '';
  child.stderr?.on('data', (chunk: Buffer) => {
    text += chunk.toString();
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGINT');
  await exited;
  const count = (event: string): number => Number(text.split('\n').find((line) => line.includes(event))?.split(',')[0] ?? Number.NaN);
  return { syscalls: count('raw_syscalls:sys_enter'), switches: count('context-switches') };
}

async function main(): Promise<void> {
  const sizeBytes = numberFlag('--size-mib', 512) * 1024 * 1024;
  const writes = numberFlag('--writes', 1311);
  const rounds = numberFlag('--rounds', 4);
  const blockBytes = numberFlag('--block', 4096);
  const runDir = mkdtempSync(join(tmpdir(), 'enbd-resync-probe-'));
  const processes: ManagedProcess[] = [];
  const sockets = [0, 1, 2].map((index) => join(runDir, `leg${index}.sock`));
  const uris = sockets.map((path) => unixUri(path));
  const logger = pino({ level: 'info' }, pino.destination({ dest: join(runDir, 'mirror.log'), sync: true }));
  try {
    for (const [index, path] of sockets.entries()) {
      if (index === 2 && !flag('--direct')) continue;
      processes.push(await startNbdkitLeg(runDir, `leg${index}`, path, ['memory', String(sizeBytes)]));
    }
    const served = await openMirrorServer({
      legs: [uris[0] as string, uris[1] as string], actorEntry: kConnectionActorEntry, logger, logLevel: 'warn', bitmapChunkBytes: 4096,
      reconnectMinMs: 60_000, reconnectMaxMs: 60_000, resyncRates: { minBytesPerSecond: 0, maxBytesPerSecond: 0 },
      ...(process.argv.includes('--gap') ? { resyncGapBytes: numberFlag('--gap', 65536) } : {}),
      ...(process.argv.includes('--no-chain') ? { resyncChain: false } : {}),
      ...(process.argv.includes('--lanes') ? { resyncLanes: numberFlag('--lanes', 128) } : {}),
      ...(process.argv.includes('--slots') || process.argv.includes('--slot-kib')
        ? { ring: { slotCount: numberFlag('--slots', 256), slotBytes: numberFlag('--slot-kib', 256) * 1024 } } : {}),
    }, { logger });
    const mirror = served.mirror;
    const exportSocket = join(runDir, 'export.sock');
    await served.server.listenUnix(exportSocket);
    const client = await NbdClient.connect(unixUri(exportSocket));
    const units = sizeBytes / blockBytes;
    const random = xorshift32(12345);
    const handles = mirror.debugHandles() as unknown as { mirror: { doorbell: { notifyCount: number } }; legs: Array<{ dispatch: { notifyCount: number; waitCount: number }; completion: { waitCount: number } }> };
    const chain = (handles.mirror as unknown as { chain: { counts(leg: number): { notifies: number } } | null }).chain;
    // [master doorbell, leg 0 dispatch, leg 1 dispatch, leg 1 chain inbox] notifies
    const notifies = (): number[] => [handles.mirror.doorbell.notifyCount, ...handles.legs.map((leg) => leg.dispatch.notifyCount), chain?.counts(1).notifies ?? 0];
    for (let round = -1; round < rounds; round += 1) {
      let direct: number | null = null;
      if (flag('--direct') && round >= 0) {
        const workload = kWorkloads.find((each) => each.name === 'randwrite-4k-qd32');
        assert(workload !== undefined);
        direct = (await runFio(workload, { uri: uris[2] as string, runtimeSec: 2, rampSec: 0.5, sizeBytes, outputPath: join(runDir, `fio-${round}.json`) })).iops;
      }
      await client.flush();
      mirror.failLegByHand(1, 'probe');
      const picked = new Set<number>();
      while (picked.size < writes) picked.add(random() % units);
      const offsets = [...picked];
      let next = 0;
      if (flag('--full')) mirror.markLegDirty(1);
      else await Promise.all(Array.from({ length: 64 }, async () => {
        while (next < offsets.length) {
          const offset = (offsets[next] as number) * blockBytes;
          next += 1;
          const buffer = Buffer.alloc(blockBytes, (offset / blockBytes + round + 7) & 0xff);
          await client.write(offset, buffer);
        }
      }));
      const dirtyBytes = mirror.legStatus()[1]?.dirtyBytes ?? 0;
      const statsBefore = (await mirror.legStats())[1];
      let inSyncAt = 0;
      const unsubscribe = mirror.on((event: MirrorEvent) => {
        if (event.type === 'leg-state' && event.leg === 1 && event.state === 'in-sync') inSyncAt = performance.now();
      });
      const perf = flag('--perf') && round >= 0 ? await startPerf() : null;
      const threadsBefore = threadSamples();
      const cpuBefore = process.cpuUsage();
      const startedAt = performance.now();
      await mirror.reconnectLegNow(1);
      const reconnectedAt = performance.now();
      const windowStartUs = Number(process.hrtime.bigint() / 1000n);
      const threadsMid = threadSamples();
      const notifiesMid = notifies();
      let firstCopyAt = 0;
      let halfAt = 0;
      let lastCopyAt = 0;
      /** --timeline: time-weighted copies in flight (buckets of 16) while copying. */
      const inFlightMs = new Array<number>(10).fill(0);
      let sampledAt = performance.now();
      while (inSyncAt === 0) {
        const status = mirror.legStatus()[1];
        const left = status?.dirtyBytes ?? 0;
        const now = performance.now();
        if (firstCopyAt !== 0 && left > 0) {
          const bucket = Math.min(9, Math.floor((status?.resync?.copiesInFlight ?? 0) / 16));
          inFlightMs[bucket] = (inFlightMs[bucket] ?? 0) + (now - sampledAt);
        }
        sampledAt = now;
        if (lastCopyAt === 0 && left === 0) lastCopyAt = now;
        if (firstCopyAt === 0 && left < dirtyBytes) firstCopyAt = performance.now();
        if (halfAt === 0 && left <= dirtyBytes / 2) halfAt = performance.now();
        await sleep(1);
      }
      const windowEndUs = Number(process.hrtime.bigint() / 1000n);
      const threadsAfter = threadSamples();
      const notifiesEnd = notifies();
      const cpu = process.cpuUsage(cpuBefore);
      const counted = perf === null ? null : await stopPerf(perf);
      unsubscribe();
      const statsAfter = (await mirror.legStats())[1];
      const copies = (statsAfter?.requests ?? 0) - (statsBefore?.requests ?? 0);
      const copyMs = inSyncAt - reconnectedAt;
      const totalMs = inSyncAt - startedAt;
      let masterTicks = 0;
      let masterSwitches = 0;
      let otherTicks = 0;
      let otherSwitches = 0;
      const busiest: number[] = [];
      for (const [tid, after] of threadsAfter) {
        const before = threadsMid.get(tid) ?? threadsBefore.get(tid) ?? { cpuTicks: 0, switches: 0 };
        const ticks = after.cpuTicks - before.cpuTicks;
        const switches = after.switches - before.switches;
        if (tid === process.pid) {
          masterTicks += ticks;
          masterSwitches += switches;
        } else {
          otherTicks += ticks;
          otherSwitches += switches;
          if (ticks > 0) busiest.push(ticks);
        }
      }
      busiest.sort((a, b) => b - a);
      const line = {
        round, writes, dirtyKiB: dirtyBytes / 1024, copies,
        reconnectMs: +(reconnectedAt - startedAt).toFixed(1), copyMs: +copyMs.toFixed(1), totalMs: +totalMs.toFixed(1),
        firstCopyMs: firstCopyAt === 0 ? null : +(firstCopyAt - reconnectedAt).toFixed(1),
        halfMs: halfAt === 0 ? null : +(halfAt - reconnectedAt).toFixed(1),
        emptyToInSyncMs: lastCopyAt === 0 ? null : +(inSyncAt - lastCopyAt).toFixed(1),
        ...(flag('--timeline') ? { inFlightMsBy16: inFlightMs.map((ms) => Math.round(ms)).join('/') } : {}),
        copiesPerSec: Math.round(copies / (copyMs / 1000)), writesPerSec: Math.round(writes / (totalMs / 1000)),
        directIops: direct === null ? null : Math.round(direct), directRatio: direct === null ? null : +(writes / (totalMs / 1000) / direct).toFixed(3),
        cpuMsPerCopy: +(((cpu.user + cpu.system) / 1000) / Math.max(1, copies)).toFixed(3),
        masterTicks, otherTicks, threadTicks: busiest.slice(0, 4).join('/'),
        switchesPerCopy: { master: +(masterSwitches / Math.max(1, copies)).toFixed(2), others: +(otherSwitches / Math.max(1, copies)).toFixed(2) },
        perfPerCopy: counted === null ? null : { syscalls: +(counted.syscalls / Math.max(1, copies)).toFixed(2), switches: +(counted.switches / Math.max(1, copies)).toFixed(2) },
        notifiesPerCopy: notifiesEnd.map((value, index) => +((value - (notifiesMid[index] ?? 0)) / Math.max(1, copies)).toFixed(3)),
        windowUs: [windowStartUs, windowEndUs],
        load: readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' '),
      };
      if (flag('--verify') && round >= 0) {
        const comparison = await compareLegs([uris[0] as string, uris[1] as string], sizeBytes, 120_000);
        Object.assign(line, { legs: comparison.status });
      }
      process.stdout.write(`${JSON.stringify(line)}\n`);
    }
    await client.close();
    await served.stop();
  } finally {
    for (const managed of processes.reverse()) await managed.stop();
    rmSync(runDir, { recursive: true, force: true });
  }
}

await main();
