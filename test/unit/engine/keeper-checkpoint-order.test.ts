/**
 * The metadata keeper's order of clearing with checkpoints (src/engine/meta-keeper.ts, issue 17):
 * "while checkpoints exist, write-intent bits are cleared only after a superblock holding the
 * maps has been written". A MetaKeeper on a fake host whose metadata store is two byte arrays
 * (one per leg) and a log: every metadata WRITE lands there when the test lets it, and after
 * each landing the leg is checked as a crash would find it: for every change made since the
 * checkpoint, the newest superblock's checkpoint map OR the write-intent bitmap must hold it
 * (restart marks every bitmap chunk in every checkpoint, so that union is what survives).
 *
 * The schedule is driven by hand (heartbeat ticks called directly, the keeper's timer never
 * fires, one bitmap page write held), so it is the same every run:
 *   1. checkpoint c1, its superblock S0 (maps empty);
 *   2. write X (its bit is written), heartbeat T1;
 *   3. write Y right after T1: its bitmap page write P is held, so the keeper is busy with
 *      pages while heartbeat T2 comes (X quiet since T1);
 *   4. P released, then more heartbeats until X's bit is cleared on the legs.
 * A keeper that cleared at the tick would write X's cleared bit right after P, before any
 * superblock with X in c1's map: the check at that landing fails (verified by breaking
 * `tick()` by hand). The right keeper clears only after the next superblock (maps with X, Y).
 * The test also requires that the bits do get cleared in the end (the check is not vacuous).
 *
 * Threads: test main thread.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { CheckpointSet, decodeRuns } from '../../../src/engine/checkpoints.js';
import { MetaKeeper, type KeeperHost } from '../../../src/engine/meta-keeper.js';
import { Leg } from '../../../src/engine/leg.js';
import type { LegActorApi } from '../../../src/engine/messages.js';
import type { SpscQueue } from '../../../src/ring/spsc-queue.js';
import { createLogger } from '../../../src/core/log.js';
import { superblockOffsets, kMetaBlockBytes, type LegLayout } from '../../../src/meta/layout.js';
import { bitmapTest, inspectCopy } from '../../../src/meta/leg-meta.js';
import type { Superblock } from '../../../src/meta/superblock.js';
import * as p from '../../../src/nbd/protocol.js';
import { createAndAssemble, makeStores } from '../../helpers/fault-device.js';

const kLegBytes = 4 * 1024 * 1024;
const kGranularityBytes = 64 * 1024;
/** Never: the test calls the heartbeat itself. */
const kHeartbeatMs = 3_600_000;

interface Landing {
  leg: number;
  what: 'bitmap' | 'superblock' | 'other';
  offsetBytes: number;
}

/** The fake host: legs as byte arrays, a log of landed writes, one bitmap page write holdable. */
class FakeMetaStore {
  readonly models: Uint8Array[];
  readonly log: Landing[] = [];
  readonly resumed: number[] = [];
  readonly violations: string[] = [];
  holdNextBitmapWrite = false;
  private releaseHeld: (() => void) | null = null;
  /** Byte ranges changed since the checkpoint (what a restart must still list). */
  readonly changes: Array<[number, number]> = [];
  checking = false;

  constructor(readonly legs: Leg[], initial: Uint8Array[], readonly layout: LegLayout) {
    this.models = initial.map((bytes) => bytes.slice());
  }

  get heldWrite(): boolean {
    return this.releaseHeld !== null;
  }

  release(): void {
    const release = this.releaseHeld;
    assert.ok(release !== null, 'a bitmap write is held');
    this.releaseHeld = null;
    release();
  }

  host(): KeeperHost {
    return {
      legs: this.legs,
      metaIo: async (command, offsetBytes, bytes, mask) => await this.metaIo(command, offsetBytes, bytes, mask),
      fua: () => true,
      flushes: () => true,
      failLeg: (leg, reason) => assert.fail(`leg ${leg.index} failed: ${reason}`),
      resume: (slot) => this.resumed.push(slot),
      release: () => undefined,
      forEachWriteInFlight: () => undefined,
      contentsUnknown: () => assert.fail('no leg is unknown here'),
      isClosed: () => false,
    };
  }

  private isBitmap(offsetBytes: number): boolean {
    return offsetBytes >= this.layout.bitmapOffsetBytes && offsetBytes < this.layout.bitmapOffsetBytes + this.layout.bitmapAreaBytes;
  }

  private async metaIo(command: number, offsetBytes: number, bytes: Uint8Array, mask: number): Promise<number> {
    if (command !== p.kCmdWrite) return 0;
    if (this.holdNextBitmapWrite && this.isBitmap(offsetBytes)) {
      this.holdNextBitmapWrite = false;
      await new Promise<void>((resolve) => (this.releaseHeld = resolve));
    }
    const what = this.isBitmap(offsetBytes) ? 'bitmap' : this.layout.superblockOffsets.includes(offsetBytes) ? 'superblock' : 'other';
    for (const leg of this.legs) {
      if ((mask & leg.bit) === 0) continue;
      (this.models[leg.index] as Uint8Array).set(bytes, offsetBytes);
      this.log.push({ leg: leg.index, what, offsetBytes });
      if (this.checking) this.checkCrashState(leg.index, what);
    }
    return 0;
  }

  newestSuperblock(legIndex: number): Superblock | null {
    const model = this.models[legIndex] as Uint8Array;
    const copies = superblockOffsets(model.length).map((offset, copy) => inspectCopy(copy, offset, model.slice(offset, offset + kMetaBlockBytes))).filter((copy) => copy.status === 'valid');
    copies.sort((a, b) => (b.sequence ?? 0) - (a.sequence ?? 0));
    return copies[0]?.superblock ?? null;
  }

  bitmapHas(legIndex: number, offsetBytes: number, lengthBytes: number): boolean {
    const model = this.models[legIndex] as Uint8Array;
    const bitmap = model.subarray(this.layout.bitmapOffsetBytes, this.layout.bitmapOffsetBytes + this.layout.bitmapBytes);
    const chunkBytes = this.layout.bitmapChunkBytes;
    for (let chunk = Math.floor(offsetBytes / chunkBytes); chunk * chunkBytes < offsetBytes + lengthBytes; chunk += 1) if (!bitmapTest(bitmap, chunk)) return false;
    return true;
  }

  /** What a restart from this leg now would list for c1: every change must be in it. */
  private checkCrashState(legIndex: number, what: string): void {
    const sb = this.newestSuperblock(legIndex);
    const record = sb?.checkpoints?.find((entry) => entry.name === 'c1');
    if (record === undefined) {
      this.violations.push(`leg ${legIndex}, after landing #${this.log.length} (${what}): the newest superblock has no checkpoint c1`);
      return;
    }
    const stored: Array<[number, number]> = [];
    decodeRuns(record.runs, record.unitBytes, (offsetBytes, lengthBytes) => stored.push([offsetBytes, lengthBytes]));
    for (const [offsetBytes, lengthBytes] of this.changes) {
      const inMap = stored.some(([start, length]) => start <= offsetBytes && offsetBytes + lengthBytes <= start + length);
      if (!inMap && !this.bitmapHas(legIndex, offsetBytes, lengthBytes)) {
        this.violations.push(`leg ${legIndex}, after landing #${this.log.length} (${what}): the change at ${offsetBytes}+${lengthBytes} is neither in the newest superblock's map of c1 nor in the write-intent bitmap (a crash now would lose it)`);
      }
    }
  }
}

async function settle(): Promise<void> {
  for (let turn = 0; turn < 5; turn += 1) await new Promise((resolve) => setImmediate(resolve));
}

function tick(keeper: MetaKeeper): void {
  // the heartbeat, by hand (private: the timer is set never to fire)
  (keeper as unknown as { tick(): void }).tick();
}

test('with a checkpoint, a write-intent bit is cleared on the legs only after a superblock holding the maps', async () => {
  const stores = makeStores(2, kLegBytes);
  const assembled = await createAndAssemble(stores);
  const layout = assembled.plan.layout;
  const legs = stores.map((store, index) => new Leg(index, store.name, null as unknown as SpscQueue, null as unknown as SpscQueue, null as unknown as LegActorApi));
  const fake = new FakeMetaStore(legs, stores.map((store) => store.bytes), layout);
  const checkpoints = new CheckpointSet(layout.dataSizeBytes, kGranularityBytes);
  const keeper = new MetaKeeper(fake.host(), assembled, { heartbeatMs: kHeartbeatMs, logger: createLogger({ level: 'silent', pretty: false }), checkpoints });
  const write = (slot: number, offsetBytes: number, lengthBytes: number): void => {
    // as MirrorDevice.dispatch: the checkpoints are marked, then the write intent is checked
    checkpoints.mark(offsetBytes, lengthBytes);
    fake.changes.push([offsetBytes, lengthBytes]);
    if (!keeper.covers(offsetBytes, lengthBytes)) keeper.park(slot, offsetBytes, lengthBytes);
    else fake.resumed.push(slot);
  };
  const x: [number, number] = [2 * kGranularityBytes, 4096];
  const y: [number, number] = [5 * kGranularityBytes + 8192, 4096];
  try {
    checkpoints.create('c1', Date.now(), () => undefined);
    await keeper.persistCheckpoints();
    assert.ok(fake.log.some((landing) => landing.what === 'superblock'), 'S0: a superblock with c1 was written');
    fake.checking = true;

    write(1, ...x);
    await settle();
    assert.deepEqual(fake.resumed, [1], 'write X went on once its bit was durable');
    for (const leg of legs) assert.ok(fake.bitmapHas(leg.index, ...x), `leg ${leg.index}: X's bit set`);

    tick(keeper); // T1: X was written in this period
    fake.holdNextBitmapWrite = true;
    write(2, ...y); // its page write is held: the keeper is busy with pages across T2
    await settle();
    assert.ok(fake.heldWrite, "Y's bitmap page write is held");
    tick(keeper); // T2: X quiet since T1
    await settle();
    fake.release();
    await settle();
    assert.deepEqual(fake.resumed, [1, 2], 'write Y went on');

    for (let beat = 0; beat < 4 && legs.some((leg) => fake.bitmapHas(leg.index, ...x)); beat += 1) {
      tick(keeper);
      await settle();
    }
    assert.deepEqual(fake.violations, [], 'no landing left a change outside both the stored maps and the bitmap');
    for (const leg of legs) {
      assert.ok(!fake.bitmapHas(leg.index, ...x), `leg ${leg.index}: X's bit was cleared in the end (the order was exercised)`);
      assert.ok(!fake.bitmapHas(leg.index, ...y), `leg ${leg.index}: Y's bit was cleared in the end`);
      const record = fake.newestSuperblock(leg.index)?.checkpoints?.find((entry) => entry.name === 'c1');
      assert.ok(record !== undefined, `leg ${leg.index}: c1 stored`);
      const stored: Array<[number, number]> = [];
      decodeRuns(record.runs, record.unitBytes, (offsetBytes, lengthBytes) => stored.push([offsetBytes, lengthBytes]));
      assert.deepEqual(stored, [[2 * kGranularityBytes, kGranularityBytes], [5 * kGranularityBytes, kGranularityBytes]], `leg ${leg.index}: the stored map of c1 holds X and Y`);
    }
    // and the order itself, on each leg: the first write clearing X's bit comes after a
    // superblock written after write X
    for (const leg of legs) {
      const landings = fake.log.filter((landing) => landing.leg === leg.index);
      const clearedAt = landings.findLastIndex((landing) => landing.what === 'bitmap');
      const superblockBefore = landings.slice(0, clearedAt).filter((landing) => landing.what === 'superblock').length;
      assert.ok(superblockBefore >= 2, `leg ${leg.index}: S0 and a heartbeat superblock precede the clearing page write`);
    }
  } finally {
    await keeper.stop();
  }
});
