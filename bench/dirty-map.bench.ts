/**
 * Micro-bench: DirtyMap mark / test / clear / next-run operations per second, one thread.
 * Scenario: a 1 TiB map, 4 KiB chunks, 4 KiB pages, a 64-page pool; ranges of 4..64 KiB
 * (typical NBD writes) at random offsets inside a 4 GiB window (32 pages, so the pool holds).
 *
 * Back-of-envelope estimate: markRange/clearRange = argument asserts + one uncontended lock
 * (2 atomic RMW) + 1..2 word Atomics.or/and + counters/flag/generation (~5 atomics): about
 * 100-200 ns, i.e. 5-10 M ops/s. testRange is lock-free: 1 table load + 1..2 word loads,
 * about 20-50 ns (20+ M ops/s). Allocations per operation: 0 (heap growth over a run of
 * millions of operations should stay near zero; the run prints it).
 * Threads: main thread. Not run by tests: `node dist/bench/dirty-map.bench.js`.
 */
import { pathToFileURL } from 'node:url';
import { DirtyMap, type DirtyRun } from '../src/bitmap/dirty-map.js';

const kOperations = 2_000_000;
const kWindowBytes = 4 * 1024 * 1024 * 1024;
const kChunkBytes = 4096;

export interface DirtyMapBenchResult {
  name: string;
  operationsPerSecond: number;
  heapGrowthBytes: number;
}

function measure(
  name: string, operations: number, body: (index: number) => void,
): DirtyMapBenchResult {
  for (let index = 0; index < 10_000; index += 1) body(index); // warm up
  const heapBefore = process.memoryUsage().heapUsed;
  const start = process.hrtime.bigint();
  for (let index = 0; index < operations; index += 1) body(index);
  const elapsedNs = Number(process.hrtime.bigint() - start);
  const heapGrowthBytes = process.memoryUsage().heapUsed - heapBefore;
  return { name, operationsPerSecond: Math.round(operations / (elapsedNs / 1e9)), heapGrowthBytes };
}

export function runDirtyMapBench(operations = kOperations): DirtyMapBenchResult[] {
  const map = DirtyMap.create({
    deviceBytes: 1024 ** 4, chunkBytes: kChunkBytes, pageBytes: 4096, poolPages: 64,
  });
  // Precomputed random ranges: the timed loops do no arithmetic beyond indexing.
  const kRanges = 1 << 16;
  const offsets = new Float64Array(kRanges);
  const lengths = new Float64Array(kRanges);
  let state = 0x2545f491;
  for (let index = 0; index < kRanges; index += 1) {
    state ^= state << 13; state ^= state >>> 17; state ^= state << 5; state >>>= 0;
    offsets[index] = (state % (kWindowBytes / kChunkBytes)) * kChunkBytes;
    lengths[index] = (1 + (state % 16)) * kChunkBytes;
  }
  const mask = kRanges - 1;
  const run: DirtyRun = { firstChunk: 0, chunkCount: 0 };
  let sink = 0;
  const results = [
    measure('markRange', operations, (index) => {
      map.markRange(offsets[index & mask] as number, lengths[index & mask] as number);
    }),
    measure('testRange', operations, (index) => {
      const offsetBytes = offsets[(index * 7) & mask] as number;
      if (map.testRange(offsetBytes, lengths[index & mask] as number)) sink += 1;
    }),
    measure('nextDirtyRunInto', operations, (index) => {
      const fromChunk = (offsets[index & mask] as number) / kChunkBytes;
      if (map.nextDirtyRunInto(fromChunk, 256, run)) sink += run.chunkCount;
    }),
    measure('clearRange', operations, (index) => {
      map.clearRange(offsets[index & mask] as number, lengths[index & mask] as number);
    }),
  ];
  if (sink < 0) throw new Error('unreachable');
  return results;
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  for (const result of runDirtyMapBench()) {
    const rate = result.operationsPerSecond.toLocaleString('en-US').padStart(12);
    console.log(`${result.name.padEnd(18)} ${rate} ops/s  heap growth ${result.heapGrowthBytes} B`);
  }
}
