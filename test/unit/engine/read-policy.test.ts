/**
 * Read policy, write-mostly legs and write-behind (issue 14), at the engine level: the
 * ReadChooser alone (which leg each policy picks), then a MirrorDevice (inline) over fault
 * legs (test/helpers/fault-device.ts): reads counted per leg by the engine's status, a
 * write-mostly leg that serves reads only when it is the only one left, and write-behind with
 * a held (hanging) or dropped slow leg: every acknowledged write reads back, a leg behind never
 * serves the ranges it lags on, and the legs end byte-identical.
 *
 * Threads: test main thread (the legs run inline). Nothing asserts a duration; deadlines are for
 * waiting only.
 */
import { afterEach, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { ReadChooser, parseReadPolicy, type ReadCandidate } from '../../../src/engine/read-policy.js';
import type { MirrorOptions } from '../../../src/engine/mirror.js';
import { legStates, makeStores, openFaultMirror, waitFor, filled, answeredAfterRelease, type FaultMirror } from '../../helpers/fault-device.js';
import { assertSameBytes } from '../../helpers/mirror.js';

const kKiB = 1024;
const kDeviceBytes = 256 * kKiB;
const kSettleMs = 10_000;

function legsOf(inFlight: number[]): ReadCandidate[] {
  return inFlight.map((count, index) => ({ index, bit: 1 << index, inFlight: count }));
}

describe('ReadChooser', () => {
  test('primary picks the first eligible leg, round-robin takes turns, least-pending the fewest in flight', () => {
    const legs = legsOf([3, 0, 1]);
    const primary = new ReadChooser('primary');
    for (let round = 0; round < 5; round += 1) assert.equal(primary.pick(legs, () => true)?.index, 0);
    assert.equal(primary.pick(legs, (leg) => leg.index !== 0)?.index, 1, 'the first eligible one');
    const roundRobin = new ReadChooser('round-robin');
    const seen = new Map<number, number>();
    for (let round = 0; round < 30; round += 1) {
      const index = roundRobin.pick(legs, () => true)?.index ?? -1;
      seen.set(index, (seen.get(index) ?? 0) + 1);
    }
    assert.deepEqual([...seen.keys()].sort(), [0, 1, 2], 'every leg gets turns');
    for (const count of seen.values()) assert.equal(count, 10, 'equal turns');
    const least = new ReadChooser('least-pending');
    for (let round = 0; round < 5; round += 1) assert.equal(least.pick(legs, () => true)?.index, 1);
    assert.equal(least.pick(legs, () => false), null, 'nothing eligible: null');
  });

  test('latency picks the lowest recent latency, spreads over equally fast legs, and refreshes a stale estimate', () => {
    const chooser = new ReadChooser('latency');
    const legs = legsOf([0, 0]);
    chooser.onReadDone(0, 0.2, 1000);
    chooser.onReadDone(1, 5, 1000);
    for (let round = 0; round < 10; round += 1) assert.equal(chooser.pick(legs, () => true, 1001)?.index, 0);
    // Sampled with 40 in flight, 0.2 ms is what a read takes behind such a queue.
    const queued = new ReadChooser('latency');
    for (let round = 0; round < 40; round += 1) queued.onReadDone(0, 0.2, 1000, 39);
    queued.onReadDone(1, 5, 1000);
    assert.equal(queued.pick(legsOf([40, 0]), () => true, 1001)?.index, 0, 'a slow leg is not picked for the fast one\'s usual queue');
    assert.equal(chooser.pick(legsOf([40, 0]), () => true, 1001)?.index, 1, 'but for 40 times the queue its estimate was taken at');
    chooser.onReadDone(1, 0.22, 1000);
    chooser.onReadDone(1, 0.22, 1000);
    for (let round = 0; round < 40; round += 1) chooser.onReadDone(1, 0.22, 1000);
    assert.equal(chooser.pick(legsOf([4, 1]), () => true, 1001)?.index, 1, 'about as fast: the less loaded one');
    const stale = new ReadChooser('latency');
    stale.onReadDone(0, 0.2, 1000);
    stale.onReadDone(1, 5, 1000);
    stale.onReadDone(0, 0.2, 1400);
    assert.equal(stale.pick(legs, () => true, 1500)?.index, 1, 'a stale estimate gets one probe');
    assert.equal(stale.pick(legs, () => true, 1500)?.index, 0, 'then the fast leg again');
    assert.equal(stale.reads[0], 2);
  });

  test('latency weighs the queue: a burst spreads by expected completion time instead of all going to one leg', () => {
    const chooser = new ReadChooser('latency');
    chooser.onReadDone(0, 1, 1000); // sampled idle: 1 ms per read
    chooser.onReadDone(1, 4, 1000); // sampled idle: 4 ms per read
    const legs = legsOf([0, 0]) as Array<{ index: number; bit: number; inFlight: number }>;
    for (let round = 0; round < 20; round += 1) {
      const leg = chooser.pick(legs, () => true, 1001);
      assert.ok(leg !== null);
      (legs[leg.index] as { inFlight: number }).inFlight += 1;
    }
    const [fast, slow] = legs.map((leg) => leg.inFlight) as [number, number];
    // Expected completion (in flight + 1) x estimate: about 4 reads on the fast leg per slow one.
    assert.ok(slow >= 2 && slow <= 6, `the slow leg got ${slow} of 20 (fast ${fast})`);
    assert.ok(fast > slow * 2, 'most of the burst went to the fast leg');
  });

  test('a write-mostly leg is picked only when no other leg is eligible', () => {
    for (const policy of ['least-pending', 'round-robin', 'primary', 'latency'] as const) {
      const chooser = new ReadChooser(policy, [0]);
      const legs = legsOf([5, 9]);
      for (let round = 0; round < 6; round += 1) assert.equal(chooser.pick(legs, () => true)?.index, 1, `${policy}: not the write-mostly leg`);
      assert.equal(chooser.pick(legs, (leg) => leg.index === 0)?.index, 0, `${policy}: the write-mostly leg when it is the only one`);
    }
  });

  test('parseReadPolicy names the choices', () => {
    assert.equal(parseReadPolicy('--read-policy', 'latency'), 'latency');
    assert.throws(() => parseReadPolicy('--read-policy', 'fastest'), /least-pending, round-robin, primary, latency/);
  });
});

describe('read policy and slow legs over fault legs', () => {
  let open: FaultMirror | null = null;
  afterEach(async () => {
    await open?.close();
    open = null;
  });

  async function start(count: number, extra: Partial<MirrorOptions>): Promise<FaultMirror> {
    open = await openFaultMirror(makeStores(count, kDeviceBytes), { legTimeoutMs: 5000, probeTimeoutMs: 2000 }, extra);
    return open;
  }

  function reads(mirror: FaultMirror['mirror']): number[] {
    return mirror.legStatus().map((leg) => leg.reads ?? 0);
  }

  async function readMany(run: FaultMirror, count: number, parallel: number): Promise<void> {
    for (let done = 0; done < count; done += parallel) {
      const batch = [];
      for (let index = 0; index < parallel; index += 1) batch.push(run.driver.read(((done + index) * 4 * kKiB) % kDeviceBytes, 4 * kKiB));
      for (const result of await Promise.all(batch)) assert.equal(result.errno, 0);
    }
  }

  test('primary reads from leg 0 only; round-robin spreads reads evenly', async () => {
    let run = await start(2, { readPolicy: 'primary' });
    await readMany(run, 40, 4);
    assert.deepEqual(reads(run.mirror), [40, 0]);
    run.mirror.setReadPolicy('round-robin');
    await readMany(run, 40, 1);
    assert.deepEqual(reads(run.mirror), [60, 20], 'round-robin alternates');
    await run.close();
    open = null;
    run = await start(3, { readPolicy: 'round-robin' });
    await readMany(run, 60, 3);
    assert.deepEqual(reads(run.mirror), [20, 20, 20]);
  });

  test('latency sends reads to the fast leg', async () => {
    const run = await start(2, { readPolicy: 'latency' });
    (run.stores[1] as FaultMirror['stores'][number]).slowMs = 20;
    await readMany(run, 200, 4);
    const [fast, slow] = reads(run.mirror) as [number, number];
    assert.ok(fast >= 0.9 * (fast + slow), `the fast leg served ${fast} of ${fast + slow} reads`);
    assert.ok((run.mirror.legStatus()[1]?.readLatencyMs ?? 0) > (run.mirror.legStatus()[0]?.readLatencyMs ?? 0), 'the slow leg\'s estimate is higher');
  });

  test('a write-mostly leg serves no reads while the other leg is in sync, and all reads when it is the only one', async () => {
    const run = await start(2, { writeMostly: [1] });
    const data = filled(64 * kKiB, 3);
    assert.equal(await run.driver.write(0, data), 0);
    await readMany(run, 40, 4);
    assert.deepEqual(reads(run.mirror), [40, 0]);
    run.mirror.failLegByHand(0);
    const read = await run.driver.read(0, data.length);
    assert.equal(read.errno, 0);
    assertSameBytes(read.data as Uint8Array, data, 'leg 1 serves the data');
    await readMany(run, 20, 4);
    assert.deepEqual(reads(run.mirror), [40, 21]);
    assert.equal(run.mirror.legStatus()[1]?.writeMostly, true);
  });

  test('write-behind: writes are acknowledged while the write-mostly leg holds them; it serves none of the ranges it lags on; it catches up', async () => {
    const run = await start(2, { writeMostly: [1], writeBehindBytes: 1024 * kKiB, readPolicy: 'primary' });
    const [storeA, storeB] = run.stores as [FaultMirror['stores'][number], FaultMirror['stores'][number]];
    storeB.hang = true; // leg 1 holds every request unanswered
    const writes: Array<[number, Uint8Array]> = [];
    for (let index = 0; index < 6; index += 1) {
      const data = filled(8 * kKiB, 10 + index);
      writes.push([index * 32 * kKiB, data]);
      assert.equal(await run.driver.write(index * 32 * kKiB, data), 0, `write ${index} acknowledged while leg 1 holds it`);
    }
    const status = run.mirror.legStatus()[1];
    assert.equal(status?.state, 'in-sync');
    assert.equal(status?.behindBytes, 6 * 8 * kKiB, 'leg 1 is behind by every write');
    assert.ok(storeB.heldCount > 0, 'leg 1 got the writes and holds them');
    for (const [offset] of writes) assert.deepEqual(run.mirror.readableLegs(offset, 8 * kKiB), [0], 'a range leg 1 lags on is readable from leg 0 only');
    run.mirror.setReadPolicy('primary');
    storeB.hang = false;
    storeB.release();
    assert.ok(await waitFor(() => (run.mirror.legStatus()[1]?.behindBytes ?? -1) === 0, kSettleMs), 'leg 1 caught up');
    assert.equal(run.mirror.dirtyMap(1)?.dirtyBytes(), 0, 'nothing marked any more');
    for (const [offset, data] of writes) assert.deepEqual(run.mirror.readableLegs(offset, data.length), [0, 1]);
    assertSameBytes(storeA.bytes, storeB.bytes, 'legs identical');
    assert.ok((run.mirror.legStatus()[1]?.deferredWrites ?? 0) >= 6);
  });

  test('write-behind: the slow leg dropped while behind loses nothing: acknowledged writes read back, it resyncs and the legs are identical', async () => {
    const run = await start(2, { writeMostly: [1], writeBehindBytes: 1024 * kKiB });
    const [storeA, storeB] = run.stores as [FaultMirror['stores'][number], FaultMirror['stores'][number]];
    storeB.hang = true;
    const writes: Array<[number, Uint8Array]> = [];
    for (let index = 0; index < 8; index += 1) {
      const data = filled(12 * kKiB, 30 + index);
      writes.push([index * 24 * kKiB + 512, data]);
      assert.equal(await run.driver.write(index * 24 * kKiB + 512, data), 0);
    }
    storeB.drop('killed by the test'); // its held writes are lost
    storeB.hang = false;
    await waitFor(() => legStates(run.mirror)[1] !== 'in-sync', kSettleMs);
    for (const [offset, data] of writes) {
      const read = await run.driver.read(offset, data.length);
      assert.equal(read.errno, 0);
      assertSameBytes(read.data as Uint8Array, data, `acknowledged write at ${offset}`);
    }
    assert.ok(await waitFor(() => legStates(run.mirror).every((state) => state === 'in-sync'), kSettleMs), `both in sync again (${legStates(run.mirror).join(', ')})`);
    assertSameBytes(storeA.bytes, storeB.bytes, 'legs identical after the resync');
  });

  test('write-behind bound: beyond it writes wait for the slow leg (acknowledged once it has them)', async () => {
    const run = await start(2, { writeMostly: [1], writeBehindBytes: 16 * kKiB });
    const storeB = run.stores[1] as FaultMirror['stores'][number];
    storeB.hang = true;
    assert.equal(await run.driver.write(0, filled(16 * kKiB, 50)), 0, 'within the bound: acknowledged at once');
    const beyond = await answeredAfterRelease(storeB, run.driver.write(64 * kKiB, filled(4 * kKiB, 51)));
    assert.equal(beyond.heldBack, true, 'beyond the bound the write waits for leg 1');
    assert.equal(beyond.errno, 0);
    assert.ok(await waitFor(() => (run.mirror.legStatus()[1]?.behindBytes ?? -1) === 0, kSettleMs));
    assertSameBytes(run.stores[0]?.bytes as Uint8Array, storeB.bytes, 'legs identical');
  });
});
