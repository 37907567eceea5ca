/**
 * Races between the engine's asynchronous verify / checkpoint work and the client I/O and leg
 * state changes that happen while it awaits. Each test holds chosen requests on a store
 * (FaultStore.holdIf), changes leg states or writes while they are held, lets them go
 * (store.release()), and checks the mirror's promise or its liveness:
 *   (v1) a verify READ on a leg whose failure is delivered late (the verify waits for the other
 *        leg's READ of the unit) while the leg failed and came back in sync meanwhile: the old
 *        failure does not fail the leg again in its new epoch;
 *   (v2) a verify repair rewrites a leg that the mirror could read the range from: a checkpoint
 *        created before marks the repaired range (what a client reads there may have changed,
 *        so `backup --since` must copy it).
 *
 * Threads: test main thread (the legs run inline over FaultStores, test/helpers/fault-device.ts;
 * the verify's hash pool runs one real worker thread).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as p from '../../../src/nbd/protocol.js';
import { kHashWorkerEntry } from '../../../src/cli/actor-entry.js';
import { filled, legStates, makeStores, openFaultMirror, waitFor, waitLegState, within, type FaultStore } from '../../helpers/fault-device.js';

/** One verify unit: the whole device (a verify READ is recognisable by its length). */
const kLegBytes = 256 * 1024;
const kVerify = { verify: { threads: 1, lanes: 1, workerEntry: kHashWorkerEntry } };

const isVerifyRead = (request: { command: number; lengthBytes: number }): boolean => request.command === p.kCmdRead && request.lengthBytes === kLegBytes;

test('(v1) a verify READ failure delivered after the leg failed and came back does not fail it again', async () => {
  const stores = makeStores(2, kLegBytes);
  const [store0, store1] = stores as [FaultStore, FaultStore];
  const fm = await openFaultMirror(stores, { legTimeoutMs: 60_000 }, kVerify);
  const { mirror } = fm;
  const context = (): string => ` (legs ${legStates(mirror).join(',')})`;
  try {
    assert.equal(await fm.driver.write(0, filled(4096, 1)), 0);
    store0.holdIf = isVerifyRead;
    store1.holdIf = isVerifyRead;
    mirror.startVerify();
    assert.ok(await waitFor(() => store0.heldCount === 1 && store1.heldCount === 1, 5000), `the verify READs are held on both legs${context()}`);
    store0.holdIf = null;
    store1.holdIf = null;
    // Leg 0 leaves: its verify READ fails now (the verify waits for leg 1's); it comes back.
    mirror.failLegByHand(0);
    store0.release();
    await mirror.reconnectLegNow(0);
    await waitLegState(mirror, 0, ['in-sync'], 'leg 0 back', 5000);
    const failures = fm.events.length;
    // Leg 1 answers: the unit's reads are settled; leg 0's old failure is from its old epoch.
    store1.release();
    await within(mirror.verifyDone(), 5000, 'verify', context);
    assert.equal(legStates(mirror)[0], 'in-sync', `leg 0 stays in sync${context()} (events since: ${JSON.stringify(fm.events.slice(failures))})`);
  } finally {
    await fm.close();
  }
});

test('(v2) a verify repair marks the repaired range in an active checkpoint', async () => {
  const stores = makeStores(2, kLegBytes);
  const [store0, store1] = stores as [FaultStore, FaultStore];
  const fm = await openFaultMirror(stores, { legTimeoutMs: 60_000 }, kVerify);
  const { mirror } = fm;
  try {
    const data = filled(kLegBytes, 2);
    assert.equal(await fm.driver.write(0, data), 0);
    const checkpoints = mirror.checkpointOperations();
    await checkpoints.create('c1');
    assert.deepEqual(checkpoints.runs('c1', 0, kLegBytes, 16), [], 'nothing changed since c1');
    // Leg 1's bytes change behind the mirror's back (a bad disk): reads served there differ.
    const bad = 128 * 1024;
    store1.bytes.fill(0xee, bad, bad + 4096);
    mirror.startVerify({ repair: true });
    await within(mirror.verifyDone(), 5000, 'verify');
    const progress = mirror.verifyStatus().current;
    assert.equal(progress?.repairedChunks, 1, 'the piece was repaired');
    assert.deepEqual(store1.bytes, store0.bytes, 'the legs agree after the repair');
    const runs = checkpoints.runs('c1', 0, kLegBytes, 16);
    assert.ok(runs.some((run) => run.offsetBytes <= bad && run.offsetBytes + run.lengthBytes >= bad + 4096), `c1 marks the repaired range (runs ${JSON.stringify(runs)})`);
  } finally {
    await fm.close();
  }
});
