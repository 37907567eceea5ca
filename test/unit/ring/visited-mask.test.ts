/**
 * Visited/failed masks: single-thread semantics of ackSlot/resetMasks/abandonLeg, and a real
 * concurrency test: 3 worker legs ack every request of a pipelined stream; the master checks
 * that each request is handed back exactly once with the right visited/failed masks and errnos.
 * Threads: main + 3 workers.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Worker } from 'node:worker_threads';
import { once } from 'node:events';
import { RequestRing } from '../../../src/ring/request-ring.js';
import { Doorbell, SpscQueue } from '../../../src/ring/spsc-queue.js';
import { abandonLeg, ackSlot, isComplete, resetMasks } from '../../../src/ring/visited-mask.js';
import { expectedOffsetBytes, kStop, legErrnoFor, legFails } from './visited-rules.js';
import { kEIo } from '../../../src/nbd/protocol.js';

const kCmdWrite = 1;

interface AtomicsWaitAsync {
  waitAsync(
    array: Int32Array,
    index: number,
    value: number,
    timeoutMs: number,
  ): { async: false; value: string } | { async: true; value: Promise<string> };
}
const kEnospc = 28;

function dispatchedSlot(ring: RequestRing, targetMask: number): number {
  const slot = ring.allocate(1);
  ring.setRequest(slot, kCmdWrite, 0, 0, 4096, 1, targetMask);
  ring.markDispatched(slot);
  return slot;
}

test('only the ack that completes the target returns true', () => {
  const ring = RequestRing.create({ slotCount: 4, slotBytes: 4096 });
  const actor = RequestRing.attach(ring.buffers);
  const slot = dispatchedSlot(ring, 0b1011);
  assert.equal(ackSlot(actor, slot, 3, false, 0), false);
  assert.equal(isComplete(ring, slot), false);
  assert.equal(ackSlot(actor, slot, 0, false, 0), false);
  assert.equal(ackSlot(actor, slot, 1, false, 0), true);
  assert.equal(isComplete(ring, slot), true);
  assert.equal(ring.visitedMask(slot), 0b1011);
  assert.equal(ring.failedMask(slot), 0);
  assert.equal(ring.errno(slot), 0);
});

test('failures: failed mask, per-leg errno, first errno wins the aggregate', () => {
  const ring = RequestRing.create({ slotCount: 4, slotBytes: 4096 });
  const slot = dispatchedSlot(ring, 0b111);
  assert.equal(ackSlot(ring, slot, 2, true, kEnospc), false);
  assert.equal(ackSlot(ring, slot, 0, false, 0), false);
  assert.equal(ackSlot(ring, slot, 1, true, kEIo), true);
  assert.equal(ring.failedMask(slot), 0b110);
  assert.equal(ring.legErrno(slot, 0), 0);
  assert.equal(ring.legErrno(slot, 1), kEIo);
  assert.equal(ring.legErrno(slot, 2), kEnospc);
  assert.equal(ring.errno(slot), kEnospc, 'first failure');
});

test('leg 30 (the highest) works; bit 31 is not a leg', () => {
  const ring = RequestRing.create({ slotCount: 2, slotBytes: 4096 });
  const slot = dispatchedSlot(ring, (1 << 30) | 1);
  assert.equal(ackSlot(ring, slot, 30, true, kEIo), false);
  assert.equal(ackSlot(ring, slot, 0, false, 0), true);
  assert.equal(ring.failedMask(slot), 1 << 30);
  assert.equal(ring.legErrno(slot, 30), kEIo);
  assert.throws(() => ackSlot(ring, slot, 31, false, 0), /leg index/);
});

test('asserts: double ack, leg outside target, undispatched slot, errno/failed mismatch', () => {
  const ring = RequestRing.create({ slotCount: 4, slotBytes: 4096 });
  const slot = dispatchedSlot(ring, 0b11);
  ackSlot(ring, slot, 0, false, 0);
  assert.throws(() => ackSlot(ring, slot, 0, false, 0), /once/);
  assert.throws(() => ackSlot(ring, slot, 2, false, 0), /target/);
  assert.throws(() => ackSlot(ring, slot, 1, true, 0), /errno/);
  assert.throws(() => ackSlot(ring, slot, 1, false, kEIo), /errno/);
  const idle = ring.allocate(1);
  ring.setRequest(idle, kCmdWrite, 0, 0, 0, 1, 1);
  assert.throws(() => ackSlot(ring, idle, 0, false, 0), /dispatched/);
});

test('resetMasks clears a previous dispatch for a retry', () => {
  const ring = RequestRing.create({ slotCount: 4, slotBytes: 4096 });
  const slot = dispatchedSlot(ring, 0b11);
  ackSlot(ring, slot, 0, true, kEIo);
  ackSlot(ring, slot, 1, false, 0);
  resetMasks(ring, slot, 0b10);
  assert.equal(ring.visitedMask(slot), 0);
  assert.equal(ring.failedMask(slot), 0);
  assert.equal(ring.errno(slot), 0);
  assert.equal(ring.targetMask(slot), 0b10);
  assert.equal(ackSlot(ring, slot, 1, false, 0), true);
});

test('a reused slot carries no stale per-leg errno from its previous request', () => {
  const ring = RequestRing.create({ slotCount: 2, slotBytes: 4096 });
  const slot = ring.allocate(2);
  ring.setRequest(slot, kCmdWrite, 0, 0, 4096, 2, 0b111);
  ring.markDispatched(slot);
  ackSlot(ring, slot, 0, false, 0);
  ackSlot(ring, slot, 2, true, kEnospc);
  ackSlot(ring, slot, 1, true, kEIo);
  ring.free(slot);
  const again = ring.allocate(1);
  assert.equal(again, 0);
  ring.setRequest(again, kCmdWrite, 0, 0, 4096, 1, 0b001);
  for (let leg = 0; leg < 31; leg++) assert.equal(ring.legErrno(again, leg), 0);
  assert.equal(ring.failedMask(again), 0);
  assert.equal(ring.errno(again), 0);
});

test('abandonLeg: acks a dead leg as failed only if it had not acked', () => {
  const ring = RequestRing.create({ slotCount: 4, slotBytes: 4096 });
  const slot = dispatchedSlot(ring, 0b111);
  ackSlot(ring, slot, 0, false, 0);
  assert.equal(abandonLeg(ring, slot, 0, kEIo), false, 'already acked: untouched');
  assert.equal(abandonLeg(ring, slot, 3, kEIo), false, 'not in target');
  assert.equal(ring.failedMask(slot), 0);
  assert.equal(abandonLeg(ring, slot, 2, kEIo), false);
  assert.equal(ring.failedMask(slot), 0b100);
  assert.equal(ackSlot(ring, slot, 1, false, 0), true);
  assert.throws(() => abandonLeg(RequestRing.attach(ring.buffers), slot, 1, kEIo), /master-only/);
});

// ---- Real threads ----------------------------------------------------------------------

interface AckerResult {
  completions: number;
  acks: number;
  fieldErrors: number;
}

const kLegCount = 3;
const kTargets = [0b111, 0b111, 0b111, 0b011, 0b110, 0b101, 0b001, 0b111];

const kWorkerTestOptions = { timeout: 120_000 };

test(
  '3 worker legs: one completer per request, exact masks/errnos',
  kWorkerTestOptions,
  async () => {
    const slotCount = 64;
    const requestTotal = 30_000;
    const ring = RequestRing.create({ slotCount, slotBytes: 4096 });
    const doorbell = Doorbell.create();
    const dispatch: SpscQueue[] = [];
    const completion: SpscQueue[] = [];
    const workers: Worker[] = [];
    for (let leg = 0; leg < kLegCount; leg++) {
      dispatch.push(SpscQueue.create(slotCount * 2));
      completion.push(SpscQueue.create(slotCount));
      workers.push(
        new Worker(new URL('./visited-ack.worker.js', import.meta.url), {
          workerData: {
            legIndex: leg,
            ring: ring.buffers,
            dispatch: dispatch[leg]?.buffer,
            completion: completion[leg]?.buffer,
            doorbell: doorbell.buffer,
          },
        }),
      );
    }
    const results = workers.map((worker) => once(worker, 'message'));
    const outstanding = new Int32Array(slotCount).fill(-1); // generation awaiting completion
    let issued = 0;
    let completed = 0;
    let checkErrors = 0;

    function onCompleted(slot: number): void {
      const generation = ring.generation(slot);
      if (outstanding[slot] !== generation) {
        checkErrors += 1; // a duplicate or unexpected hand-back
        return;
      }
      outstanding[slot] = -1;
      const target = ring.targetMask(slot);
      let failedExpected = 0;
      for (let leg = 0; leg < kLegCount; leg++) {
        const bit = 1 << leg;
        if ((target & bit) !== 0 && legFails(slot, generation, leg)) failedExpected |= bit;
        const errnoExpected = (failedExpected & bit) !== 0 ? legErrnoFor(leg) : 0;
        if (ring.legErrno(slot, leg) !== errnoExpected) checkErrors += 1;
      }
      if (ring.visitedMask(slot) !== target) checkErrors += 1;
      if (ring.failedMask(slot) !== failedExpected) checkErrors += 1;
      const errno = ring.errno(slot);
      if (failedExpected === 0 ? errno !== 0 : errno === 0) checkErrors += 1;
      completed += 1;
      ring.free(slot);
    }

    function dispatchBatch(): void {
      while (issued < requestTotal) {
        const slot = ring.allocate(1);
        if (slot < 0) break;
        const generation = ring.generation(slot);
        const target = kTargets[issued % kTargets.length] as number;
        ring.setRequest(slot, kCmdWrite, 0, expectedOffsetBytes(slot, generation), 4096, 1, target);
        ring.slotData(slot)[0] = generation & 0xff;
        ring.markDispatched(slot);
        outstanding[slot] = generation;
        for (let leg = 0; leg < kLegCount; leg++) {
          if ((target & (1 << leg)) === 0) continue;
          assert.ok(dispatch[leg]?.stage(slot), 'dispatch queue has room');
        }
        issued += 1;
      }
      for (const queue of dispatch) queue.publish();
    }

    try {
      while (completed < requestTotal) {
        dispatchBatch();
        const snapshot = doorbell.snapshot();
        let drained = 0;
        for (const queue of completion) drained += queue.drain(onCompleted, slotCount);
        if (drained > 0 || completed >= requestTotal) continue;
        const sleep = doorbell.waitAsync(snapshot);
        if (sleep !== null) await sleep;
      }
      for (const queue of dispatch) assert.equal(queue.push(kStop), true);
      const finals = (await Promise.all(results)).map(([value]) => value as AckerResult);
      assert.equal(checkErrors, 0);
      assert.equal(completed, requestTotal);
      assert.equal(ring.freeCount, slotCount);
      let totalCompletions = 0;
      let totalAcks = 0;
      for (const result of finals) {
        assert.equal(result.fieldErrors, 0, 'actors saw the fields and payload the master wrote');
        totalCompletions += result.completions;
        totalAcks += result.acks;
      }
      assert.equal(totalCompletions, requestTotal, 'exactly one completer per request');
      let expectedAcks = 0;
      for (let request = 0; request < requestTotal; request++) {
        const target = kTargets[request % kTargets.length] as number;
        for (let leg = 0; leg < kLegCount; leg++) {
          if ((target & (1 << leg)) !== 0) expectedAcks += 1;
        }
      }
      assert.equal(totalAcks, expectedAcks);
    } finally {
      await Promise.all(workers.map((worker) => worker.terminate()));
    }
  },
);

test(
  'lockstep race, 2 worker legs: one completer per slot per round',
  kWorkerTestOptions,
  async () => {
    const slotCount = 4096;
    const rounds = 600;
    const legCount = 2;
    const target = (1 << legCount) - 1;
    const ring = RequestRing.create({ slotCount, slotBytes: 4096 });
    const shared = new Int32Array(new SharedArrayBuffer((2 + slotCount) * 4));
    for (let slot = 0; slot < slotCount; slot++) {
      assert.equal(ring.allocate(1), slot);
      ring.setRequest(slot, kCmdWrite, 0, 0, 4096, 1, target);
      ring.markDispatched(slot);
    }
    const workers: Worker[] = [];
    for (let leg = 0; leg < legCount; leg++) {
      workers.push(
        new Worker(new URL('./visited-race.worker.js', import.meta.url), {
          workerData: { legIndex: leg, ring: ring.buffers, shared: shared.buffer, rounds },
        }),
      );
    }
    const results = workers.map((worker) => once(worker, 'message'));
    let badCounts = 0;
    let badMasks = 0;
    try {
      for (let round = 1; round <= rounds; round++) {
        for (let slot = 0; slot < slotCount; slot++) {
          resetMasks(ring, slot, target);
          shared[2 + slot] = 0;
        }
        Atomics.store(shared, 0, round);
        Atomics.notify(shared, 0);
        for (let done = Atomics.load(shared, 1); done < legCount * round; ) {
          const sleep = (Atomics as unknown as AtomicsWaitAsync).waitAsync(shared, 1, done, 1000);
          if (sleep.async) await sleep.value;
          done = Atomics.load(shared, 1);
        }
        for (let slot = 0; slot < slotCount; slot++) {
          if (shared[2 + slot] !== 1) badCounts += 1;
          let failedExpected = 0;
          for (let leg = 0; leg < legCount; leg++) {
            if (legFails(slot, round, leg)) failedExpected |= 1 << leg;
          }
          if (ring.visitedMask(slot) !== target) badMasks += 1;
          if (ring.failedMask(slot) !== failedExpected) badMasks += 1;
        }
      }
      const finals = (await Promise.all(results)).map(
        ([value]) => (value as { completions: number }).completions,
      );
      assert.equal(badCounts, 0, 'slots with zero or several completers');
      assert.equal(badMasks, 0);
      assert.equal(finals.reduce((sum, count) => sum + count, 0), slotCount * rounds);
    } finally {
      await Promise.all(workers.map((worker) => worker.terminate()));
    }
  },
);
