/**
 * Resync measurements (issue: resync): how long a returning leg takes to catch up after 1 %
 * of the device was written scattered while it was out, and how fast a full resync copies,
 * both against a full copy by `nbdcopy` between the same two legs (the anchor).
 * Threads: harness main thread. The mirror runs in this process (MirrorDevice + NbdServer,
 * its connection actors on worker threads); legs are `nbdkit memory` children on Unix
 * sockets, started and stopped here through lib/proc.ts.
 *
 * Scenario (per round; the legs are filled once, before round 1):
 *   fill     nbdcopy from `nbdkit pattern` to both legs (non-zero data, so copies move bytes)
 *   warm-up  once, untimed for the ratios: 0.2 % in 4 KiB writes and its resync (JIT)
 *   direct   fio 4 KiB random writes QD32 (2 s) straight to a third `nbdkit memory` server of
 *            the legs' size (the reference leg, outside the mirror): the legs' direct 4 KiB
 *            IOPS in this round, against which the 4 KiB resync's writes/s are measured
 *   partial  for each write size (4 KiB: the headline; 64 KiB: the same bytes in 16x fewer
 *            runs): failLegByHand(1); 1 % of the device in writes of that size at distinct
 *            random aligned offsets through the mirror's NBD export (QD 64); check the writes
 *            reached leg 0 and not leg 1; reconnectLegNow(1); time until leg 1 is 'in-sync';
 *            compare legs
 *   anchor   nbdcopy --flush leg0 -> leg1 (the mirror idle; both legs equal already)
 *   full     failLegByHand(1); markLegDirty(1); reconnectLegNow(1); time until 'in-sync';
 *            compare legs
 * Before leg 1 is failed, the export is flushed: a resync copy not yet flushed on leg 1 when it
 * leaves is marked again (its unflushed record, 64 KiB chunks), which would add the last
 * resync's tail to the next one's dirt.
 * Times run from just before reconnectLegNow to the mirror's 'leg-state' event that puts leg 1
 * 'in-sync' (device.on); `copiedMs` is when a 5 ms poll first saw the dirty map empty (at most
 * inSyncMs: a gap between them is time the engine took to notice it was done).
 *
 * Invariants:
 * - Resync rates are unthrottled (floor 0, ceiling 0): the bench measures the copy engine.
 * - Legs are compared byte for byte straight from nbdkit (not through the mirror), within a
 *   deadline; a timeout is reported as such, never as "equal".
 * - Every process started here is stopped before returning, also on errors.
 */
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import * as inspector from 'node:inspector/promises';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { pino } from 'pino';
import { assert } from '../../src/core/assert.js';
import type { Logger } from '../../src/core/log.js';
import type { LegState, MirrorDevice, MirrorEvent } from '../../src/engine/mirror.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { openMirrorServer, type MirrorServer } from '../../src/cli/mirror-server.js';
import { kConnectionActorEntry } from '../../src/cli/actor-entry.js';
import { unixUri } from './case.js';
import { runFio } from './fio.js';
import { runTool, type ManagedProcess } from './proc.js';
import { startNbdkitLeg } from './legs.js';
import { kWorkloads } from './workloads.js';
import { describeError, median } from './numbers.js';

const kBlockBytes = 4096;
/** Write sizes of the partial resyncs; the first is the headline (the scattered 1 %). */
export const kPartialWriteBytes: readonly number[] = [4096, 65536];
const kWriteQueueDepth = 64;
const kCheckQueueDepth = 32;
const kCheckBlocksMax = 4096;
const kComparePieceBytes = 8 * 1024 * 1024;
const kCompareInFlight = 4;
const kPollMs = 5;
const kToolTimeoutMs = 300_000;
const kResyncTimeoutMs = 600_000;
const kDefaultCompareDeadlineMs = 120_000;
const kLogTailChars = 3_000;
const kWarmupFraction = 0.002;
const kDirectRuntimeSec = 2;
const kDirectRampSec = 0.5;

export interface ResyncBenchOptions {
  /** Device (= each leg) size in bytes, a multiple of 1 MiB. */
  sizeBytes: number;
  /** Share of the device written while leg 1 is out (0.01 = 1 %). */
  dirtyFraction: number;
  rounds: number;
  /** Scratch directory (sockets, logs); must exist. */
  runDir: string;
  /** Byte-compare the legs after each resync. */
  verify: boolean;
  compareDeadlineMs?: number;
  /** Write a CPU profile of the main thread per timed resync here (diagnostics). */
  profileDir?: string;
  log(message: string): void;
}

export interface LegComparison {
  /** 'timeout': deadline hit, the rest unknown; 'skipped': --no-verify. */
  status: 'equal' | 'differ' | 'timeout' | 'error' | 'skipped';
  bytesCompared: number;
  /** 4 KiB blocks that differ between the legs (within bytesCompared). */
  differingBlocks: number;
  firstDifferenceBytes: number | null;
  wallMs: number;
  detail: string | null;
}

export interface ResyncTiming {
  /** Leg 1's dirty bytes when the reconnect started. */
  dirtyBytes: number;
  /** reconnectLegNow resolved (connected again, resync started). */
  reconnectMs: number;
  /** When a 5 ms poll first saw leg 1's dirty map empty, capped at inSyncMs. */
  copiedMs: number;
  /** The 'in-sync' state event of leg 1: the timed figure. */
  inSyncMs: number;
  /** dirtyBytes / inSyncMs, bytes per second. */
  bytesPerSec: number;
  /** CPU seconds of this process (master + actor threads) during the resync. */
  cpuSeconds: number;
  /**
   * Bytes the resync copied, from its 'resync complete' log record (null if not found).
   * Equal to dirtyBytes when every dirty chunk was copied exactly once.
   */
  bytesDone: number | null;
  comparison: LegComparison;
}

export interface PartialRound {
  /** Size of each scattered write (a multiple of 4 KiB, aligned to itself). */
  writeBlockBytes: number;
  writes: number;
  writeBytes: number;
  /** Wall time of the scattered writes through the mirror (leg 1 out), and their rate. */
  writeMs: number;
  writeIops: number;
  /** Negative control before the resync: written ranges sampled on both legs. */
  checkedWrites: number;
  leg0HoldsWrites: number;
  leg1Differs: number;
  resync: ResyncTiming;
  /** anchor.wallMs / resync.inSyncMs of the same round (target >= 10 for 4 KiB). */
  speedup: number | null;
  /** Dirty writes resynced per second (writes / inSyncMs). */
  writesPerSec: number;
  /** writesPerSec / the reference leg's direct 4 KiB randwrite IOPS this round (4 KiB only). */
  directRatio: number | null;
}

export interface AnchorRun {
  status: number | null;
  wallMs: number;
  bytesPerSec: number;
  output: string;
}

export interface ResyncRound {
  round: number;
  /** fio 4 KiB randwrite QD32 IOPS straight to the reference leg, this round (null: failed). */
  directIops: number | null;
  directError: string | null;
  /** One per kPartialWriteBytes entry, in that order. */
  partials: PartialRound[];
  anchor: AnchorRun | null;
  full: ResyncTiming | null;
  /** full.bytesPerSec / anchor.bytesPerSec (target >= 0.8). */
  fullThroughputRatio: number | null;
  error: string | null;
}

export interface ResyncResults {
  sizeBytes: number;
  dirtyFraction: number;
  /** Dirty-map chunk (bytes per bit) of the mirror, and the comparison's block. */
  chunkBytes: number;
  legs: string;
  fill: { wallMs: number; method: string } | null;
  /** Untimed-for-the-ratios warm-up: 0.2 % in 4 KiB writes, resynced, legs not compared. */
  warmup: PartialRound | null;
  rounds: ResyncRound[];
  /** Medians over the rounds that produced them; partialSpeedup is the 4 KiB one. */
  partialSpeedup: number | null;
  partialSpeedups: Array<{ writeBlockBytes: number; speedup: number | null }>;
  fullThroughputRatio: number | null;
  /** Median of the 4 KiB partials' directRatio. */
  directRatio: number | null;
  targets: { partialSpeedupMin: number; fullThroughputRatioMin: number; directRatioMin: number };
  met: { partialSpeedup: boolean | null; fullThroughputRatio: boolean | null; directRatio: boolean | null };
  /** Every comparison that ran said 'equal'. */
  legsEqual: boolean | null;
  error: string | null;
  /** Tail of the in-process mirror's log (info level). */
  logTail: string;
}

/**
 * Issue 15: 1 % scattered 4 KiB dirt >= 10x faster than a full copy, full resync >= 0.9x
 * nbdcopy, scattered 4 KiB copies at >= 0.5x the legs' direct 4 KiB IOPS. (Before: 50x / 0.8x.)
 */
export const kResyncTargets = { partialSpeedupMin: 10, fullThroughputRatioMin: 0.9, directRatioMin: 0.5 } as const;

/** xorshift32: deterministic offsets per round, no dependency. */
function makeRandom(seed: number): () => number {
  return xorshift32((seed * 2654435761) >>> 0 || 1);
}

/** The xorshift32 generator from a raw non-zero state (the probe seeds it directly). */
export function xorshift32(initial: number): () => number {
  let state = initial >>> 0;
  return () => {
    state ^= state << 13;
    state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    return state;
  };
}

/** `count` distinct block indices in [0, blocks), random order (partial Fisher-Yates). */
function pickBlocks(blocks: number, count: number, seed: number): Uint32Array {
  assert(count <= blocks);
  const all = new Uint32Array(blocks);
  for (let index = 0; index < blocks; index += 1) all[index] = index;
  const random = makeRandom(seed);
  for (let index = 0; index < count; index += 1) {
    const pick = index + (random() % (blocks - index));
    const chosen = all[pick] as number;
    all[pick] = all[index] as number;
    all[index] = chosen;
  }
  return all.slice(0, count);
}

/**
 * Content written at `offsetBytes` in pass `pass`: unlike nbdkit pattern's (big-endian offsets)
 * and different per pass and per 4 KiB block.
 */
function fillRange(target: Buffer, offsetBytes: number, pass: number): void {
  for (let at = 0; at < target.length; at += kBlockBytes) {
    const block = (offsetBytes + at) / kBlockBytes;
    const value = (Math.imul(block, 2654435761) ^ Math.imul(pass + 1, 0x9e3779b9) ^ 0x5a5a5a5a) >>> 0;
    const end = Math.min(at + kBlockBytes, target.length);
    for (let word = at; word < end; word += 4) target.writeUInt32LE((value + word) >>> 0, word);
  }
}

async function forEachLimit(count: number, limit: number, body: (index: number) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < count) {
      const index = next;
      next += 1;
      await body(index);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, count) }, worker));
}



/** Byte-compares two legs straight from their servers, stopping at the deadline. */
export async function compareLegs(uris: readonly [string, string], sizeBytes: number,
  deadlineMs: number): Promise<LegComparison> {
  const startedAt = performance.now();
  const result: LegComparison = {
    status: 'equal', bytesCompared: 0, differingBlocks: 0, firstDifferenceBytes: null, wallMs: 0, detail: null,
  };
  let left: NbdClient | null = null;
  let right: NbdClient | null = null;
  try {
    left = await NbdClient.connect(uris[0]);
    right = await NbdClient.connect(uris[1]);
    const pieces = Math.ceil(sizeBytes / kComparePieceBytes);
    let timedOut = false;
    const leftClient = left;
    const rightClient = right;
    await forEachLimit(pieces, kCompareInFlight, async (piece) => {
      if (timedOut || performance.now() - startedAt > deadlineMs) {
        timedOut = true;
        return;
      }
      const offsetBytes = piece * kComparePieceBytes;
      const lengthBytes = Math.min(kComparePieceBytes, sizeBytes - offsetBytes);
      const [mine, theirs] = await Promise.all([
        leftClient.read(offsetBytes, lengthBytes), rightClient.read(offsetBytes, lengthBytes),
      ]);
      if (!mine.equals(theirs)) {
        for (let at = 0; at < lengthBytes; at += kBlockBytes) {
          const end = Math.min(at + kBlockBytes, lengthBytes);
          if (mine.compare(theirs, at, end, at, end) !== 0) {
            result.differingBlocks += 1;
            const where = offsetBytes + at;
            if (result.firstDifferenceBytes === null || where < result.firstDifferenceBytes) {
              result.firstDifferenceBytes = where;
            }
          }
        }
      }
      result.bytesCompared += lengthBytes;
    });
    if (result.differingBlocks > 0) result.status = 'differ';
    else if (timedOut) {
      result.status = 'timeout';
      result.detail = `deadline ${deadlineMs} ms hit after ${result.bytesCompared} of ${sizeBytes} bytes`;
    }
  } catch (error) {
    result.status = 'error';
    result.detail = describeError(error);
  } finally {
    await left?.close().catch(() => undefined);
    await right?.close().catch(() => undefined);
  }
  result.wallMs = performance.now() - startedAt;
  return result;
}

interface Profiler {
  stop(label: string): Promise<void>;
}

/**
 * Diagnostics (ENBD_BENCH_RESYNC_PROFILE=DIR): a V8 CPU profile of the harness main thread
 * (the mirror's master) over one timed resync, written to DIR/resync-LABEL-TIME.cpuprofile.
 */
async function startProfile(directory: string | undefined): Promise<Profiler | null> {
  if (directory === undefined || directory === '') return null;
  const session = new inspector.Session();
  session.connect();
  await session.post('Profiler.enable');
  await session.post('Profiler.setSamplingInterval', { interval: 100 });
  await session.post('Profiler.start');
  return {
    async stop(label: string): Promise<void> {
      const { profile } = await session.post('Profiler.stop');
      session.disconnect();
      mkdirSync(directory, { recursive: true });
      writeFileSync(join(directory, `resync-${label}-${Date.now()}.cpuprofile`), JSON.stringify(profile));
    },
  };
}

function skippedComparison(): LegComparison {
  return { status: 'skipped', bytesCompared: 0, differingBlocks: 0, firstDifferenceBytes: null, wallMs: 0, detail: null };
}

class ResyncScenario {
  private readonly processes: ManagedProcess[] = [];
  private mirror: MirrorDevice | null = null;
  private served: MirrorServer | null = null;
  private client: NbdClient | null = null;
  readonly legUris: [string, string];
  private readonly legSockets: [string, string];
  private readonly referenceSocket: string;
  private readonly exportSocket: string;
  readonly logPath: string;
  private readonly logger: Logger;

  constructor(private readonly options: ResyncBenchOptions) {
    this.legSockets = [join(options.runDir, 'resync-leg0.sock'), join(options.runDir, 'resync-leg1.sock')];
    this.legUris = [unixUri(this.legSockets[0]), unixUri(this.legSockets[1])];
    this.exportSocket = join(options.runDir, 'resync-mirror.sock');
    this.referenceSocket = join(options.runDir, 'resync-reference.sock');
    this.logPath = join(options.runDir, 'resync-mirror.log');
    this.logger = pino({ level: 'info', base: { name: 'enbd-bench-resync' } },
      pino.destination({ dest: this.logPath, sync: true }));
  }

  private async spawn(label: string, socketPath: string, args: readonly string[]): Promise<ManagedProcess> {
    const managed = await startNbdkitLeg(this.options.runDir, label, socketPath, args);
    this.processes.push(managed);
    return managed;
  }

  /** Starts both legs and fills them with nbdkit pattern data (both at once). */
  async startLegs(): Promise<{ wallMs: number; method: string }> {
    const size = String(this.options.sizeBytes);
    await this.spawn('resync-leg0', this.legSockets[0], ['memory', size]);
    await this.spawn('resync-leg1', this.legSockets[1], ['memory', size]);
    await this.spawn('resync-reference', this.referenceSocket, ['memory', size]);
    const patternSocket = join(this.options.runDir, 'resync-pattern.sock');
    const pattern = await this.spawn('resync-pattern', patternSocket, ['pattern', size]);
    const startedAt = performance.now();
    const runs = await Promise.all(this.legUris.map((uri) =>
      runTool('nbdcopy', [unixUri(patternSocket), uri], kToolTimeoutMs)));
    const wallMs = performance.now() - startedAt;
    await pattern.stop();
    for (const run of runs) {
      if (run.status !== 0) throw new Error(`filling a leg: nbdcopy exited ${String(run.status)}: ${run.output}`);
    }
    return { wallMs, method: 'nbdcopy from nbdkit pattern to both legs at once' };
  }

  async openMirror(): Promise<void> {
    this.served = await openMirrorServer({
      legs: [...this.legUris], actorEntry: kConnectionActorEntry, logger: this.logger, logLevel: 'warn', bitmapChunkBytes: kBlockBytes,
      reconnectMinMs: 60_000, reconnectMaxMs: 60_000,
      resyncRates: { minBytesPerSecond: 0, maxBytesPerSecond: 0 },
      // A/B of chained copies in one session (issue 15): ENBD_BENCH_RESYNC_CHAIN=0 turns them off.
      ...(process.env['ENBD_BENCH_RESYNC_CHAIN'] === '0' ? { resyncChain: false } : {}),
    }, { logger: this.logger });
    this.mirror = this.served.mirror;
    assert(this.mirror.sizeBytes === this.options.sizeBytes, 'mirror has the legs\' size');
    await this.served.server.listenUnix(this.exportSocket);
    this.client = await NbdClient.connect(unixUri(this.exportSocket));
  }

  private get device(): MirrorDevice {
    assert(this.mirror !== null, 'mirror open');
    return this.mirror;
  }

  private legState(): LegState {
    return this.device.legStatus()[1]?.state ?? 'failed';
  }

  /** Takes leg 1 out by hand (state 'failed'); later writes mark its dirty map. */
  private failLeg1(): void {
    this.device.failLegByHand(1, 'bench: resync measurement');
    assert(this.legState() === 'failed', `leg 1 failed by hand (state ${this.legState()})`);
  }

  /**
   * Reconnects leg 1 and waits for its 'in-sync' state event (the timed figure); a 5 ms poll
   * of legStatus() notes when the dirty map emptied and catches a leg that drops out.
   */
  private async timeResync(): Promise<ResyncTiming> {
    const device = this.device;
    const dirtyBytes = device.legStatus()[1]?.dirtyBytes ?? 0;
    let inSyncAt: number | null = null;
    const unsubscribe = device.on((event: MirrorEvent) => {
      if (event.type === 'leg-state' && event.leg === 1 && event.state === 'in-sync' && inSyncAt === null) {
        inSyncAt = performance.now();
      }
    });
    const profiler = await startProfile(this.options.profileDir);
    try {
      const cpuBefore = process.cpuUsage();
      const startedAt = performance.now();
      const state = await device.reconnectLegNow(1);
      const reconnectMs = performance.now() - startedAt;
      if (state !== 'resyncing' && state !== 'in-sync') {
        throw new Error(`leg 1 did not come back: state ${state} (${device.legStatus()[1]?.failureReason ?? ''})`);
      }
      let copiedAt: number | null = null;
      while (inSyncAt === null) {
        const status = device.legStatus()[1];
        assert(status !== undefined);
        if (copiedAt === null && status.dirtyBytes === 0) copiedAt = performance.now();
        if (status.state !== 'resyncing' && status.state !== 'in-sync') {
          throw new Error(`leg 1 left the resync: state ${status.state} (${status.failureReason ?? ''})`);
        }
        if (performance.now() - startedAt > kResyncTimeoutMs) {
          throw new Error(`resync not done after ${kResyncTimeoutMs} ms: ${JSON.stringify(status)}`);
        }
        await sleep(kPollMs);
      }
      const cpu = process.cpuUsage(cpuBefore);
      const inSyncMs = (inSyncAt as number) - startedAt;
      // The map is empty at the in-sync event; the poll only bounds when it emptied earlier.
      const copiedMs = Math.min(inSyncMs, (copiedAt ?? Number.POSITIVE_INFINITY) - startedAt);
      return {
        dirtyBytes, reconnectMs, copiedMs, inSyncMs,
        bytesPerSec: inSyncMs > 0 ? dirtyBytes / (inSyncMs / 1000) : Number.NaN,
        cpuSeconds: (cpu.user + cpu.system) / 1e6,
        bytesDone: this.lastResyncBytesDone(), comparison: skippedComparison(),
      };
    } finally {
      unsubscribe();
      const label = dirtyBytes === this.options.sizeBytes ? 'full' : `partial-${dirtyBytes}`;
      await profiler?.stop(label);
    }
  }

  /** bytesDone of the last 'resync complete' record of leg 1 in the mirror's log. */
  private lastResyncBytesDone(): number | null {
    this.logger.flush();
    let text: string;
    try {
      text = readFileSync(this.logPath, 'utf8');
    } catch {
      return null;
    }
    const lines = text.split('\n');
    for (let index = lines.length - 1; index >= 0; index -= 1) {
      const line = lines[index] ?? '';
      if (!line.includes('"resync complete"')) continue;
      try {
        const record = JSON.parse(line) as { leg?: unknown; bytesDone?: unknown };
        if (record.leg === 1 && typeof record.bytesDone === 'number') return record.bytesDone;
      } catch {
        // not a JSON line
      }
    }
    return null;
  }

  private async compare(): Promise<LegComparison> {
    if (!this.options.verify) return skippedComparison();
    return await compareLegs(this.legUris, this.options.sizeBytes,
      this.options.compareDeadlineMs ?? kDefaultCompareDeadlineMs);
  }

  /** fio 4 KiB random writes QD32 straight to the reference leg: the legs' direct IOPS now. */
  async directIops(round: number): Promise<number> {
    const workload = kWorkloads.find((each) => each.name === 'randwrite-4k-qd32');
    assert(workload !== undefined, 'the randwrite-4k-qd32 workload exists');
    const result = await runFio(workload, {
      uri: unixUri(this.referenceSocket), runtimeSec: kDirectRuntimeSec, rampSec: kDirectRampSec,
      sizeBytes: this.options.sizeBytes, outputPath: join(this.options.runDir, `resync-direct-${round}.json`),
    });
    return result.iops;
  }

  /** One partial resync: `pass` numbers the scattered-write passes of the whole run. */
  async partial(pass: number, writeBlockBytes: number, fraction = this.options.dirtyFraction,
    verify = true): Promise<PartialRound> {
    const client = this.client;
    assert(client !== null, 'export client connected');
    assert(writeBlockBytes % kBlockBytes === 0 && this.options.sizeBytes % writeBlockBytes === 0);
    const units = this.options.sizeBytes / writeBlockBytes;
    const count = Math.max(1, Math.round(units * fraction));
    const picked = pickBlocks(units, count, pass + 1);
    await client.flush();
    this.failLeg1();
    const startedAt = performance.now();
    await forEachLimit(count, kWriteQueueDepth, async (index) => {
      // A buffer per write: the client may still hold it in its send path until the reply.
      const buffer = Buffer.allocUnsafe(writeBlockBytes);
      const offsetBytes = (picked[index] as number) * writeBlockBytes;
      fillRange(buffer, offsetBytes, pass);
      await client.write(offsetBytes, buffer);
    });
    const writeMs = performance.now() - startedAt;
    const check = await this.checkWrites(picked, writeBlockBytes, pass);
    const dirtyBytes = this.device.legStatus()[1]?.dirtyBytes ?? 0;
    if (dirtyBytes !== count * writeBlockBytes) {
      this.options.log(`resync: leg 1's dirty map holds ${dirtyBytes} bytes after ${count} distinct ` +
        `${writeBlockBytes}-byte writes (expected ${count * writeBlockBytes})`);
    }
    const resync = await this.timeResync();
    if (verify) resync.comparison = await this.compare();
    return {
      writeBlockBytes, writes: count, writeBytes: count * writeBlockBytes, writeMs,
      writeIops: writeMs > 0 ? count / (writeMs / 1000) : Number.NaN,
      ...check, resync, speedup: null,
      writesPerSec: resync.inSyncMs > 0 ? count / (resync.inSyncMs / 1000) : Number.NaN, directRatio: null,
    };
  }

  /**
   * Negative control: on a sample of the written ranges, leg 0 holds the new data and leg 1
   * (out) does not, so the comparison after the resync has something to find.
   */
  private async checkWrites(picked: Uint32Array, writeBlockBytes: number, pass: number):
    Promise<{ checkedWrites: number; leg0HoldsWrites: number; leg1Differs: number }> {
    const sample = picked.subarray(0, Math.min(picked.length, kCheckBlocksMax));
    const leg0 = await NbdClient.connect(this.legUris[0]);
    const leg1 = await NbdClient.connect(this.legUris[1]);
    let leg0HoldsWrites = 0;
    let leg1Differs = 0;
    try {
      await forEachLimit(sample.length, kCheckQueueDepth, async (index) => {
        const offsetBytes = (sample[index] as number) * writeBlockBytes;
        const [mine, theirs] = await Promise.all([
          leg0.read(offsetBytes, writeBlockBytes), leg1.read(offsetBytes, writeBlockBytes),
        ]);
        const expected = Buffer.allocUnsafe(writeBlockBytes);
        fillRange(expected, offsetBytes, pass);
        if (mine.equals(expected)) leg0HoldsWrites += 1;
        if (!theirs.equals(mine)) leg1Differs += 1;
      });
    } finally {
      await leg0.close().catch(() => undefined);
      await leg1.close().catch(() => undefined);
    }
    return { checkedWrites: sample.length, leg0HoldsWrites, leg1Differs };
  }

  async anchor(): Promise<AnchorRun> {
    const run = await runTool('nbdcopy', ['--flush', this.legUris[0], this.legUris[1]], kToolTimeoutMs);
    if (run.status !== 0) throw new Error(`anchor nbdcopy exited ${String(run.status)}: ${run.output}`);
    return {
      status: run.status, wallMs: run.wallMs,
      bytesPerSec: this.options.sizeBytes / (run.wallMs / 1000), output: run.output,
    };
  }

  async full(): Promise<ResyncTiming> {
    await this.client?.flush();
    this.failLeg1();
    this.device.markLegDirty(1);
    const resync = await this.timeResync();
    resync.comparison = await this.compare();
    return resync;
  }

  async stop(): Promise<void> {
    await this.client?.close().catch(() => undefined);
    this.client = null;
    await this.served?.stop().catch(() => 0);
    this.served = null;
    this.mirror = null;
    for (const managed of this.processes.reverse()) await managed.stop();
    this.processes.length = 0;
  }

  logTail(): string {
    this.logger.flush();
    try {
      return readFileSync(this.logPath, 'utf8').slice(-kLogTailChars).trim();
    } catch {
      return '';
    }
  }
}

export async function runResyncBench(options: ResyncBenchOptions): Promise<ResyncResults> {
  assert(options.sizeBytes % (1024 * 1024) === 0, 'resync device size is whole MiB');
  assert(options.dirtyFraction > 0 && options.dirtyFraction <= 1, 'dirty fraction in (0, 1]');
  assert(Number.isInteger(options.rounds) && options.rounds >= 1);
  const scenario = new ResyncScenario(options);
  const results: ResyncResults = {
    sizeBytes: options.sizeBytes, dirtyFraction: options.dirtyFraction, chunkBytes: kBlockBytes,
    legs: 'two nbdkit memory legs on Unix sockets; mirror in the harness process',
    fill: null, warmup: null, rounds: [], partialSpeedup: null, partialSpeedups: [], fullThroughputRatio: null,
    directRatio: null, targets: { ...kResyncTargets },
    met: { partialSpeedup: null, fullThroughputRatio: null, directRatio: null },
    legsEqual: null, error: null, logTail: '',
  };
  try {
    options.log(`resync: filling two ${options.sizeBytes / 2 ** 20} MiB legs ...`);
    results.fill = await scenario.startLegs();
    await scenario.openMirror();
    // Untimed warm-up (JIT of the copy path; the first resync of a process ran 2-3x slower).
    results.warmup = await scenario.partial(-1, kBlockBytes, kWarmupFraction, false);
    for (let round = 0; round < options.rounds; round += 1) {
      const entry: ResyncRound = {
        round, directIops: null, directError: null, partials: [], anchor: null, full: null, fullThroughputRatio: null, error: null,
      };
      results.rounds.push(entry);
      try {
        options.log(`resync round ${round + 1}: direct 4 KiB random writes to the reference leg ...`);
        try {
          entry.directIops = await scenario.directIops(round);
        } catch (error) {
          entry.directError = describeError(error);
          options.log(`resync round ${round + 1}: direct IOPS not measured: ${entry.directError}`);
        }
        for (const [index, writeBlockBytes] of kPartialWriteBytes.entries()) {
          options.log(`resync round ${round + 1}: ${options.dirtyFraction * 100} % scattered in ` +
            `${writeBlockBytes / 1024} KiB writes, then resync ...`);
          entry.partials.push(await scenario.partial(round * kPartialWriteBytes.length + index, writeBlockBytes));
        }
        options.log(`resync round ${round + 1}: anchor nbdcopy leg0 -> leg1 ...`);
        entry.anchor = await scenario.anchor();
        for (const partial of entry.partials) {
          partial.speedup = (entry.anchor.wallMs) / partial.resync.inSyncMs;
          if (partial.writeBlockBytes === kBlockBytes && entry.directIops !== null && entry.directIops > 0) {
            partial.directRatio = partial.writesPerSec / entry.directIops;
          }
        }
        options.log(`resync round ${round + 1}: full resync ...`);
        entry.full = await scenario.full();
        entry.fullThroughputRatio = entry.full.bytesPerSec / entry.anchor.bytesPerSec;
      } catch (error) {
        entry.error = describeError(error);
        options.log(`resync round ${round + 1} failed: ${entry.error}`);
        break; // the mirror's state is unknown now; later rounds would measure a mess
      }
    }
  } catch (error) {
    results.error = describeError(error);
    options.log(`resync failed: ${results.error}`);
  } finally {
    await scenario.stop().catch((error: unknown) => options.log(`resync cleanup: ${describeError(error)}`));
    results.logTail = scenario.logTail();
  }
  results.partialSpeedups = kPartialWriteBytes.map((writeBlockBytes) => ({
    writeBlockBytes,
    speedup: median(results.rounds.flatMap((round) => round.partials.flatMap((partial) =>
      (partial.writeBlockBytes === writeBlockBytes && partial.speedup !== null ? [partial.speedup] : [])))),
  }));
  const ratios = results.rounds.flatMap((round) => (round.fullThroughputRatio === null ? [] : [round.fullThroughputRatio]));
  results.partialSpeedup = results.partialSpeedups[0]?.speedup ?? null;
  results.fullThroughputRatio = median(ratios);
  results.directRatio = median(results.rounds.flatMap((round) => round.partials.flatMap((partial) =>
    (partial.directRatio === null ? [] : [partial.directRatio]))));
  results.met = {
    partialSpeedup: results.partialSpeedup === null ? null : results.partialSpeedup >= kResyncTargets.partialSpeedupMin,
    fullThroughputRatio: results.fullThroughputRatio === null
      ? null
      : results.fullThroughputRatio >= kResyncTargets.fullThroughputRatioMin,
    directRatio: results.directRatio === null ? null : results.directRatio >= kResyncTargets.directRatioMin,
  };
  const comparisons = results.rounds.flatMap((round) =>
    [...round.partials.map((partial) => partial.resync.comparison), round.full?.comparison].filter((entry): entry is LegComparison =>
      entry !== undefined && entry.status !== 'skipped'));
  results.legsEqual = comparisons.length === 0 ? null : comparisons.every((entry) => entry.status === 'equal');
  return results;
}
