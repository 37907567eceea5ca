/**
 * Issue 10 findings, one deterministic test each, at the engine level: a MirrorDevice (inline
 * placement) over fault-injecting in-memory legs (test/helpers/fault-device.ts), driven through
 * its BlockDevice API like the NBD server drives it.
 *
 * f1  a write acknowledged only by a leg that was not up to date for its whole range (B
 *     resyncing with part of the range dirty, A failed it): the client must get EIO, or the
 *     data must stay readable from every readable leg and be on both stores after resync.
 * f2  zombie write: A holds a write past the leg timeout; it is acknowledged through B; A's
 *     late write is released after A could have reconnected. A must not be re-admitted before
 *     its old connection is fenced; reads always return the acknowledged data; stores converge.
 * f3  a leg that always fails writes (EIO) or always hangs must not cost a client write one
 *     leg timeout per reconnect; after legMaxFailures it is parked 'faulty' until
 *     reconnectLegNow. Variant 'refuse' (found by the model test): a leg whose reconnects are
 *     refused is parked too (the engine once asserted on reconnecting -> faulty).
 * f4  zero-length WRITE/TRIM/WRITE_ZEROES and a FLUSH with a range never reach a leg as such
 *     (an nbdkit-like leg refuses them with EINVAL; a FLUSH may go on as FLUSH 0+0) and no leg
 *     degrades.
 * f5  (found by the model test) a leg's server loses its unflushed writes while the mirror is
 *     disconnected from it (it failed a READ, its reconnects are refused, then it crashes): on
 *     return the leg must not serve the ranges it lost.
 * f7  (found by the model test) B lost its unflushed writes (crash) and is out; A, the last
 *     up-to-date leg, fails a READ over them: B must not count as holding them (so A is not
 *     marked as the one missing them), and the acknowledged data survives both returning.
 * f8  (found by the model test) both legs leave and each may have lost its unflushed writes:
 *     A crashed (lost X), B only dropped (holds X, the last in-sync leg). B returns first,
 *     then A: the leg that lost X must not become the reference.
 * f9  (found by the model test) A applies and answers a write, then its server crashes before
 *     the write completes at the mirror (B is slow): A's loss of that unflushed write must be
 *     marked although the write completed after A left.
 * f6  a leg server restarted on an empty file must not be read from as if it held the data: with
 *     on-leg metadata its identity is checked at probation (blank -> full resync).
 *
 * Threads: test main thread (the legs run inline). Timeouts are tiny (tens of ms); deadlines for
 * waiting are generous and nothing asserts a duration: f3 counts leg timeouts, not time.
 */
import { afterEach, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import * as p from '../../../src/nbd/protocol.js';
import { commandNames, errnoNames } from '../../../src/nbd/protocol-names.js';
import type { MirrorDevice } from '../../../src/engine/mirror.js';
import {
  legStates, makeStores, openFaultMirror, waitFor, type FaultMirror, type FaultStore,
  filled,
  waitLegState,
} from '../../helpers/fault-device.js';
import { assertSameBytes, firstDifference } from '../../helpers/mirror.js';

const kKiB = 1024;
const kDeviceBytes = 256 * kKiB;
const kSettleMs = 10_000;

let open: FaultMirror | null = null;
afterEach(async () => {
  await open?.close();
  open = null;
});

function stateOf(mirror: MirrorDevice, leg: number): string {
  return legStates(mirror)[leg] ?? 'missing';
}

async function waitState(mirror: MirrorDevice, leg: number, states: string[], what: string): Promise<void> {
  await waitLegState(mirror, leg, states, what, kSettleMs);
}

async function waitAllInSync(mirror: MirrorDevice, what: string): Promise<void> {
  const ok = await waitFor(() => legStates(mirror).every((state) => state === 'in-sync'), kSettleMs);
  assert.ok(ok, `${what}: every leg in sync (legs ${legStates(mirror).join(', ')})`);
}

/**
 * Violations of "every readable leg holds `expected` for [offset, offset+length)": one line per
 * readable leg whose store differs.
 */
function readableMismatches(mirror: MirrorDevice, stores: FaultStore[], offsetBytes: number, expected: Uint8Array): string[] {
  const problems: string[] = [];
  for (let chunk = offsetBytes; chunk < offsetBytes + expected.length; chunk += 4096) {
    const lengthBytes = Math.min(4096, offsetBytes + expected.length - chunk);
    for (const leg of mirror.readableLegs(chunk, lengthBytes)) {
      const store = stores[leg] as FaultStore;
      const want = expected.subarray(chunk - offsetBytes, chunk - offsetBytes + lengthBytes);
      const at = firstDifference(store.bytes.subarray(chunk, chunk + lengthBytes), want);
      if (at >= 0) problems.push(`leg ${leg} (${stateOf(mirror, leg)}) is readable at ${chunk}+${lengthBytes} but differs at ${chunk + at}`);
    }
  }
  return problems;
}

describe('issue 10 findings (engine, fault legs)', () => {
  test('f1: a write only a partly-dirty resyncing leg took is EIO, or it stays readable and survives resync', async () => {
    const stores = makeStores(2, kDeviceBytes);
    const [storeA, storeB] = stores as [FaultStore, FaultStore];
    open = await openFaultMirror(stores);
    const { mirror, driver } = open;
    const x = filled(16 * kKiB, 1);
    assert.equal(await driver.write(0, x), 0, 'first write on both legs');

    // B fails one write and comes back resyncing; its resync is paused, so [0, 16K) stays dirty.
    mirror.pauseResync(true);
    storeB.eio = 'writes';
    storeB.eioBudget = 1;
    const y = filled(16 * kKiB, 2);
    assert.equal(await driver.write(0, y), 0, 'Y acknowledged through A');
    await waitState(mirror, 1, ['resyncing'], 'B back');
    assert.ok(mirror.dirtyMap(1)?.testRange(8 * kKiB, 8 * kKiB), 'B still misses [8K, 16K)');

    // Z covers [8K, 24K): dirty on B for its first half. A fails it with EIO, B takes it.
    storeA.eio = 'writes';
    storeA.eioBudget = 1;
    const z = filled(16 * kKiB, 3);
    const zErrno = await driver.write(8 * kKiB, z);
    assert.ok(zErrno === 0 || zErrno === p.kEIo, `Z answered 0 or EIO (got ${zErrno})`);

    // Expected content when Z was acknowledged: X was overwritten by Y, then Z over [8K, 24K).
    const expected = new Uint8Array(24 * kKiB);
    expected.set(y, 0);
    expected.set(z, 8 * kKiB);
    const violations: string[] = [];
    const check = (when: string): void => {
      if (zErrno !== 0) return;
      for (const problem of readableMismatches(mirror, stores, 0, expected)) violations.push(`${when}: ${problem}`);
    };
    check('right after Z');
    const unsubscribe = mirror.on(() => check(`at a leg-state change (${legStates(mirror).join(', ')})`));
    try {
      storeA.heal();
      storeB.heal();
      for (let step = 0; step < 20; step += 1) {
        await sleep(10);
        check(`while A returns (${legStates(mirror).join(', ')})`);
      }
      mirror.pauseResync(false);
      await waitAllInSync(mirror, 'after heal');
    } finally {
      unsubscribe();
    }
    check('all in sync');
    assert.deepEqual(violations.slice(0, 5), [], 'Z (acknowledged) was readable from every readable leg at every check');
    const read = await driver.read(0, 24 * kKiB);
    assert.equal(read.errno, 0, 'read back after resync');
    if (zErrno === 0) assertSameBytes(read.data as Uint8Array, expected, 'acknowledged Z read back through the mirror');
    assertSameBytes(storeA.bytes, storeB.bytes, 'A and B after resync');
    if (zErrno === 0) assertSameBytes(storeA.bytes.subarray(0, 24 * kKiB), expected, 'A holds the acknowledged Z');
  });

  test('f2: a zombie write released late never shows; the leg is not re-admitted before its fence', async () => {
    const stores = makeStores(2, kDeviceBytes);
    const [storeA, storeB] = stores as [FaultStore, FaultStore];
    open = await openFaultMirror(stores, { legTimeoutMs: 60, fenceTimeoutMs: 150 });
    const { mirror, driver } = open;
    const admittedWhileHeld: string[] = [];
    mirror.on((event) => {
      if (event.type !== 'leg-state' || event.leg !== 0) return;
      const admitted = event.state === 'in-sync' || event.state === 'resyncing' || event.state === 'probation' as string;
      if (admitted && storeA.heldCount > 0) admittedWhileHeld.push(`${event.state} with ${storeA.heldCount} request(s) held by A's old connection`);
    });
    assert.equal(await driver.write(0, filled(8 * kKiB, 10)), 0, 'X on both legs');

    storeA.hang = true;
    const y = filled(8 * kKiB, 11);
    assert.equal(await driver.write(0, y), 0, 'Y acknowledged through B once A timed out');
    assert.equal(storeA.heldCount, 1, "A's old connection still holds Y");
    storeA.hang = false; // new connections answer; the old one keeps Y until release()

    const w = filled(8 * kKiB, 12);
    assert.equal(await driver.write(0, w), 0, 'W acknowledged');
    const badReads: string[] = [];
    const checkReads = async (when: string): Promise<void> => {
      const read = await driver.read(0, 8 * kKiB);
      if (read.errno === 0 && firstDifference(read.data as Uint8Array, w) >= 0) badReads.push(`${when}: read returned other bytes than W`);
      for (const problem of readableMismatches(mirror, stores, 0, w)) badReads.push(`${when}: ${problem}`);
    };
    // Long enough for several reconnect attempts (10..40 ms each) and a fence timeout.
    for (let step = 0; step < 30; step += 1) {
      await sleep(10);
      await checkReads(`before release (legs ${legStates(mirror).join(', ')})`);
    }
    const released = storeA.release();
    assert.equal(released, 1, 'Y released on A');
    assert.ok(storeA.applied.some((write) => write.late), "A applied Y late (after its connection failed)");
    for (let step = 0; step < 10; step += 1) {
      await checkReads(`after release (legs ${legStates(mirror).join(', ')})`);
      await sleep(10);
    }
    if (['faulty', 'failed'].includes(stateOf(mirror, 0))) await mirror.reconnectLegNow(0);
    await waitAllInSync(mirror, 'after release');
    await checkReads('all in sync');
    assert.deepEqual(admittedWhileHeld, [], 'A was not re-admitted while its old connection held a write');
    assert.deepEqual(badReads.slice(0, 5), [], 'every read and every readable leg showed W');
    assertSameBytes(storeA.bytes, storeB.bytes, 'A and B after resync');
  });

  for (const fault of ['eio', 'hang', 'refuse'] as const) {
    test(`f3 (${fault}): a leg that always fails costs ~one leg timeout, then is parked faulty until reconnectLegNow`, async () => {
      const stores = makeStores(2, kDeviceBytes);
      const [storeA, storeB] = stores as [FaultStore, FaultStore];
      const maxFailures = 3;
      open = await openFaultMirror(stores, {
        // 250 ms, not less: under load the healthy leg B must not time out too (then a client
        // write fails with EIO, rightly, and the test would fail for the wrong reason).
        legTimeoutMs: 250, probeTimeoutMs: 250, fenceTimeoutMs: 250, legMaxFailures: maxFailures, legFailureWindowMs: 60_000,
      });
      const { mirror, driver } = open;
      if (fault === 'eio') storeA.eio = 'writes';
      else if (fault === 'hang') storeA.hang = true;
      else {
        // Found by the model test: reconnects that fail until the leg is parked.
        storeA.refuseOpen = true;
        storeA.drop();
      }
      // Client writes live at 64K and above; a probe (block 0) is told apart by its offset.
      const clientBase = 64 * kKiB;
      let writes = 0;
      const deadline = Date.now() + 2000;
      while (Date.now() < deadline) {
        const errno = await driver.write(clientBase + (writes % 16) * 4096, filled(4096, writes));
        assert.equal(errno, 0, `client write ${writes} succeeds through B`);
        writes += 1;
      }
      const clientWritesTimedOut = storeA.timeouts.filter((waited) => waited.some((request) => request.command === p.kCmdWrite && request.offsetBytes >= clientBase)).length;
      const clientWritesFailed = storeA.received.filter((request) => request.command === p.kCmdWrite && request.offsetBytes >= clientBase).length;
      const statusA = mirror.legStatus()[0];
      const summary = `${writes} client writes; A: ${storeA.opens} opens, ${clientWritesFailed} client writes sent, ` +
        `${clientWritesTimedOut} timed out with a client write waiting, ${statusA?.failures} failures, state ${statusA?.state}`;
      if (fault === 'hang') assert.ok(clientWritesTimedOut <= 2, `client writes that waited a whole leg timeout: ~1 (${summary})`);
      else assert.ok(clientWritesFailed <= 2, `client writes sent to the always-failing leg: ~1 (${summary})`);
      // EIO: each failed probe counts, so the leg is parked 'faulty'. Hang: its old connection
      // never drains, so it may also sit in 'fencing' for good; either way it stays out.
      const parked = fault === 'hang' ? ['faulty', 'fencing'] : ['faulty'];
      await waitState(mirror, 0, parked, `A parked after ${maxFailures} failures (${summary})`);
      const opensParked = storeA.opens;
      const parkedAs = stateOf(mirror, 0);
      await sleep(300);
      assert.equal(stateOf(mirror, 0), parkedAs, `A stays ${parkedAs}`);
      assert.equal(storeA.opens, opensParked, `a ${parkedAs} leg is not reconnected by itself`);

      storeA.heal();
      storeA.release();
      if (['faulty', 'failed', 'degraded'].includes(stateOf(mirror, 0))) await mirror.reconnectLegNow(0);
      await waitAllInSync(mirror, 'after reconnectLegNow');
      assertSameBytes(storeA.bytes, storeB.bytes, 'A and B after resync');
    });
  }

  test('f5: a leg server that crashed while the mirror was disconnected from it does not serve writes it lost', async () => {
    const stores = makeStores(2, kDeviceBytes);
    const [storeA, storeB] = stores as [FaultStore, FaultStore];
    // Read repair off: the failed READ must fail the leg (a leg that left without a drop).
    open = await openFaultMirror(stores, {}, { readRepair: false });
    const { mirror, driver } = open;
    const x = filled(16 * kKiB, 20);
    assert.equal(await driver.write(0, x), 0, 'X on both legs, not flushed');
    // A fails a READ (not a drop), so nothing says its unflushed writes are at risk...
    storeA.eio = 'reads';
    storeA.eioBudget = 1;
    storeA.refuseOpen = true;
    for (let attempt = 0; attempt < 4 && stateOf(mirror, 0) === 'in-sync'; attempt += 1) {
      // Elsewhere than X: a failed READ marks its own range for a fresh copy.
      const read = await driver.read(128 * kKiB, 16 * kKiB);
      assert.equal(read.errno, 0, 'the read is retried on B');
    }
    await waitState(mirror, 0, ['degraded', 'faulty'], 'A out, its reconnects refused');
    await waitFor(() => storeA.refusedOpens > 0, kSettleMs);
    assert.equal([...storeA.connections].filter((leg) => leg.state === 'open').length, 0, 'no connection to A is open');
    // ...then A's server crashes while no connection is open: X was never flushed there.
    storeA.crash();
    assert.notEqual(firstDifference(storeA.bytes.subarray(0, x.length), x), -1, 'A lost X');
    storeA.heal();
    if (stateOf(mirror, 0) === 'faulty') await mirror.reconnectLegNow(0);
    const violations: string[] = [];
    const unsubscribe = mirror.on(() => violations.push(...readableMismatches(mirror, stores, 0, x)));
    try {
      await waitAllInSync(mirror, 'A back');
    } finally {
      unsubscribe();
    }
    violations.push(...readableMismatches(mirror, stores, 0, x));
    assert.deepEqual(violations.slice(0, 5), [], 'A was never readable where it lost X');
    const read = await driver.read(0, 16 * kKiB);
    assert.equal(read.errno, 0);
    assertSameBytes(read.data as Uint8Array, x, 'X reads back');
    assertSameBytes(storeA.bytes, storeB.bytes, 'A and B after resync');
  });

  test('f7: a leg that lost its unflushed writes is not taken as the holder of them while it is out', async () => {
    const stores = makeStores(2, kDeviceBytes);
    const [storeA, storeB] = stores as [FaultStore, FaultStore];
    open = await openFaultMirror(stores);
    const { mirror, driver } = open;
    const x = filled(4 * kKiB, 40);
    assert.equal(await driver.write(32 * kKiB, x), 0, 'X on both legs, not flushed');
    // B's server crashes (X lost there) and B stays out: its reconnects are refused.
    storeB.refuseOpen = true;
    storeB.crash();
    await waitState(mirror, 1, ['degraded', 'faulty'], 'B out');
    // A, the only up-to-date leg, fails one READ over X. A still holds X; B does not.
    storeA.eio = 'reads';
    storeA.eioBudget = 1;
    const failed = await driver.read(0, 64 * kKiB);
    assert.ok(failed.errno === 0 || failed.errno === p.kEIo, 'the read answers 0 or EIO');
    if (failed.errno === 0) assertSameBytes((failed.data as Uint8Array).subarray(32 * kKiB, 36 * kKiB), x, 'X read back');
    storeA.heal();
    storeB.heal();
    const expected = x;
    const violations: string[] = [];
    const unsubscribe = mirror.on(() => violations.push(...readableMismatches(mirror, stores, 32 * kKiB, expected)));
    try {
      for (const leg of [0, 1]) if (['faulty', 'failed'].includes(stateOf(mirror, leg))) await mirror.reconnectLegNow(leg);
      await waitAllInSync(mirror, 'both back');
    } finally {
      unsubscribe();
    }
    violations.push(...readableMismatches(mirror, stores, 32 * kKiB, expected));
    assert.deepEqual(violations.slice(0, 5), [], 'no leg was readable over X without holding it');
    const read = await driver.read(32 * kKiB, 4 * kKiB);
    assert.equal(read.errno, 0);
    assertSameBytes(read.data as Uint8Array, x, 'acknowledged X reads back');
    assertSameBytes(storeA.bytes, storeB.bytes, 'A and B after resync');
  });

  test('f8: both legs out, each may have lost unflushed writes: the one that lost X does not become the reference', async () => {
    const stores = makeStores(2, kDeviceBytes);
    const [storeA, storeB] = stores as [FaultStore, FaultStore];
    open = await openFaultMirror(stores);
    const { mirror, driver } = open;
    // B misses X, then gets it by resync (a copy: unflushed on B too).
    storeB.refuseOpen = true;
    storeB.drop();
    await waitState(mirror, 1, ['degraded', 'faulty'], 'B out');
    const x = filled(8 * kKiB, 50);
    assert.equal(await driver.write(8 * kKiB, x), 0, 'X acknowledged by A alone, not flushed');
    storeB.heal();
    if (stateOf(mirror, 1) === 'faulty') await mirror.reconnectLegNow(1);
    await waitAllInSync(mirror, 'B resynced X');
    assertSameBytes(storeB.bytes.subarray(8 * kKiB, 16 * kKiB), x, 'B holds X');
    // A's server crashes (X lost on A) and stays out; B, the last in-sync leg, then drops.
    storeA.refuseOpen = true;
    storeA.crash();
    await waitState(mirror, 0, ['degraded', 'faulty'], 'A out');
    storeB.refuseOpen = true;
    storeB.drop();
    await waitState(mirror, 1, ['degraded', 'faulty'], 'B out');
    // B (which still holds X) comes back first, then A (which lost it).
    const violations: string[] = [];
    const unsubscribe = mirror.on(() => violations.push(...readableMismatches(mirror, stores, 8 * kKiB, x)));
    try {
      storeB.heal();
      if (stateOf(mirror, 1) === 'faulty') await mirror.reconnectLegNow(1);
      await waitState(mirror, 1, ['in-sync', 'resyncing'], 'B back');
      storeA.heal();
      if (stateOf(mirror, 0) === 'faulty') await mirror.reconnectLegNow(0);
      await waitAllInSync(mirror, 'both back');
    } finally {
      unsubscribe();
    }
    violations.push(...readableMismatches(mirror, stores, 8 * kKiB, x));
    assert.deepEqual(violations.slice(0, 5), [], 'no leg was readable over X without holding it');
    const read = await driver.read(8 * kKiB, 8 * kKiB);
    assert.equal(read.errno, 0);
    assertSameBytes(read.data as Uint8Array, x, 'acknowledged X reads back');
    assertSameBytes(storeA.bytes, storeB.bytes, 'A and B after resync');
  });

  test('f9: a write A acknowledged just before its server crashed, completed after, is not lost on A', async () => {
    const stores = makeStores(2, kDeviceBytes);
    const [storeA, storeB] = stores as [FaultStore, FaultStore];
    // A leg timeout far above B's 40 ms: with the default 80 ms, B timed out under load (two CPU
    // hogs, 2 of 3 runs) and X failed with EIO, rightly, but not for the reason under test.
    open = await openFaultMirror(stores, { legTimeoutMs: 2000, probeTimeoutMs: 2000 });
    const { mirror, driver } = open;
    // B answers late, so the write completes at the mirror only after A's crash.
    storeB.slowMs = 40;
    const x = filled(8 * kKiB, 60);
    const appliedBefore = storeA.applied.length;
    const write = driver.write(40 * kKiB, x);
    assert.ok(await waitFor(() => storeA.applied.length > appliedBefore, kSettleMs, 1), 'A applied X');
    await new Promise((resolve) => setImmediate(resolve));
    storeA.crash(); // X was never flushed on A: gone there
    assert.equal(await write, 0, 'X acknowledged (B holds it)');
    storeB.slowMs = 0;
    const violations: string[] = [];
    const unsubscribe = mirror.on(() => violations.push(...readableMismatches(mirror, stores, 40 * kKiB, x)));
    try {
      await waitFor(() => storeA.opens > 1, kSettleMs);
      await waitAllInSync(mirror, 'A back');
    } finally {
      unsubscribe();
    }
    violations.push(...readableMismatches(mirror, stores, 40 * kKiB, x));
    assert.deepEqual(violations.slice(0, 5), [], 'A was never readable over X without holding it');
    assertSameBytes(storeA.bytes, storeB.bytes, 'A and B after resync');
  });

  // Out of the issue-10 rules: nothing in NBD says a server lost everything. Kept as a todo
  // until the engine checks a leg's identity (on-leg superblock) when it reconnects.
  test('f6: a leg server restarted on an empty file is not served from as if it held the data', async () => {
    const stores = makeStores(2, kDeviceBytes);
    const [storeA, storeB] = stores as [FaultStore, FaultStore];
    open = await openFaultMirror(stores, { metadata: true });
    const { mirror, driver } = open;
    const x = filled(32 * kKiB, 30);
    assert.equal(await driver.write(64 * kKiB, x), 0, 'X written');
    assert.equal(await driver.flush(), 0, 'and flushed on both legs');
    const violations: string[] = [];
    const unsubscribe = mirror.on(() => violations.push(...readableMismatches(mirror, stores, 64 * kKiB, x)));
    try {
      const opensBefore = storeA.opens;
      storeA.blank();
      await waitFor(() => storeA.opens > opensBefore, kSettleMs);
      await waitAllInSync(mirror, 'A back');
      for (let step = 0; step < 10; step += 1) {
        violations.push(...readableMismatches(mirror, stores, 64 * kKiB, x));
        await sleep(10);
      }
    } finally {
      unsubscribe();
    }
    assert.deepEqual(violations.slice(0, 5), [], 'the blank leg was never readable where X is');
    const data = mirror.sizeBytes;
    assertSameBytes(storeA.bytes.subarray(0, data), storeB.bytes.subarray(0, data), 'A and B data areas after resync');
    assert.ok(open.events.some((event) => event.type === 'leg-state' && event.leg === 0 && event.state === 'resyncing'), 'the blank leg came back resyncing (a full resync), not in sync');
  });

  test('f4: empty WRITE/TRIM/WRITE_ZEROES and a ranged FLUSH never reach a leg; no leg degrades', async () => {
    const stores = makeStores(2, kDeviceBytes);
    const [, storeB] = stores as [FaultStore, FaultStore];
    storeB.strict = true; // like nbdkit: EINVAL for count 0 and for a FLUSH with a range
    open = await openFaultMirror(stores);
    const { mirror, driver } = open;
    const before = stores.map((store) => store.receivedCount);
    const answers: Record<string, number> = {
      'WRITE 0 bytes': await driver.write(4096, new Uint8Array(0)),
      'TRIM 0 bytes': await driver.trim(4096, 0),
      'WRITE_ZEROES 0 bytes': await driver.zero(8192, 0),
      'FLUSH 4096+4096': await driver.flush(4096, 4096),
      'FLUSH 0+4096': await driver.flush(0, 4096),
    };
    for (const [what, errno] of Object.entries(answers)) {
      assert.ok(errno === 0 || errno === p.kEInval, `${what}: answered 0 or EINVAL (got ${errnoNames[errno] ?? errno})`);
    }
    await sleep(50);
    // The engine may answer them itself or pass a FLUSH on as a whole-device FLUSH 0+0; what
    // must never reach a leg is a request in the shapes a strict server refuses.
    const invalid = (command: number, offsetBytes: number, lengthBytes: number): boolean =>
      command === p.kCmdFlush ? offsetBytes !== 0 || lengthBytes !== 0 : lengthBytes === 0;
    const reached = stores.flatMap((store, leg) => store.received.slice(before[leg])
      .filter((request) => invalid(request.command, request.offsetBytes, request.lengthBytes))
      .map((request) => `leg ${leg}: ${commandNames[request.command] ?? request.command} ${request.offsetBytes}+${request.lengthBytes}`));
    assert.deepEqual(reached, [], 'none of them reached a leg as such');
    assert.equal(storeB.strictRefusals, 0, 'the strict leg refused nothing');
    assert.deepEqual(legStates(mirror), ['in-sync', 'in-sync'], 'no leg degraded');
    assert.equal(open.events.length, 0, 'no leg-state event');
    assert.equal(await driver.write(0, filled(4096, 5)), 0, 'a normal write still goes to both legs');
    assertSameBytes(stores[0]?.bytes as Uint8Array, storeB.bytes, 'legs equal');
  });
});
