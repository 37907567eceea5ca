/**
 * DirtyMap unit tests: option validation, argument asserts, byte-range to chunk rounding,
 * page boundaries, the sentinel life cycle (pool exhaustion, materialisation, pages back to
 * the pool), 1 TiB and near-2^53 devices, attach from the same SAB, flush flags.
 * Threads: test main thread only (see dirty-map-workers.test.ts for concurrency).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  DirtyMap, kEntrySentinel, kHeaderMagic, kHeaderWords, type DirtyRun,
} from '../../../src/bitmap/dirty-map.js';
import { EnbdError } from '../../../src/core/errors.js';

function isBitmapOptionError(error: unknown): boolean {
  return error instanceof EnbdError && error.code === 'ENBD_ERR_BITMAP_OPTION';
}

const kKiB = 1024;
const kMiB = 1024 * kKiB;
const kTiB = 1024 * 1024 * kMiB;

/** Every chunk index the map reports dirty. */
function dirtyChunks(map: DirtyMap): number[] {
  const out: number[] = [];
  for (let chunk = 0; chunk < map.chunkCount; chunk += 1) {
    if (map.isChunkDirty(chunk)) out.push(chunk);
  }
  return out;
}

test('create: defaults and geometry', () => {
  const map = DirtyMap.create({ deviceBytes: 10 * kMiB });
  assert.equal(map.chunkBytes, 4096);
  assert.equal(map.pageBytes, 4096);
  assert.equal(map.pageChunks, 32768);
  assert.equal(map.chunkCount, 2560);
  assert.equal(map.tableEntries, 1);
  assert.equal(map.poolPages, 1, 'the default pool (64) is clamped to the table size');
  assert.equal(map.dirtyChunkCount(), 0);
  assert.equal(map.testRange(0, 10 * kMiB), false);
  map.verify();
});

test('create: invalid options throw ENBD_ERR_BITMAP_OPTION naming the option', () => {
  const bad: Array<[unknown, RegExp]> = [
    [{ deviceBytes: 0 }, /options\.deviceBytes/],
    [{ deviceBytes: -1 }, /options\.deviceBytes/],
    [{ deviceBytes: 1.5 }, /options\.deviceBytes/],
    [{ deviceBytes: 2 ** 53 }, /options\.deviceBytes/],
    [{ deviceBytes: '4096' }, /options\.deviceBytes/],
    [{ deviceBytes: 4096, chunkBytes: 256 }, /options\.chunkBytes/],
    [{ deviceBytes: 4096, chunkBytes: 3000 }, /options\.chunkBytes/],
    [{ deviceBytes: 4096, chunkBytes: 128 * kMiB }, /options\.chunkBytes/],
    [{ deviceBytes: 4096, chunkBytes: 4096.5 }, /options\.chunkBytes/],
    [{ deviceBytes: 4096, pageBytes: 2 }, /options\.pageBytes/],
    [{ deviceBytes: 4096, pageBytes: 24 }, /options\.pageBytes/],
    [{ deviceBytes: 4096, pageBytes: 2 * kMiB }, /options\.pageBytes/],
    [{ deviceBytes: 4096, poolPages: -1 }, /options\.poolPages/],
    [{ deviceBytes: 4096, poolPages: 0.5 }, /options\.poolPages/],
    [{ deviceBytes: 2 ** 52, chunkBytes: 512, pageBytes: 4 }, /table entries/],
  ];
  for (const [options, message] of bad) {
    assert.throws(() => DirtyMap.create(options as never), (error: unknown) => {
      assert.ok(isBitmapOptionError(error), `${JSON.stringify(options)} -> ${String(error)}`);
      assert.match((error as Error).message, message);
      return true;
    });
  }
  assert.throws(() => DirtyMap.create(null as never), { code: 'ENBD_ERR_BITMAP_OPTION', message: 'options must be an object' });
});

test('arguments outside the device or not integers are asserted', () => {
  const map = DirtyMap.create({ deviceBytes: 8192, chunkBytes: 512, pageBytes: 4 });
  const calls: Array<() => unknown> = [
    () => map.markRange(-1, 1),
    () => map.markRange(0, 8193),
    () => map.markRange(8192, 1),
    () => map.markRange(0.5, 1),
    () => map.markRange(0, Number.NaN),
    () => map.clearRange(4096, 4097),
    () => map.testRange(1, -1),
    () => map.testRange(Number.MAX_SAFE_INTEGER, 1),
    () => map.isChunkDirty(16),
    () => map.isChunkDirty(-1),
    () => map.markChunks(15, 2),
    () => map.clearChunks(0, 1.5),
    () => map.nextDirtyRun(17, 1),
    () => map.nextDirtyRun(0, 0),
    () => map.takeChangedPage(-1),
  ];
  for (const call of calls) assert.throws(call, { code: 'ENBD_ERR_ASSERT' });
  assert.equal(map.dirtyChunkCount(), 0, 'a rejected call changes nothing');
  map.verify();
});

test('zero-length ranges change and report nothing, even at the device end', () => {
  const map = DirtyMap.create({ deviceBytes: 8192, chunkBytes: 512, pageBytes: 4 });
  map.markRange(1000, 0);
  map.markRange(8192, 0);
  assert.equal(map.dirtyChunkCount(), 0);
  map.markAll();
  map.clearRange(0, 0);
  map.clearRange(8192, 0);
  assert.equal(map.dirtyChunkCount(), 16);
  assert.equal(map.testRange(512, 0), false, 'an empty range touches no chunk');
  map.clearChunks(3, 0);
  map.markChunks(16, 0);
  assert.equal(map.dirtyChunkCount(), 16);
  map.verify();
});

test('markRange marks every touched chunk; clearRange clears only fully covered chunks', () => {
  const map = DirtyMap.create({ deviceBytes: 64 * 512, chunkBytes: 512, pageBytes: 4 });
  map.markRange(511, 2); // touches chunks 0 and 1
  assert.deepEqual(dirtyChunks(map), [0, 1]);
  map.markRange(5 * 512 + 100, 3 * 512); // bytes 2660..4195: chunks 5..8
  assert.deepEqual(dirtyChunks(map), [0, 1, 5, 6, 7, 8]);
  map.clearRange(1, 1022); // covers neither chunk 0 nor chunk 1 fully
  assert.deepEqual(dirtyChunks(map), [0, 1, 5, 6, 7, 8]);
  map.clearRange(5 * 512 + 1, 3 * 512); // fully covers chunks 6 and 7 only
  assert.deepEqual(dirtyChunks(map), [0, 1, 5, 8]);
  map.clearRange(0, 1024);
  assert.deepEqual(dirtyChunks(map), [5, 8]);
  assert.equal(map.testRange(6 * 512, 1024), false);
  assert.equal(map.testRange(6 * 512, 1025), true, 'one byte of chunk 8 is enough');
  assert.equal(map.dirtyBytes(), 1024);
  map.verify();
});

test('last partial chunk: marked by any byte, cleared by a range reaching the device end', () => {
  const deviceBytes = 10 * 512 + 100;
  const map = DirtyMap.create({ deviceBytes, chunkBytes: 512, pageBytes: 4 });
  assert.equal(map.chunkCount, 11);
  map.markRange(deviceBytes - 1, 1);
  assert.deepEqual(dirtyChunks(map), [10]);
  assert.equal(map.dirtyBytes(), 100, 'the last chunk counts only its bytes in the device');
  map.clearRange(10 * 512, 50);
  assert.deepEqual(dirtyChunks(map), [10], 'half of the tail does not cover it');
  map.clearRange(10 * 512, 100);
  assert.deepEqual(dirtyChunks(map), []);
  map.markAll();
  assert.equal(map.dirtyChunkCount(), 11);
  assert.equal(map.dirtyBytes(), deviceBytes);
  map.clearRange(10 * 512 + 1, 99);
  assert.equal(map.isChunkDirty(10), true, 'not fully covered');
  map.clearRange(0, deviceBytes);
  assert.equal(map.dirtyChunkCount(), 0);
  map.verify();
});

test('ranges spanning page boundaries mark, test and clear across pages', () => {
  // 32 chunks per page (pageBytes 4), 4 pages.
  const map = DirtyMap.create({ deviceBytes: 128 * 512, chunkBytes: 512, pageBytes: 4 });
  map.markRange(30 * 512, 70 * 512); // chunks 30..99: pages 0, 1 (whole), 2 (whole), 3
  assert.equal(map.dirtyChunkCount(), 70);
  const stats = map.stats();
  assert.equal(stats.sentinelPages, 2, 'wholly marked pages 1 and 2 need no pool page');
  assert.equal(stats.pagesInUse, 2);
  assert.deepEqual(map.nextDirtyRun(0, 1000), { firstChunk: 30, chunkCount: 70 });
  assert.deepEqual(map.nextDirtyRun(31, 10), { firstChunk: 31, chunkCount: 10 });
  assert.equal(map.testRange(29 * 512, 512), false);
  assert.equal(map.testRange(29 * 512, 513), true);
  map.clearRange(31 * 512, 66 * 512); // chunks 31..96
  assert.deepEqual(dirtyChunks(map), [30, 97, 98, 99]);
  assert.equal(map.stats().pagesInUse, 2, 'pages 0 and 3 keep their pool pages');
  assert.equal(map.stats().sentinelPages, 0, 'wholly cleared sentinels become clean');
  map.clearChunks(97, 3);
  assert.equal(map.stats().pagesInUse, 1, 'page 3 emptied and went back to the pool');
  assert.equal(map.nextDirtyRun(31, 5), null);
  map.verify();
});

test('sentinel life cycle: pool exhaustion, no-op marks, materialise on clear, recovery', () => {
  // 4 pages of 32 chunks, a pool of one page.
  const map = DirtyMap.create({
    deviceBytes: 128 * 512, chunkBytes: 512, pageBytes: 4, poolPages: 1 });
  map.markChunks(1, 1); // page 0 takes the only pool page
  map.markChunks(33, 2); // page 1: pool empty -> sentinel, all 32 chunks dirty
  let stats = map.stats();
  assert.equal(stats.pagesInUse, 1);
  assert.equal(stats.sentinelPages, 1);
  assert.equal(stats.dirtyChunks, 1 + 32, 'a sentinel page counts as all of its chunks');
  assert.equal(map.isChunkDirty(63), true);
  map.markChunks(40, 3); // no-op on a sentinel
  assert.equal(map.dirtyChunkCount(), 33);
  map.clearChunks(33, 2); // no free page: the sentinel stays (conservative)
  assert.equal(map.isChunkDirty(33), true);
  assert.equal(map.stats().sentinelPages, 1);
  map.clearChunks(1, 1); // page 0 empties and returns its page to the pool
  assert.equal(map.stats().pagesInUse, 0);
  map.clearChunks(33, 2); // now the sentinel materialises: all ones minus the range
  stats = map.stats();
  assert.equal(stats.sentinelPages, 0);
  assert.equal(stats.pagesInUse, 1);
  assert.equal(stats.dirtyChunks, 30);
  assert.deepEqual(map.nextDirtyRun(32, 100), { firstChunk: 32, chunkCount: 1 });
  assert.deepEqual(map.nextDirtyRun(33, 100), { firstChunk: 35, chunkCount: 29 });
  map.clearChunks(32, 32); // whole page clear: back to the pool
  assert.equal(map.stats().pagesInUse, 0);
  assert.equal(map.dirtyChunkCount(), 0);
  map.verify();
});

test('a pool of zero pages still tracks every mark (as whole-page sentinels)', () => {
  const map = DirtyMap.create({
    deviceBytes: 100 * 512, chunkBytes: 512, pageBytes: 4, poolPages: 0 });
  map.markRange(70 * 512, 1);
  assert.deepEqual(dirtyChunks(map), [64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78,
    79, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91, 92, 93, 94, 95]);
  map.markRange(96 * 512, 4 * 512); // the short last page (chunks 96..99)
  assert.equal(map.dirtyChunkCount(), 32 + 4);
  map.clearChunks(97, 1);
  assert.equal(map.isChunkDirty(97), true, 'cannot clear part of a sentinel without a page');
  map.clearChunks(96, 4);
  assert.equal(map.dirtyChunkCount(), 32);
  map.verify();
});

test('markAll / clearAll: sentinels and filled pages, then everything back to the pool', () => {
  const map = DirtyMap.create({
    deviceBytes: 200 * 512, chunkBytes: 512, pageBytes: 4, poolPages: 3 });
  map.markChunks(3, 1);
  map.markAll();
  let stats = map.stats();
  assert.equal(stats.dirtyChunks, 200);
  assert.equal(stats.dirtyBytes, 200 * 512);
  assert.equal(stats.pagesInUse, 1, 'the paged entry is filled, not replaced');
  assert.equal(stats.sentinelPages, map.tableEntries - 1);
  assert.equal(map.testRange(0, 200 * 512), true);
  map.verify();
  map.clearChunks(0, 10); // page 0 is paged; page 1.. stay sentinel
  map.clearChunks(40, 1); // sentinel page 1 materialises
  stats = map.stats();
  assert.equal(stats.pagesInUse, 2);
  assert.equal(stats.dirtyChunks, 200 - 11);
  map.clearAll();
  stats = map.stats();
  assert.equal(stats.dirtyChunks, 0);
  assert.equal(stats.pagesInUse, 0);
  assert.equal(stats.sentinelPages, 0);
  assert.equal(stats.freePages, 3);
  map.verify();
});

test('1 TiB at 4 KiB chunks: a clean map costs its table; marks at the far end', () => {
  const map = DirtyMap.create({ deviceBytes: kTiB, poolPages: 0 });
  const stats = map.stats();
  assert.equal(stats.tableEntries, 8192);
  assert.equal(stats.memoryBytes, kHeaderWords * 4 + 8192 * 4 + 8192 / 8, '96 + 32768 + 1024');
  assert.equal(stats.memoryBytes, 33888);
  const pooled = DirtyMap.create({ deviceBytes: kTiB });
  assert.equal(pooled.stats().poolBytes, 64 * (4096 + 12));
  assert.equal(pooled.stats().memoryBytes, 33888 + 262912);
  pooled.markRange(kTiB - 1, 1);
  pooled.markRange(kTiB - 3 * 4096 - 7, 8);
  assert.equal(pooled.dirtyChunkCount(), 3);
  assert.equal(pooled.isChunkDirty(2 ** 28 - 1), true);
  assert.equal(pooled.testRange(kTiB - 2 * 4096, 4096), false);
  const run: DirtyRun = { firstChunk: -1, chunkCount: -1 };
  assert.equal(pooled.nextDirtyRunInto(0, 100, run), true);
  assert.deepEqual(run, { firstChunk: 2 ** 28 - 4, chunkCount: 2 });
  assert.equal(pooled.nextDirtyRunInto(run.firstChunk + run.chunkCount, 100, run), true);
  assert.deepEqual(run, { firstChunk: 2 ** 28 - 1, chunkCount: 1 });
  assert.equal(pooled.stats().pagesInUse, 1);
  pooled.clearRange(kTiB - 4 * 4096, 4 * 4096);
  assert.equal(pooled.dirtyChunkCount(), 0);
  assert.equal(pooled.stats().pagesInUse, 0);
  pooled.verify();
});

test('1 TiB at 512 B chunks: chunk indices beyond 2^31 stay exact', () => {
  const map = DirtyMap.create({ deviceBytes: kTiB, chunkBytes: 512, poolPages: 2 });
  assert.equal(map.chunkCount, 2 ** 31);
  const lastChunk = 2 ** 31 - 1;
  map.markRange(kTiB - 512, 512);
  map.markChunks(2 ** 31 - 40, 1);
  assert.equal(map.isChunkDirty(lastChunk), true);
  assert.equal(map.isChunkDirty(lastChunk - 1), false);
  assert.deepEqual(map.nextDirtyRun(2 ** 30, 10), { firstChunk: 2 ** 31 - 40, chunkCount: 1 });
  assert.deepEqual(map.nextDirtyRun(2 ** 31 - 39, 10), { firstChunk: lastChunk, chunkCount: 1 });
  map.markAll();
  assert.equal(map.dirtyChunkCount(), 2 ** 31);
  assert.equal(map.dirtyBytes(), kTiB);
  map.clearAll();
  assert.equal(map.dirtyChunkCount(), 0);
});

test('a device near 2^53 bytes with 64 MiB chunks and 1 MiB pages', () => {
  const deviceBytes = Number.MAX_SAFE_INTEGER;
  const map = DirtyMap.create({
    deviceBytes, chunkBytes: 64 * kMiB, pageBytes: kMiB, poolPages: 1 });
  assert.equal(map.chunkCount, 2 ** 27);
  map.markRange(deviceBytes - 1, 1);
  assert.equal(map.isChunkDirty(2 ** 27 - 1), true);
  assert.equal(map.dirtyBytes(), 64 * kMiB - 1, 'the last chunk is one byte short');
  map.clearRange(deviceBytes - 10, 10);
  assert.equal(map.dirtyChunkCount(), 1, 'the tail chunk is not fully covered');
  map.clearRange((2 ** 27 - 1) * 64 * kMiB, 64 * kMiB - 1);
  assert.equal(map.dirtyChunkCount(), 0);
  // The SAB holds the device size across the 32-bit header split.
  assert.equal(DirtyMap.attach(map.sab).deviceBytes, deviceBytes);
});

test('attach: another view of the same SAB sees and makes the same changes', () => {
  const map = DirtyMap.create({ deviceBytes: 5000 * 512 + 1, chunkBytes: 512, pageBytes: 16 });
  const other = DirtyMap.attach(map.sab);
  assert.equal(other.chunkCount, 5001);
  assert.equal(other.pageChunks, 128);
  assert.equal(other.poolPages, map.poolPages);
  map.markChunks(4999, 2);
  assert.equal(other.isChunkDirty(5000), true);
  other.clearChunks(5000, 1);
  assert.equal(map.isChunkDirty(5000), false);
  assert.equal(map.dirtyChunkCount(), 1);
  other.verify();
});

test('attach rejects a buffer that is not a dirty map', () => {
  const map = DirtyMap.create({ deviceBytes: 4096, chunkBytes: 512, pageBytes: 4 });
  assert.throws(() => DirtyMap.attach(new ArrayBuffer(4096) as never), { code: 'ENBD_ERR_BITMAP_OPTION', message: /must be a SharedArrayBuffer/ });
  assert.throws(() => DirtyMap.attach(new SharedArrayBuffer(8)), { code: 'ENBD_ERR_BITMAP_OPTION', message: /too small/ });
  assert.throws(() => DirtyMap.attach(new SharedArrayBuffer(map.sab.byteLength)), { code: 'ENBD_ERR_BITMAP_OPTION', message: /not a dirty map/ });
  const longer = new SharedArrayBuffer(map.sab.byteLength + 4);
  new Uint8Array(longer).set(new Uint8Array(map.sab));
  assert.throws(() => DirtyMap.attach(longer), /size does not match/);
  const wrongMagic = new SharedArrayBuffer(map.sab.byteLength);
  new Uint8Array(wrongMagic).set(new Uint8Array(map.sab));
  new Int32Array(wrongMagic)[kHeaderMagic] = 0x12345678;
  assert.throws(() => DirtyMap.attach(wrongMagic), /not a dirty map/);
});

test('generation and per-page "changed since flush" flags follow every change', () => {
  const map = DirtyMap.create({ deviceBytes: 40 * 32 * 512, chunkBytes: 512, pageBytes: 4 });
  assert.equal(map.takeChangedPage(0), -1);
  const generation = map.generation();
  map.markChunks(5, 1);
  map.markChunks(35 * 32, 40); // pages 35 and 36
  map.markChunks(5, 1); // no change: already dirty
  assert.equal(map.generation(), generation + 3);
  assert.equal(map.takeChangedPage(0), 0);
  assert.equal(map.takeChangedPage(1), 35);
  map.clearChunks(5, 1); // page 0 changes again after its flag was taken
  assert.equal(map.takeChangedPage(0), 0);
  assert.equal(map.takeChangedPage(1), 36);
  assert.equal(map.takeChangedPage(0), -1);
  assert.equal(map.generation(), generation + 4);
});

test('table entries use the documented encoding', () => {
  const map = DirtyMap.create({
    deviceBytes: 96 * 512, chunkBytes: 512, pageBytes: 4, poolPages: 1 });
  map.markChunks(0, 1);
  map.markChunks(32, 1);
  map.markChunks(64, 32);
  const table = new Int32Array(map.sab, kHeaderWords * 4, map.tableEntries);
  assert.deepEqual(Array.from(table), [1, kEntrySentinel, kEntrySentinel]);
  map.clearChunks(0, 1);
  map.clearChunks(64, 32);
  assert.deepEqual(Array.from(table), [0, kEntrySentinel, 0]);
});
