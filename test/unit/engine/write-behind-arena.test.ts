/**
 * Write-behind shadow storage at the engine level (issue 14): shadows live in the ring's shadow
 * arena, so far more shadows than ring slots can be live at once (before, each took a whole
 * slot and at most a quarter of the slots), clients still get every slot meanwhile, a shadow
 * bigger than a granule lands whole, and when the arena is full the write goes to the slow
 * leg synchronously (bound hit) and still lands. MirrorDevice (inline) over fault legs
 * (test/helpers/fault-device.ts; ring of 32 slots of 64 KiB) with leg 1 held (hanging).
 *
 * Threads: test main thread (the legs run inline). Nothing asserts a duration; deadlines are for
 * waiting only.
 */
import { afterEach, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import type { MirrorOptions } from '../../../src/engine/mirror.js';
import { shadowRingOptions } from '../../../src/engine/write-behind.js';
import { legStates, makeStores, openFaultMirror, waitFor, filled, answeredAfterRelease, type FaultMirror } from '../../helpers/fault-device.js';
import { assertSameBytes } from '../../helpers/mirror.js';

const kKiB = 1024;
const kDeviceBytes = 1024 * kKiB;
const kSettleMs = 20_000;

describe('write-behind shadow arena over fault legs', () => {
  let open: FaultMirror | null = null;
  afterEach(async () => {
    await open?.close();
    open = null;
  });

  async function start(extra: Partial<MirrorOptions>): Promise<FaultMirror> {
    open = await openFaultMirror(makeStores(2, kDeviceBytes), { legTimeoutMs: 10_000, probeTimeoutMs: 5000 }, extra);
    return open;
  }

  test('the arena is sized from the bound: one descriptor per granule', () => {
    assert.deepEqual(shadowRingOptions({ writeBehindBytes: 0, writeMostly: [1] }), {});
    assert.deepEqual(shadowRingOptions({ writeBehindBytes: 1 << 20, writeMostly: [] }), {});
    assert.deepEqual(shadowRingOptions({ writeBehindBytes: 1 << 20, writeMostly: [1] }), { shadowArenaBytes: 1 << 20, shadowSlots: 256 });
    assert.deepEqual(shadowRingOptions({ writeBehindBytes: 5000, writeMostly: [1, 2] }), { shadowArenaBytes: 12288, shadowSlots: 3 });
    assert.equal(shadowRingOptions({ writeBehindBytes: 64 << 20, writeMostly: [1] }).shadowSlots, 8192, 'descriptors are capped');
  });

  test('more live shadows than ring slots; clients are not starved meanwhile; all land and the legs agree', async () => {
    const run = await start({ writeMostly: [1], writeBehindBytes: 512 * kKiB });
    const [storeA, storeB] = run.stores as [FaultMirror['stores'][number], FaultMirror['stores'][number]];
    storeB.hang = true; // leg 1 holds every request unanswered: every shadow stays live
    const writes: Array<[number, Uint8Array]> = [];
    // 96 writes of 4 KiB (three times the ring's 32 slots) and 8 of 12 KiB (three granules each).
    for (let index = 0; index < 96; index += 1) writes.push([index * 8 * kKiB, filled(4 * kKiB, index)]);
    for (let index = 0; index < 8; index += 1) writes.push([800 * kKiB + index * 16 * kKiB + 512, filled(12 * kKiB, 200 + index)]);
    for (let from = 0; from < writes.length; from += 16) {
      const errnos = await Promise.all(writes.slice(from, from + 16).map(([offset, data]) => run.driver.write(offset, data)));
      assert.deepEqual(errnos, errnos.map(() => 0), `writes ${from}.. acknowledged while leg 1 holds them`);
    }
    const status = run.mirror.legStatus()[1];
    assert.equal(status?.state, 'in-sync');
    assert.equal(status?.behindBytes, 96 * 4 * kKiB + 8 * 12 * kKiB, 'every write is behind on leg 1 (none went synchronously)');
    assert.equal(status?.boundHits, 0);
    assert.equal(status?.deferredWrites, writes.length);
    // Clients get ring slots while 104 shadows are live: reads of the whole slot size, 32 at once.
    const reads = await Promise.all(Array.from({ length: 32 }, (_, index) => run.driver.read((index % 16) * 64 * kKiB, 64 * kKiB)));
    assert.ok(reads.every((read) => read.errno === 0), 'every client read got a slot and was served');
    for (const [offset, data] of writes.slice(0, 4)) {
      const read = await run.driver.read(offset, data.length);
      assertSameBytes(read.data as Uint8Array, data, `acknowledged write at ${offset} reads back (from leg 0)`);
    }
    storeB.hang = false;
    storeB.release();
    assert.ok(await waitFor(() => (run.mirror.legStatus()[1]?.behindBytes ?? -1) === 0, kSettleMs), 'leg 1 caught up');
    assert.equal(run.mirror.dirtyMap(1)?.dirtyBytes(), 0, 'nothing marked any more');
    assert.deepEqual(legStates(run.mirror), ['in-sync', 'in-sync']);
    assertSameBytes(storeA.bytes, storeB.bytes, 'legs identical');
  });

  test('a shadow descriptor reused over another granule run sends that run\'s bytes (no stale cached view)', async () => {
    // 12 KiB bound: three granules, three descriptors. Each round leaves descriptors and
    // granules paired differently (shadows of 4 and 8 KiB, landing in batches), so a descriptor
    // comes back with the same length over a different run; a view cached by length alone
    // would send leg 1 an older shadow's bytes at the new offset.
    const run = await start({ writeMostly: [1], writeBehindBytes: 12 * kKiB });
    const [storeA, storeB] = run.stores as [FaultMirror['stores'][number], FaultMirror['stores'][number]];
    let seed = 1;
    for (let round = 0; round < 12; round += 1) {
      storeB.hang = true;
      const lengths = round % 3 === 0 ? [4, 8] : round % 3 === 1 ? [8, 4] : [4, 4, 4];
      let offset = round * 64 * kKiB;
      for (const lengthKiB of lengths) {
        assert.equal(await run.driver.write(offset, filled(lengthKiB * kKiB, seed)), 0);
        offset += lengthKiB * kKiB + 4 * kKiB;
        seed += 1;
      }
      storeB.hang = false;
      storeB.release();
      assert.ok(await waitFor(() => (run.mirror.legStatus()[1]?.behindBytes ?? -1) === 0, kSettleMs), `round ${round}: leg 1 caught up`);
      assertSameBytes(storeA.bytes, storeB.bytes, `round ${round}: legs identical`);
    }
  });

  test('a full arena sends the write synchronously (acknowledged once leg 1 has it); freed out of order, it is reused', async () => {
    // 16 KiB bound: four granules.
    const run = await start({ writeMostly: [1], writeBehindBytes: 16 * kKiB });
    const [storeA, storeB] = run.stores as [FaultMirror['stores'][number], FaultMirror['stores'][number]];
    storeB.hang = true;
    for (let index = 0; index < 4; index += 1) assert.equal(await run.driver.write(index * 64 * kKiB, filled(4 * kKiB, 60 + index)), 0);
    assert.equal(run.mirror.legStatus()[1]?.behindBytes, 16 * kKiB);
    const beyond = await answeredAfterRelease(storeB, run.driver.write(512 * kKiB, filled(4 * kKiB, 70)));
    assert.equal(beyond.heldBack, true, 'arena and bound full: the write waits for leg 1');
    assert.equal(beyond.errno, 0);
    assert.ok((run.mirror.legStatus()[1]?.boundHits ?? 0) >= 1);
    assert.ok(await waitFor(() => (run.mirror.legStatus()[1]?.behindBytes ?? -1) === 0, kSettleMs));
    // The arena is free again: more shadows fit, including one of the whole arena.
    assert.equal(await run.driver.write(700 * kKiB, filled(16 * kKiB, 80)), 0);
    assert.ok(await waitFor(() => (run.mirror.legStatus()[1]?.behindBytes ?? -1) === 0, kSettleMs));
    assertSameBytes(storeA.bytes, storeB.bytes, 'legs identical');
  });
});
