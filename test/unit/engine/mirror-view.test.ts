/**
 * The engine's face (src/engine/view.ts) on a real MirrorDevice over fault legs (inline): the
 * ring counters and the slots snapshot while a write is held by a leg, a leg's bitmap snapshot
 * after writes it missed (runs, limit, clipping), leg states, leg stats by leg index (null once
 * removed); and legStatsWithin (src/engine/snapshots.ts) on stand-in legs: an actor that never
 * answers gets null within the timeout, a dead one zeros at once.
 * Threads: test main thread (the legs run inline).
 */
import { afterEach, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as p from '../../../src/nbd/protocol.js';
import type { Leg } from '../../../src/engine/leg.js';
import type { LegStats } from '../../../src/engine/messages.js';
import { legStatsWithin } from '../../../src/engine/snapshots.js';
import type { MirrorOperations, MirrorView } from '../../../src/engine/view.js';
import { makeStores, openFaultMirror, waitFor, type FaultMirror, type FaultStore } from '../../helpers/fault-device.js';

const kKiB = 1024;
const kDeviceBytes = 256 * kKiB;
const kSettleMs = 10_000;

let open: FaultMirror | null = null;
afterEach(async () => {
  await open?.close();
  open = null;
});

function codeOf(error: unknown): string | undefined {
  return typeof error === 'object' && error !== null && 'code' in error ? String((error as { code: unknown }).code) : undefined;
}

describe('MirrorView on a MirrorDevice', () => {
  test('ring counters and the slots snapshot list a write a leg holds, and nothing once it is answered', async () => {
    const stores = makeStores(2, kDeviceBytes);
    const storeB = stores[1] as FaultStore;
    open = await openFaultMirror(stores, { legTimeoutMs: 0 });
    const view: MirrorView = open.mirror; // MirrorDevice implements the view
    const idle = view.ringCounters();
    assert.deepEqual(idle, { slotCount: 32, slotBytes: 64 * kKiB, freeCount: 32, inUse: 0 });
    assert.deepEqual(view.slotsSnapshot(32).requests, []);

    storeB.hang = true;
    const written = open.driver.write(20 * kKiB, new Uint8Array(8 * kKiB).fill(7));
    assert.ok(await waitFor(() => storeB.heldCount === 1, kSettleMs), 'leg B holds the write');
    const busy = view.slotsSnapshot(32);
    assert.equal(busy.inUse, 1);
    assert.equal(busy.freeCount, 31);
    assert.deepEqual(busy.requests, [{ slot: busy.requests[0]?.slot, state: 'dispatched', command: p.kCmdWrite, offsetBytes: 20 * kKiB, lengthBytes: 8 * kKiB, spanSlots: 1 }]);
    assert.deepEqual(view.slotsSnapshot(0).requests, [], 'a limit of 0 lists nothing');
    assert.deepEqual(view.ringCounters(), { slotCount: 32, slotBytes: 64 * kKiB, freeCount: 31, inUse: 1 });

    storeB.hang = false;
    assert.equal(storeB.release(), 1);
    assert.equal(await written, 0, 'the write succeeds on both legs');
    assert.deepEqual(view.slotsSnapshot(32).requests, []);
    assert.deepEqual(busy.requests.length, 1, 'an earlier snapshot is a copy: it does not change');
    assert.equal(view.ringCounters().inUse, 0);
  });

  test('a leg out of the set: its bitmap snapshot lists the runs it missed, up to the limit; leg states and stats follow', async () => {
    const stores = makeStores(2, kDeviceBytes);
    open = await openFaultMirror(stores);
    const mirror: MirrorOperations = open.mirror;
    assert.equal(mirror.legState(0), 'in-sync');
    assert.equal(mirror.legState(7), null, 'no such leg');
    assert.deepEqual(mirror.bitmapSnapshot(1, 8)?.firstRuns, [], 'nothing missed yet');

    mirror.failLegByHand(1, 'the test takes it out');
    assert.notEqual(mirror.legState(1), 'in-sync');
    assert.equal(await open.driver.write(12 * kKiB, new Uint8Array(8 * kKiB).fill(1)), 0);
    assert.equal(await open.driver.write(64 * kKiB, new Uint8Array(4 * kKiB).fill(2)), 0);
    assert.equal(await open.driver.write(kDeviceBytes - 4 * kKiB, new Uint8Array(4 * kKiB).fill(3)), 0);

    const missed = mirror.bitmapSnapshot(1, 8);
    assert.ok(missed !== null);
    assert.deepEqual(missed.firstRuns, [
      { offsetBytes: 12 * kKiB, lengthBytes: 8 * kKiB },
      { offsetBytes: 64 * kKiB, lengthBytes: 4 * kKiB },
      { offsetBytes: kDeviceBytes - 4 * kKiB, lengthBytes: 4 * kKiB },
    ]);
    assert.equal(missed.leg, 1);
    assert.equal(missed.dirtyBytes, 16 * kKiB);
    assert.equal(missed.dirtyChunks, 4);
    assert.equal(missed.deviceBytes, kDeviceBytes);
    assert.equal(missed.chunkBytes, 4 * kKiB);
    assert.deepEqual(mirror.bitmapSnapshot(1, 1)?.firstRuns, [{ offsetBytes: 12 * kKiB, lengthBytes: 8 * kKiB }], 'runsMax 1 lists the first run only');
    assert.equal(mirror.bitmapSnapshot(0, 8)?.dirtyBytes, 0, 'the in-sync leg missed nothing');
    assert.throws(() => mirror.bitmapSnapshot(7, 8), (error) => codeOf(error) === 'ENBD_ERR_REFUSED');

    const stats = await mirror.legStats(5000);
    assert.equal(stats.length, 2);
    assert.equal(stats[0]?.index, 0);
    assert.ok((stats[0]?.requests ?? 0) >= 3, `leg 0 served the three writes (requests ${stats[0]?.requests})`);
    assert.equal(stats[1]?.index, 1);

    await mirror.removeLeg(1);
    assert.equal(mirror.legState(1), 'removed');
    assert.deepEqual((await mirror.legStats(5000)).map((entry) => entry === null), [false, true], 'a removed leg has no stats');
  });
});

describe('legStatsWithin', () => {
  const counters: LegStats = { requests: 5, bytesRead: 0, bytesWritten: 4096, errors: 0, inFlight: 0, connected: true, latencySumMs: 1, latencyCount: 5 };

  function standIn(index: number, state: string, stats: () => Promise<LegStats>, thread: 'inline' | 'dead'): Leg {
    const worker = thread === 'dead' ? { threadId: -1 } : null;
    const inline = thread === 'inline' ? {} : null;
    return { index, state, inline, worker, api: { stats } } as unknown as Leg;
  }

  test('by leg index: an answer, null for a removed leg, an actor that never answers or fails, zeros for a dead one', async () => {
    let asked = 0;
    const never = async (): Promise<LegStats> => {
      asked += 1;
      return await new Promise<LegStats>(() => undefined);
    };
    const legs = [
      standIn(0, 'in-sync', async () => counters, 'inline'),
      standIn(1, 'removed', never, 'inline'),
      standIn(2, 'in-sync', never, 'inline'),
      standIn(3, 'degraded', async () => await Promise.reject(new Error('actor gone')), 'inline'),
      standIn(4, 'in-sync', never, 'dead'),
    ];
    const stats = await legStatsWithin(legs, 50);
    assert.deepEqual(stats[0], { ...counters, index: 0 });
    assert.equal(stats[1], null, 'removed');
    assert.equal(stats[2], null, 'no answer within the timeout');
    assert.equal(stats[3], null, 'failed');
    assert.equal(stats[4]?.connected, false, 'a dead actor answers zeros');
    assert.equal(stats[4]?.requests, 0);
    assert.equal(stats[4]?.index, 4);
    assert.equal(asked, 1, 'only the live leg that hangs was asked (not the removed or dead one)');
  });
});
