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
 *        so `backup --since` must copy it);
 *   (v3) a checkpoint created while a client write is parked on its write intent (the keeper's
 *        page write held): the checkpoint marks the write (passes: the resumed dispatch marks
 *        every active checkpoint again);
 *   (v4) a freeze while a write is held on one leg: the frozen and the new checkpoint both mark
 *        it, a later write only the new one (passes: the freeze seeds the new map);
 *   (v5) a verify of three legs on a ring smaller than three 1 MiB runs: it ends (it waited for
 *        slots forever, and so did `verify stop` and the mirror's close) and compares every
 *        byte (the unit shrinks to fit the ring);
 *   (v6) a client WRITE and WRITE_ZEROES into a unit whose repair WRITE is held on the leg being
 *        repaired: they wait for the repair and land after it (passes: the repair holds the
 *        unit's range lock until its WRITEs completed);
 *   (v7) the leg a repair targets fails after its copy was read under the lock: the repair ends,
 *        a client write to the unit is not blocked, and the leg returns holding what the mirror
 *        reads (passes);
 *   (v8) with on-leg metadata, a repair WRITE takes write intent like a client write: the
 *        unit's bits are durable on the legs before the leg gets the bytes (a crash mid-repair
 *        then resyncs the unit and, after the unclean stop, checkpoints mark it from the bitmap;
 *        before, the checkpoint's mark lived in memory only until the next superblock write);
 *   (v9) legs without FUA: a repair WRITE is recorded unflushed on the leg it rewrites, so a
 *        leg that loses its volatile writes (crash before any FLUSH) resyncs the unit when it
 *        returns (before, it returned holding the bad bytes again, readable as in sync);
 *   (v10) a client write into a 64 MiB window whose zero-skip answer the verify already holds:
 *        the written unit is verified, not skipped as zeros (the answer was reused for the
 *        whole window).
 *
 * Threads: test main thread (the legs run inline over FaultStores, test/helpers/fault-device.ts;
 * the verify's hash pool runs one real worker thread).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as p from '../../../src/nbd/protocol.js';
import { kHashWorkerEntry } from '../../../src/cli/actor-entry.js';
import { filled, legStates, makeStores, openFaultMirror, waitFor, waitLegState, within, type FaultMirror, type FaultStore } from '../../helpers/fault-device.js';
import { bitmapOf, kMetaChunkBytes, openMetaMirror, setBits } from '../../helpers/meta-mirror.js';

/** One verify unit: the whole device (a verify READ is recognisable by its length). */
const kLegBytes = 256 * 1024;
const kVerify = { verify: { threads: 1, lanes: 1, workerEntry: kHashWorkerEntry } };

const isVerifyRead = (request: { command: number; lengthBytes: number }): boolean => request.command === p.kCmdRead && request.lengthBytes === kLegBytes;

/** A 2-leg (or `count`) inline fault mirror with the verify's hash pool, leg timeouts long (requests are held). */
async function openVerifyRig(count = 2, legBytes = kLegBytes): Promise<{ fm: FaultMirror; mirror: FaultMirror['mirror']; stores: FaultStore[]; context: () => string }> {
  const stores = makeStores(count, legBytes);
  const fm = await openFaultMirror(stores, { legTimeoutMs: 60_000 }, kVerify);
  const { mirror } = fm;
  return { fm, mirror, stores, context: () => ` (legs ${legStates(mirror).join(',')})` };
}

test('(v1) a verify READ failure delivered after the leg failed and came back does not fail it again', async () => {
  const { fm, mirror, stores, context } = await openVerifyRig();
  const [store0, store1] = stores as [FaultStore, FaultStore];
  try {
    assert.equal(await fm.driver.write(0, filled(4096, 1)), 0);
    store0.holdIf = isVerifyRead;
    store1.holdIf = isVerifyRead;
    mirror.startVerify();
    assert.ok(await waitFor(() => store0.heldCount === 1 && store1.heldCount === 1, 30_000), `the verify READs are held on both legs${context()}`);
    store0.holdIf = null;
    store1.holdIf = null;
    // Leg 0 leaves: its verify READ fails now (the verify waits for leg 1's); it comes back.
    mirror.failLegByHand(0);
    store0.release();
    await mirror.reconnectLegNow(0);
    await waitLegState(mirror, 0, ['in-sync'], 'leg 0 back', 30_000);
    const failures = fm.events.length;
    // Leg 1 answers: the unit's reads are settled; leg 0's old failure is from its old epoch.
    store1.release();
    await within(mirror.verifyDone(), 30_000, 'verify', context);
    assert.equal(legStates(mirror)[0], 'in-sync', `leg 0 stays in sync${context()} (events since: ${JSON.stringify(fm.events.slice(failures))})`);
  } finally {
    await fm.close();
  }
});

test('(v2) a verify repair marks the repaired range in an active checkpoint', async () => {
  const { fm, mirror, stores } = await openVerifyRig();
  const [store0, store1] = stores as [FaultStore, FaultStore];
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
    await within(mirror.verifyDone(), 30_000, 'verify');
    const progress = mirror.verifyStatus().current;
    assert.equal(progress?.repairedChunks, 1, 'the piece was repaired');
    assert.deepEqual(store1.bytes, store0.bytes, 'the legs agree after the repair');
    const runs = checkpoints.runs('c1', 0, kLegBytes, 16);
    assert.ok(runs.some((run) => run.offsetBytes <= bad && run.offsetBytes + run.lengthBytes >= bad + 4096), `c1 marks the repaired range (runs ${JSON.stringify(runs)})`);
  } finally {
    await fm.close();
  }
});

test('(v3) a checkpoint created while a write waits for its write intent marks the write (passes: the resumed dispatch marks again)', async () => {
  const stores = makeStores(2, 4 * 1024 * 1024);
  const [store0] = stores as [FaultStore, FaultStore];
  const fm = await openFaultMirror(stores, { metadata: true, legTimeoutMs: 60_000 });
  const { mirror } = fm;
  const dataBytes = mirror.sizeBytes;
  try {
    const checkpoints = mirror.checkpointOperations();
    // The keeper's write-intent page write is held: the client write is parked (not dispatched).
    store0.holdIf = (request) => request.command === p.kCmdWrite && request.offsetBytes >= dataBytes;
    const data = filled(4096, 3);
    const write = fm.driver.write(64 * 1024, data);
    assert.ok(await waitFor(() => store0.heldCount > 0, 30_000), 'a metadata write is held on leg 0');
    store0.holdIf = null;
    const created = checkpoints.create('c1');
    store0.release();
    assert.equal(await within(write, 30_000, 'write'), 0);
    await within(created, 30_000, 'checkpoint create');
    const runs = checkpoints.runs('c1', 0, dataBytes, 16);
    assert.ok(runs.some((run) => run.offsetBytes <= 64 * 1024 && run.offsetBytes + run.lengthBytes >= 68 * 1024), `c1 marks the parked write (runs ${JSON.stringify(runs)})`);
  } finally {
    await fm.close();
  }
});

test('(v4) a freeze while a write is in flight on a leg: both the frozen and the new checkpoint mark it (passes)', async () => {
  const stores = makeStores(2, kLegBytes);
  const [, store1] = stores as [FaultStore, FaultStore];
  const fm = await openFaultMirror(stores, { legTimeoutMs: 60_000 });
  const { mirror } = fm;
  try {
    const checkpoints = mirror.checkpointOperations();
    await checkpoints.create('c1');
    store1.holdIf = (request) => request.command === p.kCmdWrite;
    const write = fm.driver.write(8192, filled(4096, 4));
    assert.ok(await waitFor(() => store1.heldCount === 1, 30_000), 'the write is held on leg 1');
    store1.holdIf = null;
    await checkpoints.freeze('c1', 'c2');
    store1.release();
    assert.equal(await within(write, 30_000, 'write'), 0);
    for (const name of ['c1', 'c2']) {
      const runs = checkpoints.runs(name, 0, kLegBytes, 16);
      assert.ok(runs.some((run) => run.offsetBytes <= 8192 && run.offsetBytes + run.lengthBytes >= 12288), `${name} marks the write in flight (runs ${JSON.stringify(runs)})`);
    }
    // A write after the freeze is in c2 only.
    assert.equal(await fm.driver.write(65536, filled(4096, 5)), 0);
    assert.ok(!checkpoints.runs('c1', 0, kLegBytes, 16).some((run) => run.offsetBytes <= 65536 && run.offsetBytes + run.lengthBytes > 65536), 'c1 is frozen');
    assert.ok(checkpoints.runs('c2', 0, kLegBytes, 16).some((run) => run.offsetBytes <= 65536 && run.offsetBytes + run.lengthBytes > 65536), 'c2 is active');
  } finally {
    await fm.close();
  }
});

test('(v5) a verify whose unit runs cannot all fit in the ring at once ends (and still compares the legs)', async () => {
  // Three legs of 1 MiB, a ring of 32 x 64 KiB: one 1 MiB run per leg is 48 slots, the ring 32.
  const { fm, mirror, stores } = await openVerifyRig(3, 1024 * 1024);
  const [, , store2] = stores as [FaultStore, FaultStore, FaultStore];
  try {
    assert.equal(await fm.driver.write(0, filled(64 * 1024, 6)), 0);
    store2.bytes.fill(0x5a, 512 * 1024, 512 * 1024 + 4096);
    mirror.startVerify({ repair: true });
    const ended = await waitFor(() => mirror.verifyStatus().current?.running === false, 30_000);
    if (!ended) {
      const stop = mirror.stopVerify();
      assert.fail(`the verify did not end (stop ${await Promise.race([stop.then(() => 'ended'), new Promise((resolve) => setTimeout(() => resolve('hangs too'), 1000))])}): ${JSON.stringify(mirror.verifyStatus().current)}`);
    }
    const progress = mirror.verifyStatus().current;
    assert.equal(progress?.bytesChecked, 1024 * 1024, `every byte compared: ${JSON.stringify(progress)}`);
    assert.equal(progress?.mismatchChunks, 1);
    assert.deepEqual(store2.bytes, (stores[0] as FaultStore).bytes, 'leg 2 repaired (majority)');
  } finally {
    await fm.close();
  }
});

test('(v6) a client WRITE and WRITE_ZEROES to a range whose repair WRITE is held wait for it and are not overwritten (passes: the unit lock)', async () => {
  const { fm, mirror, stores, context } = await openVerifyRig();
  const [store0, store1] = stores as [FaultStore, FaultStore];
  try {
    assert.equal(await fm.driver.write(0, filled(kLegBytes, 7)), 0);
    store1.bytes.fill(0x33, 4096, 8192);
    // The repair WRITE (the whole unit, to leg 1) is held.
    store1.holdIf = (request) => request.command === p.kCmdWrite && request.lengthBytes === kLegBytes;
    mirror.startVerify({ repair: true });
    assert.ok(await waitFor(() => store1.heldCount === 1, 30_000), `the repair WRITE is held${context()}`);
    store1.holdIf = null;
    let writeDone = false;
    const data = filled(4096, 8);
    const write = fm.driver.write(4096, data).then((errno) => {
      writeDone = true;
      return errno;
    });
    const zero = fm.driver.zero(16384, 4096);
    assert.ok(!(await waitFor(() => writeDone, 200)), 'the client write waits for the repair');
    store1.release();
    assert.equal(await within(write, 30_000, 'write', context), 0);
    assert.equal(await within(zero, 30_000, 'zero', context), 0);
    await within(mirror.verifyDone(), 30_000, 'verify', context);
    const read = await fm.driver.read(0, kLegBytes);
    assert.equal(read.errno, 0);
    const expected = filled(kLegBytes, 7);
    expected.set(data, 4096);
    expected.fill(0, 16384, 20480);
    assert.deepEqual(read.data, expected, 'the client writes are what the mirror reads');
    assert.deepEqual(store0.bytes, expected, 'leg 0 holds them');
    assert.deepEqual(store1.bytes, expected, 'leg 1 holds them (the repair did not overwrite them)');
  } finally {
    await fm.close();
  }
});

test('(v7) a repair whose target leg failed while the unit was being read ends, and the leg returns holding what the mirror reads (passes)', async () => {
  const { fm, mirror, stores, context } = await openVerifyRig();
  const [store0, store1] = stores as [FaultStore, FaultStore];
  try {
    assert.equal(await fm.driver.write(0, filled(kLegBytes, 9)), 0);
    store1.bytes.fill(0x44, 0, 4096);
    // The second verify READ on leg 0 (the re-check under the lock) is held.
    let reads = 0;
    store0.holdIf = (request) => isVerifyRead(request) && ++reads === 2;
    mirror.startVerify({ repair: true });
    assert.ok(await waitFor(() => store0.heldCount === 1 && store1.received.filter(isVerifyRead).length === 2, 30_000), `the re-check READs are out${context()}`);
    store0.holdIf = null;
    // Leg 1 leaves with its copy read; the repair then targets a leg that is gone.
    mirror.failLegByHand(1);
    store0.release();
    await within(mirror.verifyDone(), 30_000, 'verify', context);
    const data = filled(4096, 10);
    assert.equal(await within(fm.driver.write(0, data), 30_000, 'write', context), 0, 'a client write to the unit is not blocked');
    assert.notEqual(await mirror.reconnectLegNow(1), 'failed');
    await waitLegState(mirror, 1, ['in-sync'], 'leg 1 back', 30_000);
    const expected = filled(kLegBytes, 9);
    expected.set(data, 0);
    const read = await fm.driver.read(0, kLegBytes);
    assert.deepEqual(read.data, expected);
    assert.deepEqual(store0.bytes, expected, 'leg 0 holds it');
    assert.deepEqual(store1.bytes, expected, 'leg 1 holds it');
  } finally {
    await fm.close();
  }
});

test('(v8) with on-leg metadata a repair WRITE waits for write intent: the unit\'s bits are durable on both legs before the leg gets the bytes', async () => {
  const stores = makeStores(2, 2 * 1024 * 1024);
  const [store0, store1] = stores as [FaultStore, FaultStore];
  const { fm, mirror, layout } = await openMetaMirror(stores, 60_000, { tuning: { legTimeoutMs: 60_000 }, extra: kVerify });
  const context = (): string => ` (legs ${legStates(mirror).join(',')}; bits ${setBits(bitmapOf(store0, layout), layout).join(',')} / ${setBits(bitmapOf(store1, layout), layout).join(',')})`;
  try {
    assert.deepEqual(setBits(bitmapOf(store0, layout, true), layout), [], 'a fresh array: no bits');
    // Leg 1's bytes change behind the mirror's back in chunk 3; the repair WRITE to leg 1 is held.
    const bad = 3 * kMetaChunkBytes + 512;
    store1.bytes.fill(0x6b, bad, bad + 4096);
    store1.durable.fill(0x6b, bad, bad + 4096);
    store1.holdIf = (request) => request.command === p.kCmdWrite && request.offsetBytes < layout.dataSizeBytes;
    mirror.startVerify({ repair: true });
    assert.ok(await waitFor(() => store1.heldCount === 1, 30_000), `the repair WRITE reached leg 1${context()}`);
    const chunk = Math.floor(bad / kMetaChunkBytes);
    for (const [index, store] of stores.entries()) {
      assert.ok(setBits(bitmapOf(store, layout, true), layout).includes(chunk), `chunk ${chunk}'s bit is durable on leg ${index} while the repair WRITE is out${context()}`);
    }
    store1.holdIf = null;
    store1.release();
    await within(mirror.verifyDone(), 30_000, 'verify', context);
    assert.equal(mirror.verifyStatus().current?.repairedChunks, 1);
    assert.deepEqual(store1.bytes.subarray(0, layout.dataSizeBytes), store0.bytes.subarray(0, layout.dataSizeBytes), 'the legs agree after the repair');
  } finally {
    await fm.close();
  }
});

test('(v9) legs without FUA: a repair WRITE counts as unflushed, so a leg that loses it in a crash resyncs the unit when it returns', async () => {
  const stores = makeStores(2, kLegBytes);
  const [store0, store1] = stores as [FaultStore, FaultStore];
  for (const store of stores) store.noFua = true;
  const fm = await openFaultMirror(stores, { legTimeoutMs: 60_000 }, kVerify);
  const { mirror } = fm;
  const context = (): string => ` (legs ${legStates(mirror).join(',')})`;
  try {
    assert.equal(await fm.driver.write(0, filled(kLegBytes, 9)), 0);
    assert.equal(await fm.driver.flush(), 0);
    // A bad spot on leg 1, durable (what it reads after any restart).
    const bad = 96 * 1024;
    store1.bytes.fill(0x5c, bad, bad + 4096);
    store1.durable.fill(0x5c, bad, bad + 4096);
    mirror.startVerify({ repair: true });
    await within(mirror.verifyDone(), 30_000, 'verify', context);
    assert.equal(mirror.verifyStatus().current?.repairedChunks, 1, 'the piece was repaired');
    assert.deepEqual(store1.bytes, store0.bytes, 'repaired in leg 1\'s volatile bytes');
    // Leg 1 crashes before any FLUSH: the repair is lost there, the bad bytes are back.
    store1.crash();
    await waitLegState(mirror, 1, ['degraded', 'fencing', 'reconnecting', 'probation', 'resyncing', 'failed'], 'leg 1 leaves', 30_000);
    await waitLegState(mirror, 1, ['in-sync'], 'leg 1 returns', 30_000);
    assert.deepEqual(Buffer.from(store1.bytes.subarray(bad, bad + 4096)), Buffer.from(store0.bytes.subarray(bad, bad + 4096)), `leg 1 was resynced where the lost repair was${context()}`);
    for (let round = 0; round < 8; round += 1) {
      const read = await fm.driver.read(bad, 4096);
      assert.equal(read.errno, 0);
      assert.deepEqual(Buffer.from(read.data ?? new Uint8Array(0)), Buffer.from(filled(kLegBytes, 9).subarray(bad, bad + 4096)), `read ${round} answers the written bytes`);
    }
  } finally {
    await fm.close();
  }
});

test('(v10) a client write after the verify asked which units read zero: the written unit is compared, not skipped', async () => {
  const kMiB = 1024 * 1024;
  const stores = makeStores(2, 4 * kMiB);
  const [store0, store1] = stores as [FaultStore, FaultStore];
  for (const store of stores) store.reportZeros = true;
  // A ring with room for a client write beside the verify's two 1 MiB runs.
  const fm = await openFaultMirror(stores, { legTimeoutMs: 60_000 }, { ...kVerify, ring: { slotCount: 128, slotBytes: 64 * 1024 } });
  const { mirror } = fm;
  const context = (): string => ` (legs ${legStates(mirror).join(',')}; ${JSON.stringify(mirror.verifyStatus().current)})`;
  try {
    // Unit 0 holds data (it is read); units 1-3 read zero on both legs.
    assert.equal(await fm.driver.write(0, filled(64 * 1024, 10)), 0);
    const isUnit0Read = (request: { command: number; offsetBytes: number; lengthBytes: number }): boolean => request.command === p.kCmdRead && request.offsetBytes === 0 && request.lengthBytes === kMiB;
    store0.holdIf = isUnit0Read;
    store1.holdIf = isUnit0Read;
    mirror.startVerify();
    assert.ok(await waitFor(() => store0.heldCount + store1.heldCount >= 1, 30_000), `the verify reads unit 0${context()}`);
    // The window's answer (units 1-3 zero) is known now. A client write lands in unit 2; then
    // leg 1's copy of it goes bad behind the mirror's back.
    assert.equal(await within(fm.driver.write(2 * kMiB, filled(64 * 1024, 11)), 30_000, 'client write', context), 0);
    store1.bytes.fill(0x77, 2 * kMiB + 4096, 2 * kMiB + 8192);
    store0.holdIf = null;
    store1.holdIf = null;
    store0.release();
    store1.release();
    await within(mirror.verifyDone(), 30_000, 'verify', context);
    const progress = mirror.verifyStatus().current;
    assert.equal(progress?.mismatchChunks, 1, `the written unit was compared and differs${context()}`);
    assert.equal(progress?.bytesSkipped, 2 * kMiB, `units 1 and 3 were skipped as zeros${context()}`);
  } finally {
    await fm.close();
  }
});
