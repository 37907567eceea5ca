/**
 * Unit tests of the verify building blocks: the repair reference rule (chooseReference), range
 * intersection, and the piscina hash pool (digests equal for equal bytes, different for one
 * changed byte, pieces tile the range, the SAB is hashed in place, options validated).
 *
 * Thread: test main thread; the pool's workers are real piscina threads.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { chooseReference, intersectRanges } from '../../../src/engine/verify.js';
import { HashPool, kHashAlgorithms } from '../../../src/engine/hash-pool.js';
import { OptionError } from '../../../src/core/errors.js';
import { kHashWorkerEntry } from '../../../src/cli/actor-entry.js';

const pools: HashPool[] = [];
after(async () => {
  await Promise.all(pools.map(async (pool) => await pool.close()));
});

test('reference: the majority when three or more copies and more than half agree', () => {
  assert.deepEqual(chooseReference(['a', 'b', 'b'], [null, null, null]), { position: 1, why: 'majority' });
  assert.deepEqual(chooseReference(['b', 'a', 'b'], [9, 1, 1]), { position: 0, why: 'majority' });
  // The majority wins over a fresher leg.
  assert.deepEqual(chooseReference(['x', 'y', 'y', 'y', 'z'], [7, 1, 1, 1, 1]), { position: 1, why: 'majority' });
});

test('reference: no majority with two copies, or a tie: the freshest leg by generation', () => {
  assert.deepEqual(chooseReference(['a', 'b'], [3, 5]), { position: 1, why: 'freshest' });
  assert.deepEqual(chooseReference(['a', 'b', 'c'], [2, 8, 4]), { position: 1, why: 'freshest' });
  assert.deepEqual(chooseReference(['a', 'a', 'b', 'b'], [1, 1, 1, 6]), { position: 3, why: 'freshest' });
  assert.deepEqual(chooseReference(['a', 'b'], [null, 2]), { position: 1, why: 'freshest' });
});

test('reference: no majority and no single freshest leg: the first copy (leg 0)', () => {
  assert.deepEqual(chooseReference(['a', 'b'], [4, 4]), { position: 0, why: 'first' });
  assert.deepEqual(chooseReference(['a', 'b'], [null, null]), { position: 0, why: 'first' });
  assert.deepEqual(chooseReference(['a', 'b', 'c'], [5, 5, 1]), { position: 0, why: 'first' });
  assert.deepEqual(chooseReference(['a', 'a', 'b', 'b'], [2, 2, 2, 2]), { position: 0, why: 'first' });
});

test('reference: refuses no copies or mismatched generations', () => {
  assert.throws(() => chooseReference([], []));
  assert.throws(() => chooseReference(['a', 'b'], [1]));
});

test('intersectRanges keeps only what both lists cover', () => {
  assert.deepEqual(intersectRanges([[0, 10], [20, 30]], [[5, 25]]), [[5, 10], [20, 25]]);
  assert.deepEqual(intersectRanges([[0, 10]], [[10, 20]]), []);
  assert.deepEqual(intersectRanges([], [[0, 5]]), []);
});

function filledSab(bytes: number): Uint8Array {
  const view = new Uint8Array(new SharedArrayBuffer(bytes));
  for (let at = 0; at < bytes; at += 1) view[at] = (at * 131 + 7) & 0xff;
  return view;
}

test('hash pool: equal bytes give equal digests, one changed byte changes only its piece', async () => {
  const pool = new HashPool({ threads: 2, workerEntry: kHashWorkerEntry });
  pools.push(pool);
  const piece = 64 * 1024;
  const view = filledSab(8 * piece);
  // Two equal copies side by side in one SAB, hashed in place.
  const copy = new Uint8Array(new SharedArrayBuffer(16 * piece));
  copy.set(view, 0);
  copy.set(view, 8 * piece);
  const at = 8 * piece + 3 * piece + 17;
  copy[at] = (copy[at] ?? 0) ^ 0x40;
  const left = await pool.hash(copy.buffer as SharedArrayBuffer, 0, 8 * piece, piece);
  const right = await pool.hash(copy.buffer as SharedArrayBuffer, 8 * piece, 8 * piece, piece);
  assert.equal(left.length, 8);
  assert.equal(right.length, 8);
  const differing = left.flatMap((digest, at) => (digest === right[at] ? [] : [at]));
  assert.deepEqual(differing, [3]);
});

test('hash pool: the last piece may be short; the bytes are read in place from the SAB', async () => {
  const pool = new HashPool({ threads: 1, algorithm: 'sha256', workerEntry: kHashWorkerEntry });
  pools.push(pool);
  const view = filledSab(100_000);
  const digests = await pool.hash(view.buffer as SharedArrayBuffer, 1000, 50_000, 16_384);
  assert.equal(digests.length, 4);
  const expected = createHash('sha256').update(view.subarray(1000 + 3 * 16_384, 51_000)).digest('hex');
  assert.equal(digests[3], expected);
  // A change made after the task was sent is seen by the next task: nothing was cached or copied.
  view[1000] = (view[1000] ?? 0) ^ 1;
  const again = await pool.hash(view.buffer as SharedArrayBuffer, 1000, 16_384, 16_384);
  assert.notEqual(again[0], digests[0]);
});

test('hash pool: every algorithm agrees with itself and tells copies apart', async () => {
  for (const algorithm of kHashAlgorithms) {
    const pool = new HashPool({ threads: 1, algorithm, workerEntry: kHashWorkerEntry });
    pools.push(pool);
    const view = filledSab(32 * 1024);
    view[20_000] = (view[20_000] ?? 0) ^ 1; // the pattern repeats every 256 bytes: break it
    const [first] = await pool.hash(view.buffer as SharedArrayBuffer, 0, 16 * 1024, 16 * 1024);
    const [second] = await pool.hash(view.buffer as SharedArrayBuffer, 0, 16 * 1024, 16 * 1024);
    const [other] = await pool.hash(view.buffer as SharedArrayBuffer, 16 * 1024, 16 * 1024, 16 * 1024);
    assert.equal(first, second, `${algorithm} is deterministic`);
    assert.notEqual(first, other, `${algorithm} tells different bytes apart`);
  }
});

test('hash pool: options and ranges are validated', async () => {
  assert.throws(() => new HashPool({ threads: 0 }), OptionError);
  assert.throws(() => new HashPool({ threads: 1.5 }), OptionError);
  assert.throws(() => new HashPool({ algorithm: 'md5' as never }), OptionError);
  const blind = new HashPool({ threads: 1 });
  await assert.rejects(blind.hash(new SharedArrayBuffer(4096), 0, 4096, 4096), /no worker entry/);
  const pool = new HashPool({ threads: 1, workerEntry: kHashWorkerEntry });
  pools.push(pool);
  const view = filledSab(4096);
  await assert.rejects(pool.hash(view.buffer as SharedArrayBuffer, 0, 0, 4096), OptionError);
  // Checked in the hash worker (actors/hash-worker.ts): a native RangeError, whose class survives
  // the structured clone back from the worker thread (an EnbdError subclass would not).
  await assert.rejects(pool.hash(view.buffer as SharedArrayBuffer, 2048, 4096, 4096), RangeError);
  await pool.close();
  await assert.rejects(pool.hash(view.buffer as SharedArrayBuffer, 0, 4096, 4096));
});
