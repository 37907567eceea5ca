/**
 * Unit tests of the verifier's re-check (src/engine/verify.ts): the optimistic pass reads
 * without the range lock, so a client write racing it can land on one leg before the other; the
 * unit is then read again under the lock and only what still differs is counted. Drives a real
 * Verifier (real piscina hash pool) against a fake VerifyHost: two legs as byte arrays, runs as
 * views of one SharedArrayBuffer, a range lock that grants at once, READs answered on a later
 * turn of the event loop.
 *
 * Thread: test main thread; the pool's workers are real piscina threads.
 *
 * The race: on the first READ of leg 1 in the unit, a "client write" is half done (leg 0 has
 * the new bytes, leg 1 still the old ones) and completes before the next READ of that unit.
 * Without the re-check that would be one counted mismatch; with it, zero. The control case
 * (the legs really differ) must count exactly that piece, so the test can fail both ways.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { pino } from 'pino';
import { Verifier, type VerifyHost, type VerifyLeg } from '../../../src/engine/verify.js';
import { kHashWorkerEntry } from '../../../src/cli/actor-entry.js';

const kSlotBytes = 256 * 1024;
const kSlots = 64;
const kDeviceBytes = 4 * 1024 * 1024;
const kChunk = 64 * 1024;

interface FakeHooks {
  /** Called before a READ's bytes are copied (leg, offset, whether the lock is held by anyone). */
  beforeRead?: (legIndex: number, offsetBytes: number, locked: boolean) => void;
}

class FakeMirror {
  readonly legData = [new Uint8Array(kDeviceBytes), new Uint8Array(kDeviceBytes)];
  readonly ring = new Uint8Array(new SharedArrayBuffer(kSlots * kSlotBytes));
  readonly used = new Uint8Array(kSlots);
  readonly lockedSlots = new Set<number>();
  locksTaken = 0;
  verifier: Verifier | null = null;
  private readonly pending = new Map<number, { legIndex: number; offsetBytes: number; lengthBytes: number }>();

  constructor(private readonly hooks: FakeHooks) {
    for (const data of this.legData) for (let at = 0; at < kDeviceBytes; at += 1) data[at] = (at * 37 + 11) & 0xff;
  }

  host(): VerifyHost {
    const legs: VerifyLeg[] = [0, 1].map((index) => ({ index, bit: 1 << index, state: 'in-sync', epoch: 1 }));
    return {
      sizeBytes: () => kDeviceBytes,
      isClosed: () => false,
      legs: () => legs,
      slotsFor: (lengthBytes) => Math.ceil(lengthBytes / kSlotBytes),
      slotsMax: () => kSlots,
      allocate: (span) => {
        for (let slot = 0; slot + span <= kSlots; slot += 1) {
          if (this.used.subarray(slot, slot + span).every((used) => used === 0)) {
            this.used.fill(1, slot, slot + span);
            this.used[slot] = 1 + span;
            return slot;
          }
        }
        return -1;
      },
      slotsFreed: async () => await new Promise<void>((resolve) => setImmediate(resolve)),
      bindInternal: () => {},
      dataView: (slot, lengthBytes) => new Uint8Array(this.ring.buffer, slot * kSlotBytes, lengthBytes),
      lock: (slot) => {
        this.locksTaken += 1;
        this.lockedSlots.add(slot);
        return true;
      },
      read: (slot, legIndex, offsetBytes, lengthBytes) => {
        this.pending.set(slot, { legIndex, offsetBytes, lengthBytes });
        setImmediate(() => this.answerRead(slot));
      },
      write: (slot) => setImmediate(() => this.verifier?.onComplete(slot, 0)),
      finish: (slot, locked) => {
        assert.equal(this.lockedSlots.has(slot), locked, 'finish(locked) matches the lock taken');
        this.lockedSlots.delete(slot);
        const span = (this.used[slot] ?? 2) - 1;
        this.used.fill(0, slot, slot + span);
      },
      upToDateFor: () => true,
      failLeg: (index, reason) => assert.fail(`leg ${index} failed: ${reason}`),
      markUnlessSole: () => {},
      extents: async () => await Promise.resolve([]),
      generation: () => null,
      clearMatched: () => false,
      errnoName: () => 'EIO',
    };
  }

  private answerRead(slot: number): void {
    const request = this.pending.get(slot);
    assert.ok(request !== undefined);
    this.pending.delete(slot);
    this.hooks.beforeRead?.(request.legIndex, request.offsetBytes, this.lockedSlots.size > 0);
    const source = this.legData[request.legIndex] as Uint8Array;
    this.ring.set(source.subarray(request.offsetBytes, request.offsetBytes + request.lengthBytes), slot * kSlotBytes);
    this.verifier?.onComplete(slot, 0);
  }
}

async function runVerify(hooks: FakeHooks, prepare: (mirror: FakeMirror) => void = () => {}): Promise<{ mismatches: number; rechecked: number; locks: number; checked: number }> {
  const mirror = new FakeMirror(hooks);
  prepare(mirror);
  const verifier = new Verifier(mirror.host(), pino({ level: 'silent' }), { threads: 1, workerEntry: kHashWorkerEntry, chunkBytes: kChunk, lanes: 4 });
  mirror.verifier = verifier;
  try {
    verifier.start();
    await verifier.done();
    const progress = verifier.progress();
    assert.ok(progress !== null);
    assert.equal(progress.bytesDone, kDeviceBytes);
    return { mismatches: progress.mismatchChunks, rechecked: verifier.recheckedUnits, locks: mirror.locksTaken, checked: progress.bytesChecked };
  } finally {
    await verifier.close();
  }
}

test('verify: a write racing the optimistic read of a chunk is re-checked under the lock and not counted', async () => {
  const racedOffset = 2 * 1024 * 1024; // unit 2
  let phase: 'before' | 'half' | 'done' = 'before';
  let lockedReads = 0;
  let holder: FakeMirror | null = null;
  const result = await runVerify({
    beforeRead: (legIndex, offsetBytes, locked) => {
      if (offsetBytes !== racedOffset) return;
      if (locked) lockedReads += 1;
      const mirror = holder as FakeMirror;
      const at = racedOffset + 5 * kChunk + 100;
      if (phase === 'before') {
        // The client write reaches leg 0 now, leg 1 only after this round of reads.
        (mirror.legData[0] as Uint8Array)[at] = 0xee;
        (mirror.legData[0] as Uint8Array)[at + 1] = 0xef;
        phase = 'half';
        return;
      }
      if (phase === 'half' && (legIndex === 0 || locked)) {
        (mirror.legData[1] as Uint8Array)[at] = 0xee;
        (mirror.legData[1] as Uint8Array)[at + 1] = 0xef;
        phase = 'done';
      }
    },
  }, (mirror) => {
    holder = mirror;
  });
  assert.equal(phase, 'done', 'the racing write happened');
  assert.equal(result.rechecked, 1, 'the unit the write raced was re-checked');
  assert.equal(result.locks, 1, 'only the re-check took the range lock');
  assert.equal(lockedReads, 2, 'the re-check read both legs under the lock');
  assert.equal(result.mismatches, 0, 'a write racing a verify is no mismatch');
  assert.equal(result.checked, kDeviceBytes);
});

test('verify: legs that really differ are counted after the re-check, exactly that piece', async () => {
  const result = await runVerify({}, (mirror) => {
    const at = 3 * 1024 * 1024 + 7 * kChunk + 4096;
    (mirror.legData[1] as Uint8Array)[at] = ((mirror.legData[1] as Uint8Array)[at] ?? 0) ^ 0x5a;
  });
  assert.equal(result.rechecked, 1);
  assert.equal(result.locks, 1);
  assert.equal(result.mismatches, 1);
});

test('verify: equal legs take no lock at all (the optimistic pass suffices)', async () => {
  const result = await runVerify({});
  assert.equal(result.rechecked, 0);
  assert.equal(result.locks, 0);
  assert.equal(result.mismatches, 0);
  assert.equal(result.checked, kDeviceBytes);
});

test('verify: the byte compare finds differences at piece edges (first and last byte of a unit, two pieces)', async () => {
  const unit = 2 * 1024 * 1024;
  const result = await runVerify({}, (mirror) => {
    const leg = mirror.legData[1] as Uint8Array;
    leg[unit] = (leg[unit] ?? 0) ^ 0x01; // first byte of piece 0
    leg[unit + 1024 * 1024 - 1] = (leg[unit + 1024 * 1024 - 1] ?? 0) ^ 0x80; // last byte of the last piece
  });
  assert.equal(result.rechecked, 1, 'one unit differs');
  assert.equal(result.mismatches, 2, 'exactly the two pieces holding the changed bytes');
});
