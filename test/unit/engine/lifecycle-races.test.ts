/**
 * Races between the leg lifecycle's asynchronous steps (fence, reconnect, probe, resync copies,
 * read repair) and the synchronous state changes that happen while they await. Each test holds
 * chosen requests on a store (FaultStore.holdIf / hang), changes leg states while they are held,
 * lets them go (store.release()), and checks the mirror's promise or its liveness:
 *   (l1) an operator reconnect of a leg whose fence is being retried, when its own fence is not
 *        proven either: the leg still retries the fence (it does not stay `fencing` forever once
 *        the old connection drains).
 *
 * Threads: test main thread (the legs run inline over FaultStores, test/helpers/fault-device.ts).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { filled, legStates, makeStores, openFaultMirror, waitFor, waitLegState, within, type FaultStore } from '../../helpers/fault-device.js';

const kLegBytes = 256 * 1024;

test('(l1) an operator reconnect whose fence is not proven leaves the leg retrying the fence', async () => {
  const stores = makeStores(2, kLegBytes);
  const store1 = stores[1] as FaultStore;
  // Fence attempts of 100 ms, retried after ~500 ms: the test calls the reconnect between two.
  const fm = await openFaultMirror(stores, { fenceTimeoutMs: 100, reconnectMinMs: 500, reconnectMaxMs: 500 });
  const { mirror } = fm;
  try {
    store1.hang = true;
    assert.equal(await within(fm.driver.write(0, filled(4096, 1)), 5000, 'write'), 0, 'leg 0 holds the write');
    assert.ok(await waitFor(() => mirror.legStatus()[1]?.failureReason?.startsWith('cannot fence') === true, 5000), `leg 1's first fence is not proven: ${legStates(mirror).join(',')}`);
    // The lifecycle waits for its retry timer now; the operator's attempt fails too.
    assert.equal(await mirror.reconnectLegNow(1), 'fencing', 'the old connection still holds a request');
    // The old connection drains: the leg fences, reconnects and returns (by itself).
    store1.hang = false;
    store1.release();
    await waitLegState(mirror, 1, ['in-sync'], 'leg 1 after its old connection drained', 5000);
    const read = await fm.driver.read(0, 4096);
    assert.equal(read.errno, 0);
    assert.deepEqual(read.data, filled(4096, 1));
  } finally {
    await fm.close();
  }
});
