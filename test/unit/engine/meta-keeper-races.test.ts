/**
 * Races between the metadata keeper's I/O loop (src/engine/meta-keeper.ts, one metadata request
 * at a time) and leg state changes that happen while it awaits. Each test holds a chosen
 * metadata request on a store (FaultStore.holdIf), changes leg states while it is held, lets it
 * go (store.release()), and checks what the legs durably hold against what the engine did:
 *   (r1) a leg admitted (probation -> resyncing) while the loop writes a member table that no
 *        admitted leg was left to take: the leg gets that table before the next write it is
 *        sent is acknowledged (else its durable table still records the failed leg in sync);
 *   (r2) a write parked for one chunk's bit while another chunk of its range, already durable,
 *        is cleared as quiet: the write still goes out and is acknowledged (it does not wait for
 *        a bit nobody sets again);
 *   (r3) a leg removed and its index reused by `leg add` before the table recording the removal
 *        was chosen: the old member is recorded removed, not left in sync forever;
 *   (r4) a `leg add` whose metadata writes fail: its member slot does not stay needs-full-sync
 *        (which would keep every bit from ever clearing);
 *   (r5) a bit set while a returning leg's admission is written, its page written while no leg
 *        was admitted (the other leg failed): the returning leg holds the bit before a write to
 *        that chunk it takes (and the failed leg misses) is acknowledged.
 *
 * Threads: test main thread (the legs run inline over FaultStores, test/helpers/fault-device.ts).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { superblockOffsets, type LegLayout } from '../../../src/meta/layout.js';
import { bitmapTest } from '../../../src/meta/leg-meta.js';
import * as p from '../../../src/nbd/protocol.js';
import { legStates, makeStores, waitFor, type FaultMirror, type FaultStore } from '../../helpers/fault-device.js';
import { bitmapOf, isBitmapPageWrite, kMetaChunkBytes, openMetaMirror, pattern, setBits, superblockOf } from '../../helpers/meta-mirror.js';

const kLegBytes = 1024 * 1024;
/** Long leg timeouts: metadata requests are held on purpose. */
const kHeld = { legTimeoutMs: 60_000 };

/**
 * Leg 1 misses a write (pattern `seed`) and leg 0 durably records it stale; resync paused, leg 1
 * is reconnected and its admission (the whole bitmap written to it) is held on store 1.
 * Resolves once the admission's first page write is held, with the reconnect still running
 * (wrapped: an async function would otherwise wait for it).
 */
async function returnLegOneHeldAtAdmission(fm: FaultMirror, store0: FaultStore, store1: FaultStore, layout: LegLayout, seed: number): Promise<{ returned: Promise<unknown> }> {
  const { mirror } = fm;
  mirror.failLegByHand(1);
  assert.equal(await fm.driver.write(2 * kMetaChunkBytes, pattern(seed, 4096)), 0);
  assert.ok(await waitFor(() => superblockOf(store0, true)?.members[1]?.state === 'needs-resync', 30_000), 'leg 0 records leg 1 stale');
  mirror.pauseResync(true);
  store1.holdIf = (request) => isBitmapPageWrite(request, layout);
  const returned = mirror.reconnectLegNow(1);
  assert.ok(await waitFor(() => store1.heldCount === 1, 30_000), `leg 1's admission is held: ${legStates(mirror).join(',')}`);
  return { returned };
}

/** Leg 0 goes away for good (its store refuses reconnects); resolves once it is out of sync. */
async function loseForGood(mirror: FaultMirror['mirror'], store0: FaultStore): Promise<void> {
  store0.refuseOpen = true;
  store0.drop();
  assert.ok(await waitFor(() => legStates(mirror)[0] !== 'in-sync', 30_000), 'leg 0 left');
}

test('(r1) a leg admitted while the loop writes a table no admitted leg took gets that table before its next write is acknowledged', async () => {
  const stores = makeStores(2, kLegBytes);
  const [store0, store1] = stores as [FaultStore, FaultStore];
  const { fm, layout } = await openMetaMirror(stores, 60_000, { tuning: kHeld });
  const { mirror } = fm;
  try {
    const { returned } = await returnLegOneHeldAtAdmission(fm, store0, store1, layout, 1);
    // Meanwhile leg 0 goes away for good: the table saying so has no admitted leg to go to.
    await loseForGood(mirror, store0);
    store1.holdIf = null;
    store1.release();
    await returned;
    assert.equal(legStates(mirror)[1], 'resyncing', `leg 1 admitted: ${legStates(mirror).join(',')}`);
    // A write to a chunk leg 1 holds succeeds on leg 1 alone: leg 0 misses it.
    let recordedAtAck: string | undefined = 'not acknowledged';
    const errno = await fm.driver.write(5 * kMetaChunkBytes, pattern(2, 4096), 0).then((answer) => {
      recordedAtAck = superblockOf(store1, true)?.members[0]?.state;
      return answer;
    });
    assert.equal(errno, 0, 'leg 1 holds the range: the write succeeds');
    assert.equal(recordedAtAck, 'needs-resync', 'when the write leg 0 missed is acknowledged, leg 1 durably records leg 0 as stale');
    assert.ok(bitmapTest(bitmapOf(store1, layout, true), 5), 'and the chunk\'s bit is durable on leg 1');
  } finally {
    store0.heal();
    for (const store of stores) store.release();
    await fm.close();
  }
});

test('(r2) a write parked for one chunk\'s bit goes out even when another chunk of its range is cleared as quiet meanwhile', async () => {
  const stores = makeStores(2, kLegBytes);
  const [store0] = stores as [FaultStore, FaultStore];
  const { fm, layout } = await openMetaMirror(stores, 40, { tuning: kHeld });
  const { mirror } = fm;
  try {
    // Chunk 3's bit is set and stays (the write is not flushed yet).
    assert.equal(await fm.driver.write(3 * kMetaChunkBytes, pattern(3, 4096)), 0);
    assert.equal(mirror.metadataStatus()?.dirtyChunks, 1);
    // A write across the end of chunk 3 and the start of chunk 4 waits for chunk 4's bit, whose
    // page write is held on leg 0.
    store0.holdIf = (request) => isBitmapPageWrite(request, layout);
    const offset = 4 * kMetaChunkBytes - 2048;
    const data = pattern(4, 8192);
    let answered: number | null = null;
    const spanning = fm.driver.write(offset, data).then((errno) => {
      answered = errno;
      return errno;
    });
    assert.ok(await waitFor(() => store0.heldCount === 1, 30_000), 'chunk 4\'s page write is held');
    // Chunk 3 is flushed: quiet for ten heartbeat periods, for the keeper to (wrongly) clear its
    // bit while the spanning write still waits (the unfixed keeper did within two).
    assert.equal(await fm.driver.flush(), 0);
    await waitFor(() => mirror.metadataStatus()?.dirtyChunks === 0, 400);
    store0.holdIf = null;
    store0.release();
    assert.ok(await waitFor(() => answered !== null, 30_000), 'the spanning write is answered');
    assert.equal(await spanning, 0);
    const back = await fm.driver.read(offset, data.length);
    assert.equal(back.errno, 0);
    assert.deepEqual(back.data, data, 'the spanning write reads back');
    for (const [index, store] of stores.entries()) {
      assert.deepEqual(store.bytes.subarray(offset, offset + data.length), data, `leg ${index} holds it`);
    }
  } finally {
    for (const store of stores) store.release();
    await fm.close();
  }
});

/** The state of every leg by index (removed legs absent). */
function stateOf(fm: FaultMirror, index: number): string | undefined {
  return fm.mirror.legStatus().find((leg) => leg.index === index)?.state;
}

test('(r3) a leg removed and its index reused by leg add before the removal\'s table was chosen is recorded removed, not in sync', async () => {
  const stores = makeStores(3, kLegBytes);
  const [extra] = makeStores(4, kLegBytes).slice(3) as [FaultStore];
  const [store0, store1] = stores as [FaultStore, FaultStore, FaultStore];
  const { fm } = await openMetaMirror(stores, 60_000, { tuning: kHeld, extraStores: [extra] });
  const { mirror } = fm;
  const superblockAt = new Set(superblockOffsets(store0.sizeBytes));
  try {
    assert.equal(await fm.driver.write(kMetaChunkBytes, pattern(5, 4096)), 0);
    const oldUuid = superblockOf(store1, true)?.legUuid;
    assert.ok(oldUuid !== undefined);
    // Leg 2 leaves: the table saying so is held on its way to leg 0.
    store0.holdIf = (request) => request.command === p.kCmdWrite && superblockAt.has(request.offsetBytes);
    mirror.failLegByHand(2);
    assert.ok(await waitFor(() => store0.heldCount === 1, 30_000), 'the table write is held on leg 0');
    // Meanwhile leg 1 is removed and a new leg added in its index.
    await mirror.removeLeg(1);
    const added = mirror.addLeg(extra.name);
    // Its admission waits behind the held write: let the loop go on.
    assert.ok(await waitFor(() => mirror.legStatus().some((leg) => leg.index === 1 && leg.uri === extra.name), 30_000), 'the new leg takes index 1');
    store0.holdIf = null;
    store0.release();
    assert.equal(await added, 1);
    assert.ok(await waitFor(() => stateOf(fm, 1) === 'in-sync', 10_000), `the new leg resynced: ${legStates(mirror).join(',')}`);
    // A write acknowledged now: the removed leg missed it.
    let recordedAtAck: string | undefined = 'not acknowledged';
    const errno = await fm.driver.write(6 * kMetaChunkBytes, pattern(6, 4096)).then((answer) => {
      recordedAtAck = superblockOf(store0, true)?.members.find((member) => member.legUuid === oldUuid)?.state;
      return answer;
    });
    assert.equal(errno, 0);
    assert.notEqual(recordedAtAck, 'in-sync', 'when a write the removed leg missed is acknowledged, leg 0 does not record the removed leg in sync');
    const status = mirror.metadataStatus();
    assert.ok(status?.members.every((member) => member.legUuid !== oldUuid || member.state === 'removed'), `the keeper's table: ${JSON.stringify(status?.members)}`);
  } finally {
    for (const store of [...stores, extra]) store.release();
    await fm.close();
  }
});

test('(r4) a leg add whose metadata writes fail leaves no member needing a full sync behind: bits still clear', async () => {
  const stores = makeStores(2, kLegBytes);
  const [extra] = makeStores(3, kLegBytes).slice(2) as [FaultStore];
  const [store0] = stores as [FaultStore, FaultStore];
  const { fm, layout } = await openMetaMirror(stores, 40, { tuning: kHeld, extraStores: [extra] });
  const { mirror } = fm;
  const superblockRead = superblockOffsets(extra.sizeBytes)[0];
  try {
    // The new leg passes its probe; its admission's superblock READ is held, then its writes fail.
    extra.holdIf = (request) => request.command === p.kCmdRead && request.offsetBytes === superblockRead;
    const added = mirror.addLeg(extra.name);
    assert.ok(await waitFor(() => extra.heldCount === 1, 30_000), 'the admission\'s READ is held');
    extra.holdIf = null;
    extra.eio = 'writes';
    extra.release();
    await assert.rejects(added, /writing its metadata failed/);
    assert.deepEqual(legStates(mirror), ['in-sync', 'in-sync']);
    // Every member in sync again: a flushed write's bit clears after quiet periods.
    assert.equal(await fm.driver.write(2 * kMetaChunkBytes, pattern(7, 4096)), 0);
    assert.equal(await fm.driver.flush(), 0);
    const cleared = await waitFor(() => setBits(bitmapOf(store0, layout, true), layout).length === 0, 30_000);
    assert.ok(cleared, `bits cleared on leg 0 (${setBits(bitmapOf(store0, layout, true), layout).join(',')}); table ${JSON.stringify(superblockOf(store0, true)?.members.map((member) => member.state))}`);
    assert.ok(superblockOf(store0, true)?.members.every((member) => member.state === 'in-sync' || member.state === 'removed'), 'no member left needing a sync');
  } finally {
    for (const store of [...stores, extra]) store.release();
    await fm.close();
  }
});

test('(r5) a bit set while a returning leg\'s admission is written, with no leg admitted meanwhile, is durable on that leg before a write there is acknowledged', async () => {
  const stores = makeStores(2, kLegBytes);
  const [store0, store1] = stores as [FaultStore, FaultStore];
  const { fm, layout } = await openMetaMirror(stores, 60_000, { tuning: kHeld });
  const { mirror } = fm;
  try {
    // Leg 1's admission (its whole bitmap, chunk 7's bit not set yet) is held.
    const { returned } = await returnLegOneHeldAtAdmission(fm, store0, store1, layout, 8);
    // A write to clean chunk 7 waits for its bit (behind the admission); then leg 0 goes for good.
    const first = fm.driver.write(7 * kMetaChunkBytes, pattern(9, 4096));
    assert.ok(await waitFor(() => mirror.metadataStatus()?.intentWaits === 2, 30_000), 'the write to chunk 7 waits for its bit');
    await loseForGood(mirror, store0);
    store1.holdIf = null;
    store1.release();
    await returned;
    assert.equal(legStates(mirror)[1], 'resyncing', `leg 1 admitted: ${legStates(mirror).join(',')}`);
    await first; // EIO or not: no leg was admitted when it was resumed
    // The next write to chunk 7 goes to leg 1: its bit must be durable there by the ack.
    let bitAtAck: boolean | null = null;
    const errno = await fm.driver.write(7 * kMetaChunkBytes + 4096, pattern(10, 4096)).then((answer) => {
      bitAtAck = bitmapTest(bitmapOf(store1, layout, true), 7);
      return answer;
    });
    assert.equal(errno, 0, 'leg 1 holds chunk 7: the write succeeds');
    assert.equal(bitAtAck, true, 'chunk 7\'s bit (leg 0 missed the write) is durable on leg 1 when the write is acknowledged');
  } finally {
    store0.heal();
    for (const store of stores) store.release();
    await fm.close();
  }
});
