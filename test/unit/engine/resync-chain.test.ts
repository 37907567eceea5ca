/**
 * Chained resync copies (src/ring/chain-inbox.ts): the READ leg's actor hands a copy straight to
 * the target leg's actor as a WRITE. Engine over fault legs (inline placement, the same actor
 * code as workers): the copies are chained and the legs end byte-equal, adjacent dirty chunks
 * go in one copy; a target that fails while chained WRITEs are in flight keeps its bits (no
 * clear from a copy of an earlier epoch) and resyncs once back; a client write racing a chained
 * copy of its range waits for it and wins on both legs. Plus the inbox itself across threads
 * is exercised by the model test; here its lost-wakeup rule on one thread.
 * Thread: test main thread.
 */
import { afterEach, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { ChainInboxes } from '../../../src/ring/chain-inbox.js';
import { SpscQueue } from '../../../src/ring/spsc-queue.js';
import { makeStores, openFaultMirror, waitFor, waitLegState, legStates, filled, type FaultMirror, type FaultStore } from '../../helpers/fault-device.js';
import { assertSameBytes } from '../../helpers/mirror.js';

const kKiB = 1024;
const kDeviceBytes = 1024 * kKiB;
const kSettleMs = 20_000;

let open: FaultMirror | null = null;
afterEach(async () => {
  await open?.close();
  open = null;
});

/** Two fault legs A and B, no request timeout, no resync gaps; B failed by hand (its writes go dirty). */
async function openWithLegBOut(): Promise<Pick<FaultMirror, 'mirror' | 'driver'> & { storeA: FaultStore; storeB: FaultStore }> {
  const stores = makeStores(2, kDeviceBytes);
  const [storeA, storeB] = stores as [FaultStore, FaultStore];
  open = await openFaultMirror(stores, { legTimeoutMs: 0 }, { resyncGapBytes: 0 });
  open.mirror.failLegByHand(1, 'test');
  return { mirror: open.mirror, driver: open.driver, storeA, storeB };
}

async function waitLeg(mirror: FaultMirror['mirror'], leg: number, state: string, what: string): Promise<void> {
  await waitLegState(mirror, leg, [state], what, kSettleMs);
}

describe('chained resync copies', () => {
  test('copies are chained, adjacent dirty chunks go in one copy, legs end byte-equal', async () => {
    for (const chain of [true, false]) {
      const stores = makeStores(2, kDeviceBytes);
      open = await openFaultMirror(stores, {}, { resyncChain: chain, resyncGapBytes: 0 });
      const { mirror, driver } = open;
      mirror.failLegByHand(1, 'test');
      // 8 runs of 4 adjacent 4 KiB writes (each run is one copy) + 8 lone blocks.
      for (let run = 0; run < 8; run += 1) {
        for (let block = 0; block < 4; block += 1) {
          const offset = run * 64 * kKiB + block * 4 * kKiB;
          assert.equal(await driver.write(offset, filled(4 * kKiB, run * 4 + block + 1)), 0);
        }
        assert.equal(await driver.write(600 * kKiB + run * 16 * kKiB, filled(4 * kKiB, 100 + run)), 0);
      }
      const before = mirror.stats().resyncWrites ?? { total: 0, chained: 0 };
      await mirror.reconnectLegNow(1);
      await waitLeg(mirror, 1, 'in-sync', 'resync done');
      const after = mirror.stats().resyncWrites ?? { total: 0, chained: 0 };
      const writes = after.total - before.total;
      assert.equal(writes, 16, `one copy per dirty run (8 runs of 4 chunks, 8 lone chunks), chain ${chain}`);
      assert.equal(after.chained - before.chained, chain ? 16 : 0, 'every copy chained when on, none when off');
      assertSameBytes(stores[0]?.bytes as Uint8Array, stores[1]?.bytes as Uint8Array, `legs after resync (chain ${chain})`);
      assert.equal(mirror.legStatus()[1]?.dirtyBytes, 0);
      await open.close();
      open = null;
    }
  });

  test('a target that fails while chained WRITEs are in flight keeps its bits and resyncs once back', async () => {
    const { storeA, storeB, mirror, driver } = await openWithLegBOut();
    for (let block = 0; block < 16; block += 1) assert.equal(await driver.write(block * 32 * kKiB, filled(4 * kKiB, block + 1)), 0);
    const dirty = mirror.legStatus()[1]?.dirtyBytes ?? 0;
    assert.equal(dirty, 16 * 4 * kKiB);
    mirror.pauseResync(true);
    await mirror.reconnectLegNow(1);
    await waitLeg(mirror, 1, 'resyncing', 'B back, resync paused');
    storeB.hang = true; // the chained WRITEs reach B's server and stay there
    mirror.pauseResync(false);
    assert.ok(await waitFor(() => storeB.heldCount >= 16, kSettleMs), `B holds the chained WRITEs (${storeB.heldCount})`);
    assert.equal(storeA.heldCount, 0, 'the READs on A completed');
    assert.ok((mirror.stats().resyncWrites?.chained ?? 0) === 0, 'no copy completed yet');
    storeB.drop('test: B dies with chained WRITEs in flight');
    await waitFor(() => legStates(mirror)[1] !== 'resyncing', kSettleMs);
    assert.notEqual(legStates(mirror)[1], 'resyncing', 'B left');
    assert.equal(mirror.legStatus()[1]?.dirtyBytes, dirty, 'no bit was cleared by a copy whose WRITE failed');
    assert.equal(legStates(mirror)[0], 'in-sync');
    storeB.heal();
    storeB.release(); // whatever B still held is discarded with its dropped connection or lands late
    await mirror.reconnectLegNow(1);
    await waitLeg(mirror, 1, 'in-sync', 'B resynced after its return');
    assertSameBytes(storeA.bytes, storeB.bytes, 'legs after the second resync');
  });

  test('a client write racing a chained copy of its range waits for it and wins on both legs', async () => {
    const { storeA, storeB, mirror, driver } = await openWithLegBOut();
    const offset = 256 * kKiB;
    assert.equal(await driver.write(offset, filled(16 * kKiB, 1)), 0);
    mirror.pauseResync(true);
    await mirror.reconnectLegNow(1);
    await waitLeg(mirror, 1, 'resyncing', 'B back, resync paused');
    storeA.hang = true; // the copy's READ waits on A, holding the range lock
    mirror.pauseResync(false);
    assert.ok(await waitFor(() => storeA.heldCount === 1, kSettleMs), 'the copy READ is held on A');
    const newer = filled(8 * kKiB, 2);
    let clientDone = false;
    const client = driver.write(offset + 4 * kKiB, newer).then((errno) => {
      clientDone = true;
      return errno;
    });
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(clientDone, false, 'the client write waits for the copy of its range');
    storeA.hang = false;
    storeA.release();
    assert.equal(await client, 0);
    await waitLeg(mirror, 1, 'in-sync', 'resync done');
    const expected = filled(16 * kKiB, 1);
    expected.set(newer, 4 * kKiB);
    assertSameBytes(storeA.bytes.subarray(offset, offset + 16 * kKiB), expected, 'A holds the client write over the copy');
    assertSameBytes(storeB.bytes.subarray(offset, offset + 16 * kKiB), expected, 'B holds the client write over the copy');
    assert.equal(mirror.stats().resyncWrites?.chained, 1, 'the copy was chained');
    assertSameBytes(storeA.bytes, storeB.bytes, 'legs after resync');
  });

  test('inbox: posts before a sleep are found, a post after the snapshot fails the wait', async () => {
    const inboxes = ChainInboxes.create(64);
    const seen: number[] = [];
    inboxes.post(3, 5);
    inboxes.post(3, 40);
    inboxes.ring(3);
    let snapshot = inboxes.snapshot(3);
    assert.equal(inboxes.drain(3, (slot) => seen.push(slot)), 2);
    assert.deepEqual(seen.sort((a, b) => a - b), [5, 40]);
    assert.equal(inboxes.drain(4, (slot) => seen.push(slot)), 0, 'another leg\'s inbox is empty');
    // A post between the snapshot and the wait: the wait does not sleep.
    inboxes.post(3, 63);
    inboxes.ring(3);
    assert.equal(inboxes.waitAsync(3, snapshot), null);
    snapshot = inboxes.snapshot(3);
    assert.equal(inboxes.drain(3, (slot) => seen.push(slot)), 1);
    const wait = inboxes.waitAsync(3, snapshot);
    assert.ok(wait !== null, 'nothing new: it sleeps');
    assert.equal(inboxes.waitAsync(3, snapshot), wait, 'a second sleep reuses the pending wait');
    inboxes.post(3, 0);
    assert.equal(inboxes.ring(3), true, 'a sleeping consumer is notified');
    assert.equal(await wait, 'ok');
    assert.equal(inboxes.drain(3, (slot) => seen.push(slot)), 1);
    assert.deepEqual(seen, [5, 40, 63, 0]);
  });

  test('dispatch queue: a sleep while an earlier wait is pending reuses it and is still woken', async () => {
    const queue = SpscQueue.create(8);
    const first = queue.waitAsync();
    assert.ok(first !== null);
    // Woken by something else (the inbox): drain finds nothing, then sleep again.
    assert.equal(queue.drain(() => undefined, 8), 0);
    const second = queue.waitAsync();
    assert.equal(second, first, 'no second waiter on the word');
    assert.equal(queue.consumerSleeping, true, 'sleeping announced again, so the producer notifies');
    assert.equal(queue.push(7), true);
    assert.equal(await second, 'ok');
    const seen: number[] = [];
    assert.equal(queue.drain((value) => seen.push(value), 8), 1);
    assert.deepEqual(seen, [7]);
    const third = queue.waitAsync();
    assert.ok(third !== null && third !== first, 'a new sleep after the wait resolved gets a new wait');
    queue.push(8);
    assert.equal(await third, 'ok');
  });
});
