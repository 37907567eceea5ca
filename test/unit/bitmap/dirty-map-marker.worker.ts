/**
 * Worker for dirty-map-workers.test.ts: attaches to a DirtyMap SAB and, after a start
 * barrier, runs a seeded random mix of operations:
 * - marks and clears in its PRIVATE groups (chunk groups only it touches), keeping an exact
 *   local model and checking every touched chunk right after each operation (lock-free reads
 *   racing with other threads' writes to the same words and pages);
 * - marks in the SHARED groups (every worker marks there, overlapping; nobody clears).
 * Posts { privateDirty, sharedMarked, violations, firstViolation } when done.
 * Threads: a worker_threads worker (Atomics.wait is allowed here).
 * Ownership: chunk c is in group g = floor(c / groupChunks); owner(g) = g % (workers + 2):
 * owner i < workers = worker i, owner workers = shared, owner workers + 1 = main thread.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { DirtyMap } from '../../../src/bitmap/dirty-map.js';

export interface MarkerInput {
  sab: SharedArrayBuffer;
  /** Int32 words: [0] = start flag (0 wait, 1 go), [1] = workers ready, [2] = workers done. */
  barrier: SharedArrayBuffer;
  workerIndex: number;
  workers: number;
  groupChunks: number;
  operations: number;
  seed: number;
  /** True when the pool holds every page (no sentinel): reads must be exact. */
  exact: boolean;
}

export interface MarkerResult {
  privateDirty: number[];
  sharedMarked: number[];
  violations: number;
  firstViolation: string;
}

const input = workerData as MarkerInput;
const map = DirtyMap.attach(input.sab);
const barrier = new Int32Array(input.barrier);
const owners = input.workers + 2;
const groupsPerOwner = Math.floor(map.chunkCount / input.groupChunks / owners);
const privateDirty = new Set<number>();
const sharedMarked = new Set<number>();
let violations = 0;
let firstViolation = '';
let state = input.seed >>> 0 || 1;

/** xorshift32: deterministic, no allocation. */
function random(bound: number): number {
  state ^= state << 13;
  state ^= state >>> 17;
  state ^= state << 5;
  state >>>= 0;
  return state % bound;
}

/** A byte range inside group `group`: [offsetBytes, endBytes). */
function groupRange(group: number): [number, number] {
  const groupBytes = input.groupChunks * map.chunkBytes;
  const first = group * groupBytes + random(groupBytes);
  const end = first + 1 + random(group * groupBytes + groupBytes - first);
  return [first, end];
}

function check(firstChunk: number, endChunk: number, what: string): void {
  for (let chunk = firstChunk; chunk < endChunk; chunk += 1) {
    const inMap = map.isChunkDirty(chunk);
    const inModel = privateDirty.has(chunk);
    if ((inModel && !inMap) || (input.exact && inMap !== inModel)) {
      violations += 1;
      if (firstViolation === '') {
        firstViolation = `${what}: chunk ${chunk} model ${inModel} map ${inMap}`;
      }
    }
  }
}

function privateOperation(): void {
  const group = random(groupsPerOwner) * owners + input.workerIndex;
  const [offsetBytes, endBytes] = groupRange(group);
  const groupFirst = group * input.groupChunks;
  if (random(2) === 0) {
    map.markRange(offsetBytes, endBytes - offsetBytes);
    const end = Math.ceil(endBytes / map.chunkBytes);
    const first = Math.floor(offsetBytes / map.chunkBytes);
    for (let chunk = first; chunk < end; chunk += 1) privateDirty.add(chunk);
  } else {
    map.clearRange(offsetBytes, endBytes - offsetBytes);
    const end = Math.floor(endBytes / map.chunkBytes);
    const first = Math.ceil(offsetBytes / map.chunkBytes);
    for (let chunk = first; chunk < end; chunk += 1) privateDirty.delete(chunk);
  }
  check(groupFirst, groupFirst + input.groupChunks, `after op on group ${group}`);
  const [testOffset, testEnd] = groupRange(group);
  const expected = anyPrivateDirty(testOffset, testEnd);
  const actual = map.testRange(testOffset, testEnd - testOffset);
  if ((expected && !actual) || (input.exact && expected !== actual)) {
    violations += 1;
    if (firstViolation === '') {
      firstViolation = `testRange(${testOffset}) = ${actual}, model ${expected}`;
    }
  }
}

function anyPrivateDirty(offsetBytes: number, endBytes: number): boolean {
  const end = Math.ceil(endBytes / map.chunkBytes);
  for (let chunk = Math.floor(offsetBytes / map.chunkBytes); chunk < end; chunk += 1) {
    if (privateDirty.has(chunk)) return true;
  }
  return false;
}

function sharedOperation(): void {
  const group = random(groupsPerOwner) * owners + input.workers;
  const [offsetBytes, endBytes] = groupRange(group);
  map.markRange(offsetBytes, endBytes - offsetBytes);
  const end = Math.ceil(endBytes / map.chunkBytes);
  const first = Math.floor(offsetBytes / map.chunkBytes);
  for (let chunk = first; chunk < end; chunk += 1) sharedMarked.add(chunk);
}

Atomics.add(barrier, 1, 1);
Atomics.notify(barrier, 1);
while (Atomics.load(barrier, 0) === 0) Atomics.wait(barrier, 0, 0, 1000);
for (let operation = 0; operation < input.operations; operation += 1) {
  if (random(3) === 0) sharedOperation();
  else privateOperation();
}
Atomics.add(barrier, 2, 1);
const result: MarkerResult = {
  privateDirty: [...privateDirty], sharedMarked: [...sharedMarked], violations, firstViolation,
};
parentPort?.postMessage(result);
