/**
 * The copies behind MirrorView (src/engine/view.ts): a slots snapshot read from the ring's
 * descriptors, a bitmap snapshot of one leg's dirty map, the leg actors' counters with a
 * timeout. MirrorDevice delegates to these functions so that it stays the only holder of the
 * ring and the legs, and control and metrics only ever see plain data.
 *
 * Thread: main thread (the ring's master view, the legs' records).
 *
 * Bounds: a slots snapshot reads at most slotCount descriptors and lists at most `limit`; a
 * bitmap snapshot lists at most `runsMax` runs; legStatsWithin settles within `timeoutMs`.
 */
import { assert } from '../core/assert.js';
import type { DirtyMap } from '../bitmap/dirty-map.js';
import type { RequestRing } from '../ring/request-ring.js';
import { kSlotStateAllocated, kSlotStateDispatched } from '../ring/layout.js';
import type { Leg } from './leg.js';
import type { LegStats } from './messages.js';
import type { BitmapSnapshot } from '../core/status-types.js';

export type { BitmapSnapshot };

/** The ring's counters (RequestRing's, copied). */
export interface RingCounters {
  slotCount: number;
  slotBytes: number;
  freeCount: number;
  /** Live allocations: requests holding a run of slots. */
  inUse: number;
}

/** One ring slot that holds a request, as its descriptor said when the snapshot was taken. */
export interface SlotSnapshot {
  /** The first slot of the request's run. */
  slot: number;
  state: 'allocated' | 'dispatched';
  /** NBD command number (src/nbd/protocol.ts names it). */
  command: number;
  offsetBytes: number;
  lengthBytes: number;
  spanSlots: number;
}

export interface SlotsSnapshot extends RingCounters {
  /** In slot order, at most the limit asked for. */
  requests: SlotSnapshot[];
}

/**
 * The live engine objects, named as the REPL shows them: `mirror` (the MirrorDevice), `ring`
 * (its RequestRing), `legs` (its Leg records), `dirtyMap(i)` (leg i's DirtyMap).
 * Debug only: for `enbd repl`, never for control or metrics code (their types are the
 * engine's business, and touching them can break the engine's invariants).
 */
export type MirrorDebugHandles = Readonly<Record<'mirror' | 'ring' | 'legs' | 'dirtyMap', unknown>>;

/** The longest run one nextDirtyRun call returns (chunks), as the resync walks it. */
const kRunChunksMax = 1 << 20;

export function ringCountersOf(ring: RequestRing): RingCounters {
  return { slotCount: ring.slotCount, slotBytes: ring.slotBytes, freeCount: ring.freeCount, inUse: ring.inUse };
}

/** The first `limit` slots whose state is Allocated or Dispatched, in slot order. */
export function slotsSnapshotOf(ring: RequestRing, limit: number): SlotsSnapshot {
  assert(ring.isMaster, 'the mirror owns the master view of its ring');
  assert(Number.isInteger(limit) && limit >= 0, 'limit is a non-negative integer');
  const requests: SlotSnapshot[] = [];
  for (let slot = 0; slot < ring.slotCount && requests.length < limit; slot += 1) {
    const state = ring.state(slot);
    if (state !== kSlotStateAllocated && state !== kSlotStateDispatched) continue;
    requests.push({
      slot,
      state: state === kSlotStateAllocated ? 'allocated' : 'dispatched',
      command: ring.command(slot),
      offsetBytes: ring.offsetBytes(slot),
      lengthBytes: ring.lengthBytes(slot),
      spanSlots: ring.spanSlots(slot),
    });
  }
  return { ...ringCountersOf(ring), requests };
}

/** A dirty map's counters and its first `runsMax` dirty runs in bytes (clipped to the device). */
export function bitmapSnapshotOf(leg: number, map: DirtyMap, runsMax: number): BitmapSnapshot {
  assert(Number.isInteger(runsMax) && runsMax >= 0, 'runsMax is a non-negative integer');
  const stats = map.stats();
  const firstRuns: BitmapSnapshot['firstRuns'] = [];
  let chunk = 0;
  while (firstRuns.length < runsMax) {
    const run = map.nextDirtyRun(chunk, kRunChunksMax);
    if (run === null) break;
    const offsetBytes = run.firstChunk * stats.chunkBytes;
    firstRuns.push({ offsetBytes, lengthBytes: Math.min(run.chunkCount * stats.chunkBytes, stats.deviceBytes - offsetBytes) });
    chunk = run.firstChunk + run.chunkCount;
  }
  return {
    leg,
    deviceBytes: stats.deviceBytes,
    chunkBytes: stats.chunkBytes,
    dirtyBytes: stats.dirtyBytes,
    dirtyChunks: stats.dirtyChunks,
    pagesInUse: stats.pagesInUse,
    poolPages: stats.poolPages,
    freePages: stats.freePages,
    sentinelPages: stats.sentinelPages,
    memoryBytes: stats.memoryBytes,
    firstRuns,
  };
}

const kZeroStats: Readonly<LegStats> = { requests: 0, bytesRead: 0, bytesWritten: 0, errors: 0, inFlight: 0, connected: false, latencySumMs: 0, latencyCount: 0 };

/** Resolves with the promise's value, or null when it rejects or has not settled within `timeoutMs`. */
async function within<T>(promise: Promise<T>, timeoutMs: number): Promise<T | null> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<null>((resolve) => {
    timer = setTimeout(() => resolve(null), timeoutMs);
  });
  try {
    return await Promise.race([promise.catch(() => null), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Each leg actor's counters by position in `legs` (`index` says which leg): null for a removed
 * leg and one that fails or does not answer within `timeoutMs` (Infinity: no limit); zeros at
 * once for a leg without a live actor (removed from its thread, or the thread died).
 */
export async function legStatsWithin(legs: readonly Leg[], timeoutMs: number): Promise<Array<LegStats | null>> {
  assert(timeoutMs > 0, 'timeoutMs is positive');
  return await Promise.all(legs.map(async (leg) => {
    if (leg.state === 'removed') return null;
    const live = leg.inline !== null || (leg.worker !== null && leg.worker.threadId >= 0);
    if (!live) return { ...kZeroStats, index: leg.index };
    const answer = leg.api.stats().then((stats) => ({ ...stats, index: leg.index }));
    if (timeoutMs === Number.POSITIVE_INFINITY) return await answer;
    return await within(answer, timeoutMs);
  }));
}
