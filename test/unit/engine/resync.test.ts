/**
 * Resync scheduling against a real DirtyMap and an in-process host (the copy itself is tested
 * end to end with nbdkit legs in test/interop/mirror-degraded.test.ts): every dirty chunk is
 * copied exactly once, adjacent chunks are coalesced, failed copies are retried, the resync
 * ends with resyncDone only when the map is empty, and it stops when the leg stops resyncing.
 * Thread: test main thread.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { propertyRuns } from '../../helpers/runs.js';
import { DirtyMap } from '../../../src/bitmap/dirty-map.js';
import { createLogger } from '../../../src/core/log.js';
import { Resync, type CopyOutcome, type ResyncHost } from '../../../src/engine/resync.js';

const kChunk = 4096;
const logger = createLogger({ level: 'silent', pretty: false });

interface FakeHost extends ResyncHost {
  copies: Array<[number, number]>;
  done: number;
}

function fakeHost(map: DirtyMap, outcomes: (call: number) => CopyOutcome = () => 'copied'): FakeHost {
  let calls = 0;
  let resyncing = true;
  const host: FakeHost = {
    copies: [],
    done: 0,
    async copyRange(_leg, offsetBytes, lengthBytes) {
      const outcome = outcomes(calls++);
      if (outcome === 'target-failed') resyncing = false;
      // Like the engine: a copy that cannot start answers at once; a real copy takes I/O turns.
      if (outcome !== 'copied') return outcome;
      await new Promise((resolve) => setImmediate(resolve));
      host.copies.push([offsetBytes, lengthBytes]);
      map.clearRange(offsetBytes, lengthBytes);
      return outcome;
    },
    stillResyncing: () => resyncing,
    clientBusy: () => false,
    resyncDone: () => {
      host.done += 1;
    },
  };
  return host;
}

describe('Resync scheduling', () => {
  test('random dirty sets: each chunk copied exactly once, runs coalesced, done once', async () => {
    await fc.assert(
      fc.asyncProperty(fc.uniqueArray(fc.integer({ min: 0, max: 1023 }), { maxLength: 200 }), async (chunks) => {
        const map = DirtyMap.create({ deviceBytes: 1024 * kChunk, chunkBytes: kChunk, pageBytes: 16 });
        for (const chunk of chunks) map.markChunks(chunk, 1);
        const host = fakeHost(map);
        const resync = new Resync(1, map, host, { minBytesPerSecond: 0, maxBytesPerSecond: 0 }, logger, 4, 64 * 1024);
        await resync.start();
        const copied = new Map<number, number>();
        for (const [offset, length] of host.copies) {
          assert.ok(length <= 64 * 1024 && offset % kChunk === 0 && length % kChunk === 0);
          for (let at = offset; at < offset + length; at += kChunk) copied.set(at / kChunk, (copied.get(at / kChunk) ?? 0) + 1);
        }
        assert.deepEqual([...copied.keys()].sort((a, b) => a - b), [...chunks].sort((a, b) => a - b));
        assert.ok([...copied.values()].every((count) => count === 1), 'no chunk copied twice');
        // Coalescing: no two copies are adjacent unless the first hit the 64 KiB cap.
        const sorted = [...host.copies].sort((a, b) => a[0] - b[0]);
        for (let index = 1; index < sorted.length; index += 1) {
          const [prevOffset, prevLength] = sorted[index - 1] as [number, number];
          if (prevOffset + prevLength === (sorted[index] as [number, number])[0]) assert.equal(prevLength, 64 * 1024);
        }
        assert.equal(map.dirtyChunkCount(), 0);
        assert.equal(host.done, 1);
        assert.equal(resync.progress().bytesDone, chunks.length * kChunk);
      }),
      { numRuns: propertyRuns(60) },
    );
  });

  test('a copy with no source or a failed source is retried until it succeeds', async () => {
    const map = DirtyMap.create({ deviceBytes: 256 * kChunk, chunkBytes: kChunk });
    map.markRange(10 * kChunk, 3 * kChunk);
    const host = fakeHost(map, (call) => (call === 0 ? 'no-source' : call === 1 ? 'source-failed' : 'copied'));
    await new Resync(0, map, host, { minBytesPerSecond: 0, maxBytesPerSecond: 0 }, logger, 2).start();
    assert.deepEqual(host.copies, [[10 * kChunk, 3 * kChunk]]);
    assert.equal(host.done, 1);
  });

  test('lanes waiting for a source do not spin: timers still run, and the resync ends once a source appears', { timeout: 10_000 }, async () => {
    const map = DirtyMap.create({ deviceBytes: 256 * kChunk, chunkBytes: kChunk });
    for (let chunk = 0; chunk < 64; chunk += 4) map.markChunks(chunk, 1);
    let sourceBack = false;
    const host = fakeHost(map, () => (sourceBack ? 'copied' : 'no-source'));
    setTimeout(() => (sourceBack = true), 300); // never fires if the lanes spin in microtasks
    await new Resync(0, map, host, { minBytesPerSecond: 0, maxBytesPerSecond: 0 }, logger, 16).start();
    assert.equal(host.done, 1);
    assert.equal(host.copies.length, 16);
  });

  test('a target failure stops the resync without resyncDone and leaves the bits', async () => {
    const map = DirtyMap.create({ deviceBytes: 256 * kChunk, chunkBytes: kChunk });
    map.markRange(0, 8 * kChunk);
    const host = fakeHost(map, () => 'target-failed');
    await new Resync(0, map, host, { minBytesPerSecond: 0, maxBytesPerSecond: 0 }, logger, 1).start();
    assert.equal(host.done, 0);
    assert.equal(map.dirtyChunkCount(), 8);
  });

  test('a rate ceiling still finishes, and progress reports what is left', async () => {
    const map = DirtyMap.create({ deviceBytes: 256 * kChunk, chunkBytes: kChunk });
    map.markRange(0, 16 * kChunk);
    const host = fakeHost(map);
    const resync = new Resync(0, map, host, { minBytesPerSecond: 0, maxBytesPerSecond: 1024 * 1024 }, logger, 2, 4 * kChunk);
    assert.equal(resync.progress().bytesLeft, 16 * kChunk);
    await resync.start();
    assert.equal(host.done, 1);
    assert.equal(resync.progress().bytesLeft, 0);
    assert.equal(resync.progress().bytesDone, 16 * kChunk);
  });
});
