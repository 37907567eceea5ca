/**
 * RangeLock: unit cases and a fast-check model test. The model replays a random schedule of
 * acquire/release and checks: holders never overlap, overlapping requests are granted in
 * arrival order, and a request that overlaps nothing earlier is granted at once.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { propertyRuns } from '../../helpers/runs.js';
import { RangeLock } from '../../../src/engine/range-lock.js';

test('non-overlapping ranges are granted at once; overlapping ones queue', () => {
  const lock = new RangeLock(8);
  const granted = new Int32Array(8);
  assert.equal(lock.acquire(0, 0, 4096), true);
  assert.equal(lock.acquire(1, 4096, 4096), true);
  assert.equal(lock.acquire(2, 2048, 4096), false);
  assert.equal(lock.acquire(3, 100_000, 10), true);
  assert.equal(lock.release(0, granted), 0, 'still overlaps holder 1');
  assert.equal(lock.release(1, granted), 1);
  assert.equal(granted[0], 2);
  assert.equal(lock.held, 2);
});

test('a later request never overtakes an earlier overlapping waiter', () => {
  const lock = new RangeLock(8);
  const granted = new Int32Array(8);
  assert.equal(lock.acquire(0, 0, 100), true);
  assert.equal(lock.acquire(1, 50, 100), false); // waits on 0
  assert.equal(lock.acquire(2, 120, 10), false); // free of holders but overlaps waiter 1
  assert.equal(lock.release(0, granted), 1);
  assert.equal(granted[0], 1);
  assert.equal(lock.release(1, granted), 1);
  assert.equal(granted[0], 2);
});

test('zero-length ranges never block', () => {
  const lock = new RangeLock(4);
  assert.equal(lock.acquire(0, 0, 100), true);
  assert.equal(lock.acquire(1, 50, 0), true);
});

test('model: no overlapping holders, FIFO among overlapping requests', () => {
  const capacity = 12;
  const step = fc.oneof(
    fc.record({ kind: fc.constant('acquire' as const), offset: fc.integer({ min: 0, max: 60 }), length: fc.integer({ min: 0, max: 20 }) }),
    fc.record({ kind: fc.constant('release' as const), pick: fc.nat() }),
  );
  fc.assert(
    fc.property(fc.array(step, { maxLength: 120 }), (steps) => {
      const lock = new RangeLock(capacity);
      const granted = new Int32Array(capacity);
      const ranges = new Map<number, { start: number; end: number; order: number }>();
      const holders = new Set<number>();
      const waiting: number[] = [];
      let order = 0;
      const overlap = (a: number, b: number): boolean => {
        const x = ranges.get(a);
        const y = ranges.get(b);
        if (x === undefined || y === undefined || x.start === x.end || y.start === y.end) return false;
        return x.start < y.end && y.start < x.end;
      };
      const grant = (id: number): void => {
        for (const other of [...holders]) assert.ok(!overlap(id, other), 'holders never overlap');
        for (const other of waiting) {
          const earlier = (ranges.get(other)?.order ?? 0) < (ranges.get(id)?.order ?? 0);
          assert.ok(!(earlier && overlap(id, other)), 'no overtaking an earlier overlapping waiter');
        }
        holders.add(id);
      };
      for (const action of steps) {
        if (action.kind === 'acquire') {
          let id = -1;
          for (let candidate = 0; candidate < capacity; candidate += 1) {
            if (!holders.has(candidate) && !waiting.includes(candidate)) {
              id = candidate;
              break;
            }
          }
          if (id < 0) continue;
          ranges.set(id, { start: action.offset, end: action.offset + action.length, order: order++ });
          const shouldBlock = [...holders].some((h) => overlap(id, h)) || waiting.some((w) => overlap(id, w));
          const got = lock.acquire(id, action.offset, action.length);
          assert.equal(got, !shouldBlock);
          if (got) grant(id);
          else waiting.push(id);
        } else {
          if (holders.size === 0) continue;
          const list = [...holders];
          const id = list[action.pick % list.length] ?? 0;
          holders.delete(id);
          const count = lock.release(id, granted);
          for (let index = 0; index < count; index += 1) {
            const next = granted[index] ?? -1;
            const at = waiting.indexOf(next);
            assert.ok(at >= 0, 'granted id was waiting');
            waiting.splice(at, 1);
            grant(next);
          }
          for (const w of waiting) {
            const free = ![...holders].some((h) => overlap(w, h)) &&
              !waiting.some((e) => e !== w && (ranges.get(e)?.order ?? 0) < (ranges.get(w)?.order ?? 0) && overlap(w, e));
            assert.ok(!free, `waiter ${w} could have been granted`);
          }
        }
        assert.equal(lock.held, holders.size);
        assert.equal(lock.waiting, waiting.length);
      }
    }),
    { numRuns: propertyRuns(500) },
  );
});

test('acquireNext queues at the head: granted right after the holder, before requests that waited longer', () => {
  const lock = new RangeLock(8);
  const granted = new Int32Array(8);
  assert.equal(lock.acquire(0, 0, 4096), true); // the client write
  assert.equal(lock.acquire(1, 0, 4096), false); // a later write to the same chunk, waiting
  assert.equal(lock.acquire(2, 8192, 4096), true); // unrelated
  lock.acquireNext(3, 0, 4096); // the client write's shadow, queued after 1 arrived
  assert.equal(lock.waiting, 2);
  assert.equal(lock.release(0, granted), 1);
  assert.equal(granted[0], 3, 'the shadow goes first');
  assert.equal(lock.release(3, granted), 1);
  assert.equal(granted[0], 1, 'then the later write');
  assert.throws(() => lock.acquireNext(4, 100_000, 4096), /follows a holder/);
});
