/**
 * Checkpoints (src/engine/checkpoints.ts): marks reach every active checkpoint and no frozen
 * one; names and the count limit are checked with clear errors; a freeze starts the next
 * checkpoint seeded with the writes in flight; the stored form (runs, coarsened to a byte
 * budget) restores a map that covers every chunk the original held (fast-check, any budget),
 * exactly when the budget allows; the superblock carries the records and round-trips them.
 * Threads: main only.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { propertyRuns } from '../../helpers/runs.js';
import { CheckpointSet, changedRuns, decodeRuns, kCheckpointsMax } from '../../../src/engine/checkpoints.js';
import { EnbdError } from '../../../src/core/errors.js';
import { decodeSuperblock, encodeSuperblock, type Superblock } from '../../../src/meta/superblock.js';

const kMiB = 1024 * 1024;
const noSeed = (): void => undefined;

function isCheckpointError(pattern: RegExp): (error: unknown) => boolean {
  return (error: unknown) => error instanceof EnbdError && error.code === 'ENBD_ERR_CHECKPOINT' && pattern.test(error.message);
}

test('a write marks every active checkpoint, at its granularity, and nothing before creation', () => {
  const set = new CheckpointSet(64 * kMiB, 64 * 1024);
  set.mark(0, 4096);
  set.create('a', 1, noSeed);
  set.mark(100 * 1024, 4096);
  set.create('b', 2, noSeed);
  set.mark(10 * kMiB, 200 * 1024);
  assert.deepEqual(set.runs('a', 0, 64 * kMiB, 100), [
    { offsetBytes: 64 * 1024, lengthBytes: 64 * 1024 },
    { offsetBytes: 10 * kMiB, lengthBytes: 256 * 1024 },
  ]);
  assert.deepEqual(set.runs('b', 0, 64 * kMiB, 100), [{ offsetBytes: 10 * kMiB, lengthBytes: 256 * 1024 }]);
  const list = set.list();
  assert.deepEqual(list.map((info) => [info.name, info.state, info.changedBytes, info.granularityBytes]), [['a', 'active', 320 * 1024, 65536], ['b', 'active', 256 * 1024, 65536]]);
});

test('names, duplicates, the count limit and unknown names are refused with clear errors', () => {
  const set = new CheckpointSet(kMiB);
  for (const bad of ['', 'a:b', '-x', '.x', 'x y', 'x'.repeat(65), 'é']) assert.throws(() => set.create(bad, 0, noSeed), isCheckpointError(/checkpoint name must be/), bad);
  for (let index = 0; index < kCheckpointsMax; index += 1) set.create(`c${index}`, 0, noSeed);
  assert.throws(() => set.create('one-more', 0, noSeed), isCheckpointError(/at most 8 checkpoints/));
  assert.throws(() => set.create('c1', 0, noSeed), isCheckpointError(/exists already/));
  assert.throws(() => set.remove('nope'), isCheckpointError(/no checkpoint named "nope"/));
  set.remove('c3');
  assert.equal(set.count, kCheckpointsMax - 1);
  set.create('b1.daily_2026-12-01+x@y', 0, noSeed);
});

test('freeze: the old checkpoint stops changing, the new one starts with the writes in flight', () => {
  const set = new CheckpointSet(16 * kMiB, 4096);
  set.create('b1', 0, noSeed);
  set.mark(0, 4096);
  const { frozen, created } = set.freeze('b1', 'b2', 5, (visit) => visit(8 * kMiB, 8192));
  assert.equal(frozen.state, 'frozen');
  assert.equal(created.changedBytes, 8192, 'the in-flight write is in the new checkpoint');
  set.mark(kMiB, 4096);
  assert.deepEqual(set.runs('b1', 0, 16 * kMiB, 10), [{ offsetBytes: 0, lengthBytes: 4096 }]);
  assert.deepEqual(set.runs('b2', 0, 16 * kMiB, 10), [{ offsetBytes: kMiB, lengthBytes: 4096 }, { offsetBytes: 8 * kMiB, lengthBytes: 8192 }]);
  assert.throws(() => set.freeze('b1', 'b3', 6, noSeed), isCheckpointError(/frozen already/));
});

test('runs are clipped to the asked range and bounded in count', () => {
  const set = new CheckpointSet(kMiB, 4096);
  set.create('a', 0, noSeed);
  for (let at = 0; at < kMiB; at += 8192) set.mark(at, 4096);
  const map = set.map('a');
  assert.ok(map !== null);
  assert.deepEqual(changedRuns(map, 1000, 9000, 10), [{ offsetBytes: 1000, lengthBytes: 3096 }, { offsetBytes: 8192, lengthBytes: 1808 }]);
  assert.equal(changedRuns(map, 0, kMiB, 5).length, 5);
});

test('stored maps restore a superset of the original at any budget, exact with room (property)', () => {
  fc.assert(fc.property(
    fc.array(fc.tuple(fc.nat(1023), fc.integer({ min: 1, max: 40 })), { maxLength: 60 }),
    fc.integer({ min: 2, max: 400 }),
    fc.boolean(),
    (writes, budgetBytes, unclean) => {
      const deviceBytes = 1024 * 4096 - 1000; // a partial last chunk
      const set = new CheckpointSet(deviceBytes, 4096);
      set.create('cp', 7, noSeed);
      for (const [chunk, count] of writes) set.mark(chunk * 4096, count * 4096);
      const bitmap = new Uint8Array(8);
      if (unclean) bitmap[0] = 0b101;
      const records = set.toRecords(budgetBytes);
      assert.equal(records.length, 1);
      const record = records[0];
      assert.ok(record !== undefined);
      assert.ok(record.runs.length <= Math.max(2, budgetBytes), `runs take ${record.runs.length} bytes of a ${budgetBytes}-byte budget`);
      const back = new CheckpointSet(deviceBytes, 4096);
      assert.deepEqual(back.restore(records), []);
      if (unclean) back.markFromBitmap(bitmap, 64 * 4096, 3);
      const original = set.map('cp');
      const restored = back.map('cp');
      assert.ok(original !== null && restored !== null);
      for (let chunk = 0; chunk < original.chunkCount; chunk += 1) {
        if (original.isChunkDirty(chunk)) assert.ok(restored.isChunkDirty(chunk), `chunk ${chunk} lost`);
      }
      if (budgetBytes >= 400 && !unclean) assert.equal(restored.dirtyChunkCount(), original.dirtyChunkCount(), 'exact with room');
      assert.equal(back.list()[0]?.createdMs, 7);
    },
  ), { numRuns: propertyRuns(300) });
});

test('damaged runs mark everything; decodeRuns rejects truncated pairs', () => {
  assert.equal(decodeRuns(Uint8Array.from([0x80]), 4096, () => undefined), false);
  assert.equal(decodeRuns(Uint8Array.from([1]), 4096, () => undefined), false);
  const set = new CheckpointSet(kMiB, 4096);
  const problems = set.restore([{ name: 'x', createdMs: 1, frozen: true, granularityBytes: 4096, unitBytes: 4096, runs: Uint8Array.from([5]) }]);
  assert.match(problems[0] ?? '', /damaged/);
  assert.equal(set.list()[0]?.changedBytes, kMiB);
  assert.equal(set.list()[0]?.state, 'frozen');
});

test('the superblock carries checkpoint records and round-trips them', () => {
  const set = new CheckpointSet(kMiB, 4096);
  set.create('daily', 1234, noSeed);
  set.mark(40960, 12288);
  const sb: Superblock = {
    arrayUuid: '00000000-0000-4000-8000-000000000001', arrayName: 'a', legUuid: '00000000-0000-4000-8000-000000000002', slotIndex: 0,
    members: [{ legUuid: '00000000-0000-4000-8000-000000000002', state: 'in-sync', events: 1, recoveryOffsetBytes: 0 }],
    legSizeBytes: 2 * kMiB, dataSizeBytes: kMiB, bitmapChunkBytes: 4096, bitmapOffsetBytes: kMiB, bitmapAreaBytes: 4096,
    events: 3, state: 'active', owner: null, createdMs: 1, updatedMs: 2, checkpoints: set.toRecords(1000),
  };
  const decoded = decodeSuperblock(encodeSuperblock(sb, 0, 1));
  assert.deepEqual(decoded.superblock.checkpoints, sb.checkpoints);
  const back = new CheckpointSet(kMiB, 4096);
  back.restore(decoded.superblock.checkpoints ?? []);
  assert.deepEqual(back.runs('daily', 0, kMiB, 10), [{ offsetBytes: 40960, lengthBytes: 12288 }]);
  const without = decodeSuperblock(encodeSuperblock({ ...sb, checkpoints: [] }, 1, 2));
  assert.equal(without.superblock.checkpoints, undefined, 'no key when there are none (older readers see the old payload)');
});
