/**
 * Races between the leg lifecycle's asynchronous steps (fence, reconnect, probe, resync copies,
 * read repair) and the synchronous state changes that happen while they await. Each test holds
 * chosen requests on a store (FaultStore.holdIf / hang), changes leg states while they are held,
 * lets them go (store.release()), and checks the mirror's promise or its liveness:
 *   (l1) an operator reconnect of a leg whose fence is being retried, when its own fence is not
 *        proven either: the leg still retries the fence (it does not stay `fencing` forever once
 *        the old connection drains);
 *   (l2) a client READ that fails with EIO on a leg while a WRITE to the same range is in flight
 *        there (read repair marks the leg mid-write), and the write then fails on the other leg:
 *        the write is not acknowledged while no leg can serve it (every leg's bit set), and the
 *        range becomes readable again once the legs settle;
 *   (l3) as (l2) with FUA and read repair off (the reading leg fails and leaves): an acknowledged
 *        FUA write is readable, and the legs settle;
 *   (l4) a FLUSH answered by one leg, which then leaves (its unflushed record spilled: marked
 *        where the other leg holds the range), while the other leg's FLUSH fails: the FLUSH is
 *        not acknowledged on the strength of the leg that left (the other leg, now the one that
 *        counts, may lose the write in a crash);
 *   (l5) as (l4), the leg that flushed marked by a read repair instead of leaving (it stays
 *        admitted, resyncing): the FLUSH is not acknowledged on its strength either;
 *   (l6) a returning leg whose admission (on-leg metadata) waits behind the keeper's other
 *        I/O, failed by the operator and reconnected meanwhile: when the old admission ends,
 *        the leg is not admitted while its new probe is still unanswered;
 *   (l7) a resync copy whose READ is held on the source while its target fails and returns (a
 *        new epoch): the old copy clears no bit of the new epoch (its chained WRITE may reach
 *        the new connection), a client write to the range waits for it (range lock), and the
 *        legs end identical, holding the client's data (a check that passed: no fix needed);
 *   (l8) a write answered by a leg that then leaves, crashes (losing it) and returns in sync
 *        before the write completes on the other leg: the leg is not read for that range
 *        until it holds the write again (passes: the completion marks it and fails it again, as
 *        a leg that left since dispatch, and it resyncs the range);
 *   (l9) the operator fails a leg whose reconnect is connecting: the connection that opens
 *        afterwards is closed (it stayed open until the next fence), and the operator's
 *        reconnect still brings the leg back.
 *
 * Threads: test main thread (the legs run inline over FaultStores, test/helpers/fault-device.ts).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as p from '../../../src/nbd/protocol.js';
import { filled, legStates, makeStores, openFaultMirror, waitFor, waitLegState, within, type FaultMirror, type FaultStore } from '../../helpers/fault-device.js';

const kLegBytes = 256 * 1024;

test('(l1) an operator reconnect whose fence is not proven leaves the leg retrying the fence', async () => {
  const stores = makeStores(2, kLegBytes);
  const store1 = stores[1] as FaultStore;
  // Fence attempts of 100 ms, retried after ~500 ms: the test calls the reconnect between two.
  const fm = await openFaultMirror(stores, { fenceTimeoutMs: 100, reconnectMinMs: 500, reconnectMaxMs: 500 });
  const { mirror } = fm;
  try {
    store1.hang = true;
    assert.equal(await within(fm.driver.write(0, filled(4096, 1)), 30_000, 'write'), 0, 'leg 0 holds the write');
    assert.ok(await waitFor(() => mirror.legStatus()[1]?.failureReason?.startsWith('cannot fence') === true, 30_000), `leg 1's first fence is not proven: ${legStates(mirror).join(',')}`);
    // The lifecycle waits for its retry timer now; the operator's attempt fails too.
    assert.equal(await mirror.reconnectLegNow(1), 'fencing', 'the old connection still holds a request');
    // The old connection drains: the leg fences, reconnects and returns (by itself).
    store1.hang = false;
    store1.release();
    await waitLegState(mirror, 1, ['in-sync'], 'leg 1 after its old connection drained', 30_000);
    const read = await fm.driver.read(0, 4096);
    assert.equal(read.errno, 0);
    assert.deepEqual(read.data, filled(4096, 1));
  } finally {
    await fm.close();
  }
});

/**
 * (l2)/(l3): leg 0 serves reads (leg 1 is write-mostly); a READ of chunk 0 is held on leg 0 and
 * answered EIO while a WRITE to chunk 0 is in flight, applied on leg 0 and held on leg 1, which
 * then fails it. Returns the write's errno and the data written.
 */
async function readFailsMidWrite(flags: number, readRepair: boolean): Promise<void> {
  const stores = makeStores(2, kLegBytes);
  const [store0, store1] = stores as [FaultStore, FaultStore];
  const fm = await openFaultMirror(stores, { legTimeoutMs: 60_000 }, { writeMostly: [1], readRepair });
  const { mirror } = fm;
  const context = (): string => ` (legs ${legStates(mirror).join(',')}, readable ${JSON.stringify(mirror.readableLegs(0, 4096))})`;
  try {
    assert.equal(await fm.driver.write(0, filled(4096, 1)), 0);
    // The READ goes to leg 0 (leg 1 is write-mostly), held there, to be answered EIO.
    store0.eio = 'reads';
    store0.eioBudget = 1;
    store0.holdIf = (request) => request.command === p.kCmdRead;
    const read = fm.driver.read(0, 4096);
    assert.ok(await waitFor(() => store0.heldCount === 1, 30_000), 'the READ is held on leg 0');
    store0.holdIf = null;
    // The WRITE: applied on leg 0, held on leg 1 (to fail there).
    store1.holdIf = (request) => request.command === p.kCmdWrite;
    store1.eio = 'writes';
    store1.eioBudget = 1;
    const data = filled(4096, 2);
    const write = fm.driver.write(0, data, flags);
    assert.ok(await waitFor(() => store1.heldCount === 1 && store0.applied.length === 2, 30_000), 'the WRITE reached both legs');
    // The READ fails on leg 0 while the WRITE is in flight; it is retried on leg 1 (old data).
    store0.release();
    const readAnswer = await within(read, 30_000, 'read', context);
    assert.equal(readAnswer.errno, 0, 'leg 1 serves the read');
    // Then the WRITE fails on leg 1.
    store1.holdIf = null;
    store1.release();
    const errno = await within(write, 30_000, 'write', context);
    // Once the legs settle (leg 1 returns), the range is readable and every leg agrees.
    assert.ok(await waitFor(() => mirror.readableLegs(0, 4096).length > 0 && legStates(mirror).every((state) => state === 'in-sync'), 30_000), `the legs settle and chunk 0 is readable${context()}`);
    const after = await fm.driver.read(0, 4096);
    assert.equal(after.errno, 0, 'chunk 0 reads');
    if (errno === 0) assert.deepEqual(after.data, data, 'the acknowledged write reads back');
    else assert.ok([filled(4096, 1), data].some((each) => Buffer.from(each).equals(Buffer.from(after.data as Uint8Array))), 'a failed write leaves either version');
    for (const store of stores) assert.deepEqual(store.bytes.slice(0, 4096), after.data, `${store.name} holds what the mirror reads`);
  } finally {
    await fm.close();
  }
}

test('(l2) a read repair marking a leg mid-write does not let the write succeed on no readable leg', async () => {
  await readFailsMidWrite(0, true);
});

test('(l3) a leg marked and failed mid-FUA-write (read error, no repair) does not leave an acknowledged write unreadable', async () => {
  await readFailsMidWrite(p.kCmdFlagFua, false);
});

/**
 * `data` is written at 0 on both legs (unflushed), then a FLUSH that leg 0 completes and store 1
 * holds, to answer EIO once released. Resolves (the FLUSH still out, wrapped) once both are so.
 */
async function flushDoneOnLegZeroHeldOnLegOne(fm: FaultMirror, store0: FaultStore, store1: FaultStore, data: Uint8Array): Promise<{ flush: Promise<number> }> {
  assert.equal(await fm.driver.write(0, data), 0, 'both legs hold the write (unflushed)');
  store1.holdIf = (request) => request.command === p.kCmdFlush;
  store1.eio = 'flushes';
  store1.eioBudget = 1;
  const flush = fm.driver.flush();
  assert.ok(await waitFor(() => store1.heldCount === 1 && Buffer.from(store0.durable.slice(0, 4096)).equals(Buffer.from(data)), 30_000), 'leg 0 flushed, leg 1 holds the FLUSH');
  return { flush };
}

/**
 * Leg 1 failed the FLUSH (answered `errno` to the client) and left; its server crashes (what it
 * did not flush is gone). After `bringBack`, the legs settle in sync: a write before an
 * acknowledged FLUSH reads back, and every leg holds what the mirror reads.
 */
async function crashLegOneAndSettle(fm: FaultMirror, store1: FaultStore, errno: number, data: Uint8Array, bringBack: () => Promise<void> | void): Promise<void> {
  const { mirror } = fm;
  await waitLegState(mirror, 1, ['fencing', 'degraded', 'reconnecting', 'probation', 'resyncing', 'in-sync'], 'leg 1 failed the FLUSH', 30_000);
  store1.crash();
  store1.heal();
  await bringBack();
  assert.ok(await waitFor(() => legStates(mirror).every((state) => state === 'in-sync'), 30_000), `the legs settle (legs ${legStates(mirror).join(',')})`);
  const read = await fm.driver.read(0, 4096);
  assert.equal(read.errno, 0);
  if (errno === 0) assert.deepEqual(read.data, data, 'a write before an acknowledged FLUSH survives a crash of a leg');
  for (const store of fm.stores) assert.deepEqual(store.bytes.slice(0, 4096), read.data, `${store.name} holds what the mirror reads`);
}

test('(l4) a FLUSH is not acknowledged by a leg that left before it completed while the other leg failed it', async () => {
  const stores = makeStores(2, kLegBytes);
  const [store0, store1] = stores as [FaultStore, FaultStore];
  const fm = await openFaultMirror(stores, { legTimeoutMs: 60_000 });
  const { mirror } = fm;
  const context = (): string => ` (legs ${legStates(mirror).join(',')})`;
  try {
    const data = filled(4096, 3);
    const { flush } = await flushDoneOnLegZeroHeldOnLegOne(fm, store0, store1, data);
    // Leg 0 leaves before the FLUSH completes: its unflushed record marks it where leg 1 holds the range.
    mirror.failLegByHand(0);
    store1.holdIf = null;
    store1.release();
    const errno = await within(flush, 30_000, 'flush', context);
    await crashLegOneAndSettle(fm, store1, errno, data, async () => {
      assert.notEqual(await mirror.reconnectLegNow(0), 'failed');
    });
  } finally {
    await fm.close();
  }
});

test('(l5) a FLUSH is not acknowledged by a leg a read repair marked before it completed while the other leg failed it', async () => {
  const stores = makeStores(2, kLegBytes);
  const [store0, store1] = stores as [FaultStore, FaultStore];
  // Leg 1 write-mostly: reads go to leg 0.
  const fm = await openFaultMirror(stores, { legTimeoutMs: 60_000 }, { writeMostly: [1] });
  const { mirror } = fm;
  const context = (): string => ` (legs ${legStates(mirror).join(',')})`;
  try {
    const data = filled(4096, 4);
    // Leg 0's repair copy waits until the FLUSH has completed.
    mirror.pauseResync(true);
    const { flush } = await flushDoneOnLegZeroHeldOnLegOne(fm, store0, store1, data);
    // A READ fails on leg 0: the range is marked there (leg 1 holds it), leg 0 resyncs it.
    store0.eio = 'reads';
    store0.eioBudget = 1;
    const read = await within(fm.driver.read(0, 4096), 30_000, 'read', context);
    assert.equal(read.errno, 0, 'leg 1 serves the read');
    assert.equal(legStates(mirror)[0], 'resyncing', 'leg 0 is being repaired');
    store1.holdIf = null;
    store1.release();
    const errno = await within(flush, 30_000, 'flush', context);
    await crashLegOneAndSettle(fm, store1, errno, data, () => {
      mirror.pauseResync(false);
    });
  } finally {
    await fm.close();
  }
});

test('(l6) an admission that ends after the leg failed and came back does not admit it past its new probe', async () => {
  const stores = makeStores(2, 4 * 1024 * 1024);
  const [store0, store1] = stores as [FaultStore, FaultStore];
  const fm = await openFaultMirror(stores, { metadata: true, legTimeoutMs: 60_000, probeTimeoutMs: 30_000 });
  const { mirror } = fm;
  const dataBytes = mirror.sizeBytes;
  const context = (): string => ` (legs ${legStates(mirror).join(',')})`;
  try {
    mirror.failLegByHand(1);
    // The keeper's next metadata write to leg 0 (the write intent of a client write) is held:
    // the keeper's loop waits, and leg 1's admission queues behind it.
    store0.holdIf = (request) => request.command === p.kCmdWrite && request.offsetBytes >= dataBytes;
    const write = fm.driver.write(0, filled(4096, 5));
    assert.ok(await waitFor(() => store0.heldCount > 0, 30_000), 'a metadata write is held on leg 0');
    const firstReturn = mirror.reconnectLegNow(1);
    const flushes = (): number => store1.receivedOf((request) => request.command === p.kCmdFlush).length;
    const before = flushes();
    assert.ok(await waitFor(() => legStates(mirror)[1] === 'probation' && flushes() > before, 30_000), `leg 1 passed its probe and waits for its admission${context()}`);
    // (The probe's answer reaches the lifecycle a few turns later; then the admission queues.)
    await new Promise((resolve) => setTimeout(resolve, 100));
    // The operator fails it again and brings it back; its new probe is held.
    mirror.failLegByHand(1);
    store1.holdIf = (request) => request.command === p.kCmdRead && request.offsetBytes < dataBytes;
    const secondReturn = mirror.reconnectLegNow(1);
    assert.ok(await waitFor(() => store1.heldCount === 1, 30_000), `leg 1's new probe is held${context()}`);
    // The keeper goes on: the old admission runs and ends.
    store0.holdIf = null;
    store0.release();
    assert.equal(await within(write, 30_000, 'write', context), 0);
    await new Promise((resolve) => setTimeout(resolve, 200));
    assert.equal(store1.heldCount, 1, 'the new probe is still unanswered');
    assert.equal(legStates(mirror)[1], 'probation', 'so leg 1 is still on probation');
    store1.holdIf = null;
    store1.release();
    await within(Promise.all([firstReturn, secondReturn]), 30_000, 'both reconnects', context);
    await waitLegState(mirror, 1, ['in-sync'], 'leg 1 after its probe', 30_000);
  } finally {
    await fm.close();
  }
});

test('(l7) a resync copy that lands after its target failed and returned clears nothing and is not overtaken', async () => {
  const stores = makeStores(2, kLegBytes);
  const store0 = stores[0] as FaultStore;
  const fm = await openFaultMirror(stores, { legTimeoutMs: 60_000 });
  const { mirror } = fm;
  const context = (): string => ` (legs ${legStates(mirror).join(',')})`;
  try {
    mirror.failLegByHand(1);
    assert.equal(await fm.driver.write(0, filled(4096, 6)), 0, 'leg 1 misses the write');
    mirror.pauseResync(true);
    assert.equal(await mirror.reconnectLegNow(1), 'resyncing');
    // The copy's READ is held on leg 0.
    store0.holdIf = (request) => request.command === p.kCmdRead;
    mirror.pauseResync(false);
    assert.ok(await waitFor(() => store0.heldCount === 1, 30_000), `the copy's READ is held${context()}`);
    // Leg 1 fails and returns meanwhile (its resync starts over in a new epoch).
    mirror.failLegByHand(1);
    const data = filled(4096, 7);
    let acked = false;
    const write = fm.driver.write(0, data).then((errno) => {
      acked = true;
      return errno;
    });
    assert.notEqual(await mirror.reconnectLegNow(1), 'failed');
    assert.equal(acked, false, 'the client write waits for the copy (range lock)');
    store0.holdIf = null;
    store0.release();
    assert.equal(await within(write, 30_000, 'write', context), 0);
    await waitLegState(mirror, 1, ['in-sync'], 'leg 1 after its resync', 30_000);
    const read = await fm.driver.read(0, 4096);
    assert.equal(read.errno, 0);
    assert.deepEqual(read.data, data, 'the client write reads back');
    for (const store of stores) assert.deepEqual(store.bytes.slice(0, 4096), data, `${store.name} holds the client write`);
  } finally {
    await fm.close();
  }
});

test('(l8) a leg that left and returned while a write it answered was in flight is not read there until it is copied again', async () => {
  const stores = makeStores(2, kLegBytes);
  const [store0, store1] = stores as [FaultStore, FaultStore];
  const fm = await openFaultMirror(stores, { legTimeoutMs: 60_000 });
  const { mirror } = fm;
  const context = (): string => ` (legs ${legStates(mirror).join(',')}, readable ${JSON.stringify(mirror.readableLegs(0, 4096))})`;
  try {
    const data = filled(4096, 8);
    store1.holdIf = (request) => request.command === p.kCmdWrite;
    const write = fm.driver.write(0, data);
    assert.ok(await waitFor(() => store1.heldCount === 1 && store0.applied.length === 1, 30_000), 'leg 0 has the write, leg 1 holds it');
    await new Promise((resolve) => setTimeout(resolve, 50)); // leg 0's answer reaches the master
    // Leg 0 leaves; its server crashes (the unflushed write is gone); it comes back at once.
    mirror.failLegByHand(0);
    store0.crash();
    store0.heal();
    assert.equal(await mirror.reconnectLegNow(0), 'in-sync', 'leg 0 missed nothing it knows of');
    store1.holdIf = null;
    store1.release();
    assert.equal(await within(write, 30_000, 'write', context), 0, 'leg 1 holds the write');
    // Every leg the mirror reads chunk 0 from holds the write; once quiet, both legs do.
    for (const index of mirror.readableLegs(0, 4096)) assert.deepEqual(stores[index]?.bytes.slice(0, 4096), data, `readable leg ${index} holds the write${context()}`);
    assert.ok(await waitFor(() => legStates(mirror).every((state) => state === 'in-sync') && (mirror.dirtyMap(0)?.dirtyChunkCount() ?? 0) === 0, 30_000), `the legs settle with no marks${context()}`);
    for (const store of stores) assert.deepEqual(store.bytes.slice(0, 4096), data, `${store.name} holds the write`);
  } finally {
    await fm.close();
  }
});

test('(l9) an operator fail while the leg is reconnecting: the connection that opens afterwards is closed, not kept', async () => {
  const stores = makeStores(2, kLegBytes);
  const store1 = stores[1] as FaultStore;
  const fm = await openFaultMirror(stores, {});
  const { mirror } = fm;
  const open = (): number => [...store1.connections].filter((connection) => connection.state === 'open').length;
  let letOpen: () => void = () => undefined;
  try {
    assert.equal(open(), 1);
    store1.openGate = new Promise<void>((resolve) => {
      letOpen = resolve;
    });
    store1.drop();
    await waitLegState(mirror, 1, ['reconnecting'], 'leg 1 reconnects (its connect held)', 30_000);
    mirror.failLegByHand(1);
    assert.equal(legStates(mirror)[1], 'failed');
    letOpen();
    store1.openGate = null;
    assert.ok(await waitFor(() => store1.opens >= 2 && open() === 0, 10_000), `the late connection is closed (open: ${open()}, opened ${store1.opens})`);
    assert.equal(legStates(mirror)[1], 'failed', 'the leg stays failed');
    // The operator's reconnect still brings it back.
    await mirror.reconnectLegNow(1);
    await waitLegState(mirror, 1, ['in-sync'], 'leg 1 after the operator reconnect', 30_000);
    assert.equal(open(), 1, 'one connection again');
  } finally {
    letOpen();
    await fm.close();
  }
});
