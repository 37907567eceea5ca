/**
 * RequestRing: field round trips, attach validation, and the master-side slot allocator
 * (unit cases plus a fast-check model-based test against a plain-array model).
 * Threads: main only (attach is exercised on the same thread; cross-thread use is covered by
 * visited-mask.test.ts).
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { propertyRuns } from '../../helpers/runs.js';
import { RequestRing } from '../../../src/ring/request-ring.js';
import {
  kSlotStateAllocated,
  kSlotStateContinuation,
  kSlotStateDispatched,
  kSlotStateFree,
} from '../../../src/ring/layout.js';

const kCmdWrite = 1;
const kFlagFua = 1;

function smallRing(slotCount = 8): RequestRing {
  return RequestRing.create({ slotCount, slotBytes: 4096 });
}

test('create validates options with ENBD_ERR_RING_OPTION naming the option', () => {
  assert.throws(() => RequestRing.create({ slotCount: 3 }), { code: 'ENBD_ERR_RING_OPTION', message: /ring\.slotCount/ });
  assert.throws(() => RequestRing.create({ slotBytes: 1000 }), { code: 'ENBD_ERR_RING_OPTION', message: /ring\.slotBytes/ });
});

test('setRequest round-trips every field, including offsets above 2^32 and u32 lengths', () => {
  const ring = smallRing();
  const slot = ring.allocate(1);
  const offsets = [0, 1, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 4096, 2 ** 53 - 1, 123456789012345];
  for (const offsetBytes of offsets) {
    ring.setRequest(slot, kCmdWrite, kFlagFua, offsetBytes, 0xffffffff, 1, 0b101);
    assert.equal(ring.offsetBytes(slot), offsetBytes);
    assert.equal(ring.lengthBytes(slot), 0xffffffff);
    assert.equal(ring.command(slot), kCmdWrite);
    assert.equal(ring.flags(slot), kFlagFua);
    assert.equal(ring.spanSlots(slot), 1);
    assert.equal(ring.targetMask(slot), 0b101);
    assert.equal(ring.visitedMask(slot), 0);
    assert.equal(ring.failedMask(slot), 0);
    assert.equal(ring.errno(slot), 0);
    assert.equal(ring.readLeg(slot), -1);
  }
  ring.setReadLeg(slot, 2);
  assert.equal(ring.readLeg(slot), 2);
  assert.throws(() => ring.setRequest(slot, kCmdWrite, 0, 2 ** 53, 0, 1, 1), /offsetBytes/);
  assert.throws(() => ring.setRequest(slot, kCmdWrite, 0, -1, 0, 1, 1), /offsetBytes/);
  assert.throws(() => ring.setRequest(slot, kCmdWrite, 0, 0, 2 ** 32, 1, 1), /u32/);
  assert.throws(() => ring.setRequest(slot, kCmdWrite, 0, 0, 0, 2, 1), /spanSlots/);
  assert.throws(() => ring.setRequest(slot, kCmdWrite, 0, 0, 0, 1, 0), /targetMask/);
});

test('attach shares the same memory (no copy) and is read-only for allocation', () => {
  const ring = smallRing();
  const worker = RequestRing.attach(ring.buffers);
  assert.equal(worker.isMaster, false);
  assert.equal(worker.slotCount, 8);
  assert.equal(worker.slotBytes, 4096);
  const slot = ring.allocate(2);
  ring.setRequest(slot, kCmdWrite, 0, 2 ** 40, 8192, 2, 0b11);
  ring.data.fill(0xab, ring.dataOffset(slot), ring.dataOffset(slot) + 8192);
  assert.equal(worker.offsetBytes(slot), 2 ** 40);
  assert.equal(worker.lengthBytes(slot), 8192);
  assert.equal(worker.spanSlots(slot), 2);
  assert.equal(worker.slotData(slot + 1)[4095], 0xab);
  worker.slotData(slot)[0] = 0x11; // a leg READ fills the slot
  assert.equal(ring.data[ring.dataOffset(slot)], 0x11);
  assert.throws(() => worker.allocate(1), /master-only/);
  assert.throws(() => worker.free(slot), /master-only/);
  assert.throws(() => worker.setRequest(slot, 0, 0, 0, 0, 1, 1), /master-only/);
});

test('attach rejects a buffer that is not a ring', () => {
  const control = new SharedArrayBuffer(1024);
  assert.throws(() => RequestRing.attach({ control, data: new SharedArrayBuffer(4096) }), /magic/);
});

test('data views: cached slot view, dataOffset, exact-length dataView', () => {
  const ring = smallRing(4);
  assert.equal(ring.slotData(1), ring.slotData(1), 'cached, not recreated');
  assert.equal(ring.slotData(3).length, 4096);
  assert.equal(ring.slotData(3).byteOffset, 3 * 4096);
  assert.equal(ring.dataOffset(2), 8192);
  const view = ring.dataView(1, 6000);
  assert.equal(view.length, 6000);
  assert.equal(view.byteOffset, 4096);
  assert.throws(() => ring.dataView(3, 4097), /data area/);
  assert.equal(ring.maxRequestBytes, 4 * 4096);
  assert.equal(ring.slotsFor(0), 1);
  assert.equal(ring.slotsFor(4096), 1);
  assert.equal(ring.slotsFor(4097), 2);
});

test('allocate/free: round-robin reuse, counts and states', () => {
  const ring = smallRing(4);
  assert.equal(ring.freeCount, 4);
  assert.equal(ring.inUse, 0);
  const a = ring.allocate(1);
  const b = ring.allocate(1);
  assert.deepEqual([a, b], [0, 1]);
  assert.equal(ring.state(a), kSlotStateAllocated);
  ring.free(a);
  assert.equal(ring.state(a), kSlotStateFree);
  // Rotating start: the next allocation continues after b, not at the freed slot 0.
  assert.equal(ring.allocate(1), 2);
  assert.equal(ring.allocate(1), 3);
  assert.equal(ring.allocate(1), 0, 'wraps around to the freed slot');
  assert.equal(ring.freeCount, 0);
  assert.equal(ring.inUse, 4);
  assert.equal(ring.allocate(1), -1, 'full ring');
});

test('contiguous runs: continuation states, no wrap past the end, -1 when fragmented', () => {
  const ring = smallRing(8);
  const run = ring.allocate(3);
  assert.equal(run, 0);
  assert.equal(ring.state(0), kSlotStateAllocated);
  assert.equal(ring.state(1), kSlotStateContinuation);
  assert.equal(ring.state(2), kSlotStateContinuation);
  assert.equal(ring.freeCount, 5);
  assert.equal(ring.inUse, 1);
  const single = ring.allocate(1); // 3
  const tail = ring.allocate(4); // 4..7
  assert.deepEqual([single, tail], [3, 4]);
  ring.free(run); // free: 0,1,2
  ring.free(tail); // free: 0,1,2,4,5,6,7 ; cursor is 0
  assert.equal(ring.allocate(4), 4, 'first fit from the cursor skips the 3-slot hole');
  assert.equal(ring.allocate(4), -1, 'three free slots, no run of four');
  assert.equal(ring.allocate(3), 0);
  assert.equal(ring.freeCount, 0);
  assert.throws(() => ring.allocate(9), /slotCount/);
  assert.throws(() => ring.allocate(0), /spanSlots/);
});

test('reuse bumps the generation of every slot of a run', () => {
  const ring = smallRing(2);
  const generations: number[] = [];
  for (let round = 0; round < 5; round++) {
    const slot = ring.allocate(2);
    assert.equal(slot, 0);
    generations.push(ring.generation(0));
    assert.equal(ring.generation(1), ring.generation(0));
    ring.free(slot);
  }
  assert.deepEqual(generations, [1, 2, 3, 4, 5]);
});

test('free asserts: double free, free of a continuation slot, free of a never-used slot', () => {
  const ring = smallRing(4);
  const slot = ring.allocate(2);
  assert.throws(() => ring.free(slot + 1), /live run head/);
  ring.free(slot);
  assert.throws(() => ring.free(slot), /live run head/);
  assert.throws(() => ring.free(3), /live run head/);
  assert.throws(() => ring.free(4), /slot index/);
});

test('markDispatched: only from Allocated', () => {
  const ring = smallRing(4);
  const slot = ring.allocate(1);
  ring.setRequest(slot, kCmdWrite, 0, 0, 4096, 1, 1);
  ring.markDispatched(slot);
  assert.equal(ring.state(slot), kSlotStateDispatched);
  assert.throws(() => ring.markDispatched(slot), /allocated/);
  ring.free(slot);
  assert.equal(ring.freeCount, 4);
});

// ---- Model-based allocator test ------------------------------------------------------------

type Operation = { kind: 'allocate'; spanSlots: number } | { kind: 'free'; pick: number };

/** A deliberately naive model: slot array, candidate starts in rotating order. */
class AllocatorModel {
  readonly owner: number[];
  readonly generation: number[];
  cursor = 0;
  constructor(readonly slotCount: number) {
    this.owner = new Array<number>(slotCount).fill(-1);
    this.generation = new Array<number>(slotCount).fill(0);
  }
  allocate(spanSlots: number): number {
    const starts: number[] = [];
    for (let p = this.cursor; p < this.slotCount; p++) starts.push(p);
    for (let p = 0; p < this.slotCount; p++) starts.push(p);
    for (const start of starts) {
      if (start + spanSlots > this.slotCount) continue;
      const run = this.owner.slice(start, start + spanSlots);
      if (run.every((owner) => owner === -1)) {
        for (let slot = start; slot < start + spanSlots; slot++) {
          this.owner[slot] = start;
          this.generation[slot] = (this.generation[slot] ?? 0) + 1;
        }
        this.cursor = (start + spanSlots) % this.slotCount;
        return start;
      }
    }
    return -1;
  }
  free(first: number): void {
    for (let slot = 0; slot < this.slotCount; slot++) {
      if (this.owner[slot] === first) this.owner[slot] = -1;
    }
  }
  heads(): number[] {
    return [...new Set(this.owner.filter((owner) => owner >= 0))].sort((a, b) => a - b);
  }
}

test('allocator matches a simple model (fast-check)', () => {
  const operation: fc.Arbitrary<Operation> = fc.oneof(
    fc.record({
      kind: fc.constant('allocate' as const),
      spanSlots: fc.integer({ min: 1, max: 6 }),
    }),
    fc.record({ kind: fc.constant('free' as const), pick: fc.nat() }),
  );
  fc.assert(
    fc.property(
      fc.constantFrom(2, 4, 8, 16),
      fc.array(operation, { maxLength: 200 }),
      (slotCount, operations) => {
        const ring = smallRing(slotCount);
        const model = new AllocatorModel(slotCount);
        for (const op of operations) {
          if (op.kind === 'allocate') {
            const spanSlots = Math.min(op.spanSlots, slotCount);
            assert.equal(ring.allocate(spanSlots), model.allocate(spanSlots));
          } else {
            const heads = model.heads();
            if (heads.length === 0) continue;
            const first = heads[op.pick % heads.length] as number;
            ring.free(first);
            model.free(first);
          }
          const free = model.owner.filter((owner) => owner === -1).length;
          assert.equal(ring.freeCount, free);
          assert.equal(ring.inUse, model.heads().length);
          for (let slot = 0; slot < slotCount; slot++) {
            const owner = model.owner[slot] as number;
            let expected = kSlotStateContinuation;
            if (owner === -1) expected = kSlotStateFree;
            else if (owner === slot) expected = kSlotStateAllocated;
            assert.equal(ring.state(slot), expected);
            assert.equal(ring.generation(slot), model.generation[slot]);
          }
        }
      },
    ),
    { numRuns: propertyRuns(300) },
  );
});
