/**
 * The resync's copy window (src/engine/resync.ts, resync-window.ts) against a real DirtyMap and
 * a host whose copies end in random order after random delays: never more copies in flight
 * than the window (nor more footprint than its budget, nor more than kBusyCopies while clients
 * are busy), copies in flight never overlap, every dirty chunk is copied, clean gaps up to the
 * gap bound (and no longer ones) are copied along, and a rate ceiling holds: the bytes started
 * by any moment never exceed the bucket's burst plus the rate times the time since the start.
 * Thread: test main thread.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { propertyRuns } from '../../helpers/runs.js';
import { DirtyMap } from '../../../src/bitmap/dirty-map.js';
import { createLogger } from '../../../src/core/log.js';
import { RequestRing } from '../../../src/ring/request-ring.js';
import { Resync, kBusyCopies, type CopyOutcome, type ResyncHost } from '../../../src/engine/resync.js';
import { kDefaultResyncCopies, kDefaultResyncGapBytes, resyncWindow } from '../../../src/engine/resync-window.js';
import type { AssembledArray } from '../../../src/meta/assemble.js';

const kChunk = 4096;
const kChunks = 2048;
const logger = createLogger({ level: 'silent', pretty: false });

interface Started {
  offsetBytes: number;
  lengthBytes: number;
  atMs: number;
}

interface WindowHost extends ResyncHost {
  started: Started[];
  maxInFlight: number;
  maxFootprint: number;
  overlaps: number;
  done: number;
}

/** A host whose copies take 0-3 event-loop turns or timers, in any order. */
function windowHost(map: DirtyMap, options: { busy?: boolean; footprint?: (length: number) => number; delays?: number[] } = {}): WindowHost {
  const inFlight = new Map<number, number>();
  let footprint = 0;
  let call = 0;
  const host: WindowHost = {
    started: [],
    maxInFlight: 0,
    maxFootprint: 0,
    overlaps: 0,
    done: 0,
    async copyRange(_leg, offsetBytes, lengthBytes): Promise<CopyOutcome> {
      for (const [otherOffset, otherLength] of inFlight) {
        if (offsetBytes < otherOffset + otherLength && otherOffset < offsetBytes + lengthBytes) host.overlaps += 1;
      }
      inFlight.set(offsetBytes, lengthBytes);
      const cost = options.footprint?.(lengthBytes) ?? lengthBytes;
      footprint += cost;
      host.maxInFlight = Math.max(host.maxInFlight, inFlight.size);
      host.maxFootprint = Math.max(host.maxFootprint, footprint);
      host.started.push({ offsetBytes, lengthBytes, atMs: performance.now() });
      const delay = options.delays?.[call++ % options.delays.length] ?? 0;
      if (delay === 0) await new Promise((resolve) => setImmediate(resolve));
      else await new Promise((resolve) => setTimeout(resolve, delay));
      map.clearRange(offsetBytes, lengthBytes);
      inFlight.delete(offsetBytes);
      footprint -= cost;
      return 'copied';
    },
    stillResyncing: () => true,
    clientBusy: () => options.busy === true,
    resyncDone: () => {
      host.done += 1;
    },
    footprintBytes: options.footprint,
  };
  return host;
}

function mapOf(chunks: readonly number[]): DirtyMap {
  const map = DirtyMap.create({ deviceBytes: kChunks * kChunk, chunkBytes: kChunk, pageBytes: 64 });
  for (const chunk of chunks) map.markChunks(chunk, 1);
  return map;
}

const unlimited = { minBytesPerSecond: 0, maxBytesPerSecond: 0 };

describe('Resync copy window', () => {
  test('random dirt, window and gap: in-flight bounds hold, no overlap, every dirty chunk copied, only short gaps bridged', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.uniqueArray(fc.integer({ min: 0, max: kChunks - 1 }), { maxLength: 400 }),
        fc.integer({ min: 1, max: 40 }),
        fc.integer({ min: 0, max: 6 }),
        fc.array(fc.integer({ min: 0, max: 2 }), { minLength: 1, maxLength: 5 }),
        async (chunks, maxCopies, gapChunks, delays) => {
          const map = mapOf(chunks);
          const host = windowHost(map, { delays });
          const maxCopyBytes = 16 * kChunk;
          await new Resync(1, map, host, unlimited, logger, { maxCopies, maxCopyBytes, gapBytes: gapChunks * kChunk }).start();
          assert.equal(host.overlaps, 0, 'copies in flight never overlap');
          assert.ok(host.maxInFlight <= maxCopies, `at most ${maxCopies} in flight (saw ${host.maxInFlight})`);
          const dirty = new Set(chunks);
          const covered = new Set<number>();
          for (const { offsetBytes, lengthBytes } of host.started) {
            assert.ok(lengthBytes <= maxCopyBytes && offsetBytes % kChunk === 0 && lengthBytes % kChunk === 0);
            const first = offsetBytes / kChunk;
            const end = first + lengthBytes / kChunk;
            assert.ok(dirty.has(first) && dirty.has(end - 1), 'a copy starts and ends on dirty chunks');
            let clean = 0;
            for (let chunk = first; chunk < end; chunk += 1) {
              covered.add(chunk);
              clean = dirty.has(chunk) ? 0 : clean + 1;
              assert.ok(clean <= gapChunks, `a clean gap of ${clean} chunks copied with gap ${gapChunks}`);
            }
          }
          for (const chunk of chunks) assert.ok(covered.has(chunk), `chunk ${chunk} copied`);
          if (gapChunks === 0) assert.equal(host.started.reduce((sum, each) => sum + each.lengthBytes, 0), chunks.length * kChunk, 'no gap: each chunk once');
          assert.equal(map.dirtyChunkCount(), 0);
          assert.equal(host.done, 1);
        },
      ),
      { numRuns: propertyRuns(80) },
    );
  });

  test('the footprint budget bounds the copies in flight; one copy always starts', async () => {
    const map = mapOf(Array.from({ length: 200 }, (_, index) => index * 8));
    const host = windowHost(map, { footprint: () => 256 * 1024, delays: [1, 0, 2] });
    await new Resync(1, map, host, unlimited, logger, { maxCopies: 128, maxFootprintBytes: 5 * 256 * 1024 }).start();
    assert.equal(host.maxInFlight, 5);
    assert.ok(host.maxFootprint <= 5 * 256 * 1024);
    const big = mapOf([0, 1, 2]);
    const alone = windowHost(big, { footprint: () => 1 << 30 });
    await new Resync(1, big, alone, unlimited, logger, { maxCopies: 4, maxFootprintBytes: 1 }).start();
    assert.equal(alone.done, 1, 'a copy larger than the budget still runs, alone');
  });

  test('while clients are busy at most kBusyCopies copies are in flight', async () => {
    const map = mapOf(Array.from({ length: 300 }, (_, index) => index * 4));
    const host = windowHost(map, { busy: true, delays: [1] });
    await new Resync(1, map, host, unlimited, logger, { maxCopies: 128 }).start();
    assert.ok(host.maxInFlight <= kBusyCopies && host.maxInFlight > 1, `in flight ${host.maxInFlight}`);
  });

  test('a rate ceiling holds with a deep window: bytes started never exceed burst + rate x elapsed', { timeout: 30_000 }, async () => {
    const map = mapOf(Array.from({ length: 240 }, (_, index) => index * 4));
    const host = windowHost(map, { delays: [0] });
    const rate = 512 * 1024; // 128 chunks/s: the 240 copies take about 1.9 s
    const resync = new Resync(1, map, host, { minBytesPerSecond: 0, maxBytesPerSecond: rate }, logger, { maxCopies: 128 });
    const startedAt = performance.now();
    await resync.start();
    assert.equal(host.done, 1);
    const burst = Math.max(kChunk, rate / 10);
    let bytes = 0;
    for (const each of host.started) {
      bytes += each.lengthBytes;
      // Date.now() (the bucket's clock) and performance.now() may differ by up to 1 ms each way.
      const allowed = burst + (rate * (each.atMs - startedAt + 2)) / 1000 + kChunk;
      assert.ok(bytes <= allowed, `${bytes} bytes started ${Math.round(each.atMs - startedAt)} ms in (at most ${Math.round(allowed)})`);
    }
  });

  test('the mirror window: three quarters of the ring, the default gap, copies capped at the largest request', () => {
    const ring = RequestRing.create({ slotCount: 64, slotBytes: 64 * 1024 });
    const window = resyncWindow({}, ring);
    assert.equal(window.maxFootprintBytes, 48 * 64 * 1024);
    assert.equal(window.maxCopies, kDefaultResyncCopies);
    assert.equal(window.gapBytes, kDefaultResyncGapBytes);
    assert.ok((window.maxCopyBytes ?? 0) <= ring.maxRequestBytes);
    assert.equal(resyncWindow({ resyncLanes: 3, resyncGapBytes: 0 }, ring).maxCopies, 3);
    // On-leg metadata: a clean gap chunk's bit is not durable, so no gap is copied along.
    assert.equal(resyncWindow({ metadata: {} as AssembledArray }, ring).gapBytes, 0);
  });
});
