/**
 * Concurrency test: 3 real worker_threads mark (and clear, in their private chunk groups) on
 * one attached DirtyMap SAB while the main thread clears and re-marks its own groups. Chunk
 * groups of 4 interleave owners, so every 32-bit word and every page is written by all
 * threads at once (the lock and Atomics.or/and must not lose bits; pages are taken and
 * returned to the pool under contention). Afterwards the map is compared with the expected
 * set: exact with a pool holding every page, a superset with a 3-page pool (sentinels).
 * Threads: test main thread + workers from dirty-map-marker.worker.ts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Worker } from 'node:worker_threads';
import { DirtyMap } from '../../../src/bitmap/dirty-map.js';
import type { MarkerInput, MarkerResult } from './dirty-map-marker.worker.js';

const kWorkers = 3;
const kGroupChunks = 4;
const kOwners = kWorkers + 2;
const kMainOwner = kWorkers + 1;
const kOperations = 20000;
const kPages = 64;
const kPageBytes = 16; // 128 chunks per page
const kPassesMax = 2000;

function runWorker(input: MarkerInput): { worker: Worker; done: Promise<MarkerResult> } {
  const url = new URL('./dirty-map-marker.worker.js', import.meta.url);
  const worker = new Worker(url, { workerData: input });
  const done = new Promise<MarkerResult>((resolve, reject) => {
    worker.once('message', (result: MarkerResult) => resolve(result));
    worker.once('error', reject);
    worker.once('exit', (code) => reject(new Error(`marker worker exited with ${code}`)));
  });
  return { worker, done };
}

/** The main thread's groups, in a deterministic shuffled order. */
function mainGroups(map: DirtyMap): number[] {
  const groups: number[] = [];
  const perOwner = Math.floor(map.chunkCount / kGroupChunks / kOwners);
  for (let index = 0; index < perOwner; index += 1) groups.push(index * kOwners + kMainOwner);
  for (let index = groups.length - 1; index > 0; index -= 1) {
    const other = (index * 7919 + 13) % (index + 1);
    const swap = groups[index] as number;
    groups[index] = groups[other] as number;
    groups[other] = swap;
  }
  return groups;
}

/**
 * Main thread work while the workers run: passes of marks and partial clears over its groups,
 * each pass ending with every group cleared, until all workers are done (bounded).
 */
function mainThreadChurn(map: DirtyMap, groups: number[], barrier: Int32Array): void {
  const groupBytes = kGroupChunks * map.chunkBytes;
  const workersRunning = (): boolean => Atomics.load(barrier, 2) < kWorkers;
  for (let pass = 0; pass < 2 || (pass < kPassesMax && workersRunning()); pass += 1) {
    for (const group of groups) {
      map.markRange(group * groupBytes + 100, groupBytes - 200); // every chunk of the group
      map.clearChunks(group * kGroupChunks + (pass % kGroupChunks), 1);
    }
    for (const group of groups) map.clearRange(group * groupBytes, groupBytes);
  }
}

async function runScenario(poolPages: number): Promise<{ map: DirtyMap; expected: Set<number> }> {
  const map = DirtyMap.create({
    deviceBytes: kPages * 128 * 512, chunkBytes: 512, pageBytes: kPageBytes, poolPages,
  });
  const groups = mainGroups(map);
  for (const group of groups) map.markChunks(group * kGroupChunks, kGroupChunks);
  const barrier = new Int32Array(new SharedArrayBuffer(16));
  const runs = [];
  for (let workerIndex = 0; workerIndex < kWorkers; workerIndex += 1) {
    runs.push(runWorker({
      sab: map.sab, barrier: barrier.buffer as SharedArrayBuffer, workerIndex, workers: kWorkers,
      groupChunks: kGroupChunks, operations: kOperations, seed: 0x9e3779b9 * (workerIndex + 1),
      exact: poolPages >= kPages,
    }));
  }
  try {
    // Wait (bounded) until every worker is at the barrier, then release them all at once.
    for (let tries = 0; Atomics.load(barrier, 1) < kWorkers; tries += 1) {
      assert.ok(tries < 200, 'workers did not reach the start barrier');
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
    Atomics.store(barrier, 0, 1);
    Atomics.notify(barrier, 0);
    mainThreadChurn(map, groups, barrier);
    const results = await Promise.all(runs.map((run) => run.done));
    const expected = new Set<number>();
    for (const result of results) {
      assert.equal(result.violations, 0, result.firstViolation);
      for (const chunk of result.privateDirty) expected.add(chunk);
      for (const chunk of result.sharedMarked) expected.add(chunk);
      assert.ok(result.sharedMarked.length > 0, 'the worker marked shared groups');
      assert.ok(result.privateDirty.length > 0, 'the worker left private chunks dirty');
    }
    return { map, expected };
  } finally {
    await Promise.all(runs.map((run) => run.worker.terminate()));
  }
}

function reportedDirty(map: DirtyMap): Set<number> {
  const dirty = new Set<number>();
  for (let chunk = 0; chunk < map.chunkCount; chunk += 1) {
    if (map.isChunkDirty(chunk)) dirty.add(chunk);
  }
  return dirty;
}

test('3 workers + main thread on one map, pool for every page: no lost or stray bits', async () => {
  const { map, expected } = await runScenario(kPages);
  map.verify();
  const stats = map.stats();
  assert.equal(stats.sentinelPages, 0, 'no sentinel with a pool for every page');
  const dirty = reportedDirty(map);
  assert.equal(dirty.size, expected.size);
  for (const chunk of expected) assert.ok(dirty.has(chunk), `lost bit: chunk ${chunk}`);
  assert.equal(stats.dirtyChunks, expected.size);
  for (const group of mainGroups(map)) {
    const groupBytes = kGroupChunks * 512;
    assert.equal(map.testRange(group * groupBytes, groupBytes), false, `main group ${group}`);
  }
  assert.ok(stats.generation > kWorkers * kOperations / 3, 'generation counted the changes');
});

test('3 workers + main thread with a 3-page pool: sentinels never lose a dirty chunk', async () => {
  const { map, expected } = await runScenario(3);
  map.verify();
  const stats = map.stats();
  assert.ok(stats.sentinelPages > 0, 'the small pool ran out');
  const dirty = reportedDirty(map);
  for (const chunk of expected) assert.ok(dirty.has(chunk), `lost bit: chunk ${chunk}`);
  assert.equal(stats.dirtyChunks, dirty.size, 'count matches the reported set');
  // Recovery: clearAll empties the map and returns every page to the pool.
  map.clearAll();
  assert.equal(map.dirtyChunkCount(), 0);
  assert.equal(map.stats().freePages, 3);
  map.verify();
});
