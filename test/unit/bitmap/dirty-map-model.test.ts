/**
 * Model-based test of DirtyMap against a plain Set<number> of dirty chunk indices.
 * Small devices (2..8 pages of 32..128 chunks) and tiny pools (0..3 pages), so pool
 * exhaustion -> sentinel, no-op marks on sentinels, materialisation on a partial clear and
 * pages returning to the pool all happen often.
 *
 * Sentinels over-report, and the over-report outlives the sentinel: a partial clear
 * materialises the page as all ones minus the range, so chunks never marked stay dirty in a
 * real page. "Equal whenever no sentinel is present" is therefore false; the model keeps a
 * second set, `suspect`: every chunk of a page seen as a sentinel after any command, minus
 * the chunks cleared later while their page was not a sentinel. After every command:
 *   model ⊆ map's dirty set ⊆ model ∪ suspect   (so equality whenever suspect is empty,
 *                                                  which includes "no sentinel ever").
 * The test also counts how often each transition happened and fails if one never did.
 * Threads: test main thread.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { propertyRuns } from '../../helpers/runs.js';
import {
  DirtyMap, kEntrySentinel, kHeaderWords, type DirtyRun,
} from '../../../src/bitmap/dirty-map.js';

interface Model {
  dirty: Set<number>;
  /** Chunks the map may report dirty although the model says clean (sentinel history). */
  suspect: Set<number>;
}

interface Coverage {
  exhausted: number;
  materialised: number;
  released: number;
  sentinelStayed: number;
  exactChecks: number;
  overReported: number;
  checks: number;
}

const coverage: Coverage = {
  exhausted: 0, materialised: 0, released: 0, sentinelStayed: 0, exactChecks: 0,
  overReported: 0, checks: 0,
};
const kRuns = propertyRuns(3000);

/** The map's dirty set as one byte per chunk, read through isChunkDirty. */
function mapDirtySet(map: DirtyMap): Uint8Array {
  const set = new Uint8Array(map.chunkCount);
  for (let chunk = 0; chunk < map.chunkCount; chunk += 1) {
    set[chunk] = map.isChunkDirty(chunk) ? 1 : 0;
  }
  return set;
}

function isSentinelPage(map: DirtyMap, page: number): boolean {
  return new Int32Array(map.sab, kHeaderWords * 4, map.tableEntries)[page] === kEntrySentinel;
}

/**
 * Bookkeeping after a command: chunks cleared in [clearedFirst, clearedEnd) leave `suspect`
 * unless their page is (still) a sentinel; every chunk of a sentinel page joins it.
 */
function updateSuspects(
  model: Model, map: DirtyMap, clearedFirst: number, clearedEnd: number,
): void {
  for (let chunk = clearedFirst; chunk < clearedEnd; chunk += 1) {
    if (!isSentinelPage(map, Math.floor(chunk / map.pageChunks))) model.suspect.delete(chunk);
  }
  for (let page = 0; page < map.tableEntries; page += 1) {
    if (!isSentinelPage(map, page)) continue;
    const end = Math.min(map.chunkCount, (page + 1) * map.pageChunks);
    for (let chunk = page * map.pageChunks; chunk < end; chunk += 1) model.suspect.add(chunk);
  }
}

function checkAgainstModel(model: Model, map: DirtyMap): void {
  coverage.checks += 1;
  map.verify();
  const set = mapDirtySet(map);
  let mapCount = 0;
  for (const flag of set) mapCount += flag;
  for (const chunk of model.dirty) assert.equal(set[chunk], 1, `model chunk ${chunk} clean in map`);
  for (let chunk = 0; chunk < set.length; chunk += 1) {
    if (set[chunk] === 1 && !model.dirty.has(chunk)) {
      assert.ok(model.suspect.has(chunk), `chunk ${chunk} dirty in map with no sentinel history`);
    }
  }
  assert.equal(map.dirtyChunkCount(), mapCount, 'count equals the reported dirty set');
  if (model.suspect.size === 0) {
    coverage.exactChecks += 1;
    assert.equal(mapCount, model.dirty.size, 'no sentinel history: the map is exact');
  }
  if (mapCount > model.dirty.size) coverage.overReported += 1;
  const lastChunk = map.chunkCount - 1;
  const tailBytes = map.deviceBytes - lastChunk * map.chunkBytes;
  const tailShortBytes = set[lastChunk] === 1 ? map.chunkBytes - tailBytes : 0;
  const expectedBytes = mapCount * map.chunkBytes - tailShortBytes;
  assert.equal(map.dirtyBytes(), expectedBytes);
}

/** Byte range from two seeds, always inside the device. */
function byteRange(map: DirtyMap, offsetSeed: number, lengthSeed: number): [number, number] {
  const offsetBytes = offsetSeed % (map.deviceBytes + 1);
  return [offsetBytes, lengthSeed % (map.deviceBytes - offsetBytes + 1)];
}

class MarkRange implements fc.Command<Model, DirtyMap> {
  constructor(readonly offsetSeed: number, readonly lengthSeed: number) {}
  check(): boolean { return true; }
  run(model: Model, map: DirtyMap): void {
    const [offsetBytes, lengthBytes] = byteRange(map, this.offsetSeed, this.lengthSeed);
    const before = map.stats();
    map.markRange(offsetBytes, lengthBytes);
    if (lengthBytes > 0) {
      const first = Math.floor(offsetBytes / map.chunkBytes);
      const end = Math.ceil((offsetBytes + lengthBytes) / map.chunkBytes);
      for (let chunk = first; chunk < end; chunk += 1) model.dirty.add(chunk);
    }
    const after = map.stats();
    if (before.freePages === 0 && after.sentinelPages > before.sentinelPages) {
      coverage.exhausted += 1;
    }
    updateSuspects(model, map, 0, 0);
    checkAgainstModel(model, map);
  }
  toString(): string { return `markRange(${this.offsetSeed}, ${this.lengthSeed})`; }
}

class ClearRange implements fc.Command<Model, DirtyMap> {
  constructor(
    readonly offsetSeed: number, readonly lengthSeed: number, readonly aligned: boolean,
  ) {}
  check(): boolean { return true; }
  run(model: Model, map: DirtyMap): void {
    let [offsetBytes, lengthBytes] = byteRange(map, this.offsetSeed, this.lengthSeed);
    if (this.aligned) {
      // Whole chunks, as the resync clears them.
      offsetBytes -= offsetBytes % map.chunkBytes;
      const roundedBytes = Math.ceil(lengthBytes / map.chunkBytes) * map.chunkBytes;
      lengthBytes = Math.min(map.deviceBytes - offsetBytes, roundedBytes);
    }
    const before = map.stats();
    const sentinelChunkBefore = this.touchesSentinel(map, offsetBytes, lengthBytes);
    map.clearRange(offsetBytes, lengthBytes);
    const endBytes = offsetBytes + lengthBytes;
    if (lengthBytes > 0) {
      const first = Math.ceil(offsetBytes / map.chunkBytes);
      const end = endBytes === map.deviceBytes
        ? map.chunkCount
        : Math.floor(endBytes / map.chunkBytes);
      for (let chunk = first; chunk < end; chunk += 1) model.dirty.delete(chunk);
      updateSuspects(model, map, first, end);
    }
    const after = map.stats();
    if (after.sentinelPages < before.sentinelPages && after.pagesInUse > before.pagesInUse) {
      coverage.materialised += 1;
    }
    if (after.pagesInUse < before.pagesInUse) coverage.released += 1;
    const sentinelsKept = after.sentinelPages === before.sentinelPages;
    if (sentinelChunkBefore && before.freePages === 0 && sentinelsKept) {
      coverage.sentinelStayed += 1;
    }
    checkAgainstModel(model, map);
  }
  private touchesSentinel(map: DirtyMap, offsetBytes: number, lengthBytes: number): boolean {
    if (map.stats().sentinelPages === 0 || lengthBytes === 0) return false;
    return map.testRange(offsetBytes, lengthBytes);
  }
  toString(): string {
    return `clearRange(${this.offsetSeed}, ${this.lengthSeed}, ${this.aligned})`;
  }
}

class ClearChunks implements fc.Command<Model, DirtyMap> {
  constructor(readonly firstSeed: number, readonly countSeed: number) {}
  check(): boolean { return true; }
  run(model: Model, map: DirtyMap): void {
    const firstChunk = this.firstSeed % (map.chunkCount + 1);
    const chunkCount = this.countSeed % (map.chunkCount - firstChunk + 1);
    map.clearChunks(firstChunk, chunkCount);
    for (let chunk = firstChunk; chunk < firstChunk + chunkCount; chunk += 1) {
      model.dirty.delete(chunk);
    }
    updateSuspects(model, map, firstChunk, firstChunk + chunkCount);
    checkAgainstModel(model, map);
  }
  toString(): string { return `clearChunks(${this.firstSeed}, ${this.countSeed})`; }
}

class TestRange implements fc.Command<Model, DirtyMap> {
  constructor(readonly offsetSeed: number, readonly lengthSeed: number) {}
  check(): boolean { return true; }
  run(model: Model, map: DirtyMap): void {
    const [offsetBytes, lengthBytes] = byteRange(map, this.offsetSeed, this.lengthSeed);
    const actual = map.testRange(offsetBytes, lengthBytes);
    let inModel = false;
    let inMap = false;
    if (lengthBytes > 0) {
      const first = Math.floor(offsetBytes / map.chunkBytes);
      const end = Math.ceil((offsetBytes + lengthBytes) / map.chunkBytes);
      for (let chunk = first; chunk < end; chunk += 1) {
        inModel ||= model.dirty.has(chunk);
        inMap ||= map.isChunkDirty(chunk);
      }
    }
    assert.equal(actual, inMap, 'testRange agrees with isChunkDirty');
    if (inModel) assert.equal(actual, true, 'a dirty chunk is never reported clean');
    if (model.suspect.size === 0) assert.equal(actual, inModel);
  }
  toString(): string { return `testRange(${this.offsetSeed}, ${this.lengthSeed})`; }
}

const scratchRun: DirtyRun = { firstChunk: 0, chunkCount: 0 };

class NextDirtyRun implements fc.Command<Model, DirtyMap> {
  constructor(readonly fromSeed: number, readonly maxChunks: number) {}
  check(): boolean { return true; }
  run(model: Model, map: DirtyMap): void {
    const fromChunk = this.fromSeed % (map.chunkCount + 1);
    const found = map.nextDirtyRunInto(fromChunk, this.maxChunks, scratchRun);
    const inMap = (chunk: number): boolean => map.isChunkDirty(chunk);
    const inModel = (chunk: number): boolean => model.dirty.has(chunk);
    const expected = NextDirtyRun.expected(map.chunkCount, inMap, fromChunk, this.maxChunks);
    const actual = found ? { ...scratchRun } : null;
    assert.deepEqual(actual, expected, 'run matches the reported dirty set');
    const modelFirst = NextDirtyRun.expected(map.chunkCount, inModel, fromChunk, this.maxChunks);
    if (modelFirst !== null) {
      assert.ok(found && scratchRun.firstChunk <= modelFirst.firstChunk, 'no dirty chunk skipped');
    }
    if (model.suspect.size === 0) assert.deepEqual(expected, modelFirst);
  }
  static expected(
    chunkCount: number, isDirty: (chunk: number) => boolean, fromChunk: number, maxChunks: number,
  ): DirtyRun | null {
    let first = fromChunk;
    while (first < chunkCount && !isDirty(first)) first += 1;
    if (first >= chunkCount) return null;
    let end = first;
    while (end < chunkCount && end - first < maxChunks && isDirty(end)) end += 1;
    return { firstChunk: first, chunkCount: end - first };
  }
  toString(): string { return `nextDirtyRun(${this.fromSeed}, ${this.maxChunks})`; }
}

class MarkAll implements fc.Command<Model, DirtyMap> {
  check(): boolean { return true; }
  run(model: Model, map: DirtyMap): void {
    map.markAll();
    for (let chunk = 0; chunk < map.chunkCount; chunk += 1) model.dirty.add(chunk);
    assert.equal(map.dirtyChunkCount(), map.chunkCount);
    updateSuspects(model, map, 0, 0);
    checkAgainstModel(model, map);
  }
  toString(): string { return 'markAll()'; }
}

class ClearAll implements fc.Command<Model, DirtyMap> {
  check(): boolean { return true; }
  run(model: Model, map: DirtyMap): void {
    map.clearAll();
    model.dirty.clear();
    model.suspect.clear();
    const stats = map.stats();
    assert.equal(stats.pagesInUse, 0);
    assert.equal(stats.sentinelPages, 0);
    checkAgainstModel(model, map);
  }
  toString(): string { return 'clearAll()'; }
}

const kSeedMax = 1 << 22;
const offsetSeed = fc.integer({ min: 0, max: kSeedMax });
const lengthSeed = fc.oneof(
  fc.integer({ min: 0, max: 3000 }), fc.integer({ min: 0, max: kSeedMax }));
const clearRange = fc.tuple(offsetSeed, lengthSeed, fc.boolean())
  .map(([offset, length, aligned]) => new ClearRange(offset, length, aligned));
const commands = [
  fc.tuple(offsetSeed, lengthSeed).map(([offset, length]) => new MarkRange(offset, length)),
  fc.tuple(offsetSeed, lengthSeed).map(([offset, length]) => new MarkRange(offset, length)),
  clearRange,
  clearRange,
  fc.tuple(fc.nat(2048), fc.nat(300)).map(([first, count]) => new ClearChunks(first, count)),
  fc.tuple(offsetSeed, lengthSeed).map(([offset, length]) => new TestRange(offset, length)),
  fc.tuple(fc.nat(2048), fc.integer({ min: 1, max: 200 }))
    .map(([from, max]) => new NextDirtyRun(from, max)),
  fc.constant(new MarkAll()),
  fc.constant(new ClearAll()),
];

const kCommandOptions = { maxCommands: 40, size: 'max' } as const;
const geometry = fc.record({
  chunkBytes: fc.constantFrom(512, 1024),
  pageBytes: fc.constantFrom(4, 8, 16),
  pages: fc.integer({ min: 2, max: 8 }),
  tailFraction: fc.double({ min: 0, max: 1, noNaN: true }),
  poolPages: fc.integer({ min: 0, max: 3 }),
});

test('DirtyMap follows a Set<number> model: model ⊆ map ⊆ model ∪ sentinel history', (t) => {
  fc.assert(
    fc.property(geometry, fc.commands(commands, kCommandOptions), (config, cmds) => {
      const pageSpanBytes = config.pageBytes * 8 * config.chunkBytes;
      // The last page is partial in chunks and the last chunk partial in bytes.
      const tailBytes = 1 + Math.floor(config.tailFraction * (pageSpanBytes - 1));
      const deviceBytes = (config.pages - 1) * pageSpanBytes + tailBytes;
      const setup = () => ({
        model: { dirty: new Set<number>(), suspect: new Set<number>() },
        real: DirtyMap.create({
          deviceBytes, chunkBytes: config.chunkBytes, pageBytes: config.pageBytes,
          poolPages: config.poolPages,
        }),
      });
      fc.modelRun(setup, cmds);
    }),
    { numRuns: kRuns },
  );
  t.diagnostic(`coverage ${JSON.stringify(coverage)}`);
  // Each transition must have been exercised, or the test proves less than it claims.
  assert.ok(coverage.exhausted > 0, 'pool exhaustion -> sentinel never happened');
  assert.ok(coverage.materialised > 0, 'sentinel materialisation never happened');
  assert.ok(coverage.released > 0, 'no page ever returned to the pool');
  assert.ok(coverage.sentinelStayed > 0, 'a sentinel never stayed for lack of a page');
  assert.ok(coverage.exactChecks > 0, 'equality was never checked');
  assert.ok(coverage.overReported > 0, 'the conservative (over-reporting) path never ran');
});
