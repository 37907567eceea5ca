/**
 * SpscQueue and Doorbell: single-thread property tests against an array model (including
 * counter wrap-around at 2^31), batching of notifies, and a real worker_threads run: producer
 * on the main thread, consumer in a worker, 1,000,000 sequenced values.
 * Threads: main + one worker.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Worker } from 'node:worker_threads';
import { once } from 'node:events';
import { setImmediate as yieldTurn, setTimeout as sleepMs } from 'node:timers/promises';
import fc from 'fast-check';
import { propertyRuns } from '../../helpers/runs.js';
import {
  Doorbell,
  SpscQueue,
  kQueueHead,
  kQueueTail,
} from '../../../src/ring/spsc-queue.js';

test('create validates capacity with ENBD_ERR_RING_OPTION naming queue.capacity', () => {
  for (const capacity of [0, 1, 3, 100, 2 ** 21, -4, 2.5]) {
    assert.throws(() => SpscQueue.create(capacity), {
      code: 'ENBD_ERR_RING_OPTION',
      message: new RegExp(`queue\\.capacity .* got ${capacity}`),
    });
  }
  assert.equal(SpscQueue.create(2).capacity, 2);
});

test('push/pop basics: FIFO, -1 when empty, false when full', () => {
  const producer = SpscQueue.create(4);
  const consumer = SpscQueue.attach(producer.buffer);
  assert.equal(consumer.pop(), -1);
  for (const value of [10, 11, 12, 13]) assert.equal(producer.push(value), true);
  assert.equal(producer.push(14), false, 'full');
  assert.equal(producer.freeSpace, 0);
  assert.equal(consumer.size, 4);
  assert.equal(consumer.pop(), 10);
  assert.equal(producer.push(14), true, 'space after one pop');
  const seen: number[] = [];
  assert.equal(consumer.drain((value) => seen.push(value), 2), 2);
  assert.equal(consumer.drain((value) => seen.push(value), 100), 2);
  assert.deepEqual(seen, [11, 12, 13, 14]);
  assert.equal(consumer.pop(), -1);
  assert.throws(() => producer.push(-1), /u31/);
});

test('staged entries are invisible until publish', () => {
  const producer = SpscQueue.create(8);
  const consumer = SpscQueue.attach(producer.buffer);
  assert.equal(producer.stage(1), true);
  assert.equal(producer.stage(2), true);
  assert.equal(consumer.pop(), -1);
  assert.equal(producer.publish(), false, 'no notify: consumer not sleeping');
  assert.equal(consumer.pop(), 1);
  assert.equal(consumer.pop(), 2);
  assert.equal(producer.pushMany([5, 6, 7, 8, 9, 10, 11, 12, 13, 14], 1, 9), 8, 'stops when full');
  const seen: number[] = [];
  consumer.drain((value) => seen.push(value), 64);
  assert.deepEqual(seen, [6, 7, 8, 9, 10, 11, 12, 13]);
});

type QueueOp =
  | { kind: 'push'; values: number[] }
  | { kind: 'pop' }
  | { kind: 'drain'; maxBatch: number };

function checkAgainstModel(producer: SpscQueue, consumer: SpscQueue, ops: QueueOp[]): void {
  const model: number[] = [];
  for (const op of ops) {
    if (op.kind === 'push') {
      const room = producer.capacity - model.length;
      const pushed = producer.pushMany(op.values, 0, op.values.length);
      assert.equal(pushed, Math.min(room, op.values.length));
      model.push(...op.values.slice(0, pushed));
    } else if (op.kind === 'pop') {
      assert.equal(consumer.pop(), model.length === 0 ? -1 : model.shift());
    } else {
      const seen: number[] = [];
      const count = consumer.drain((value) => seen.push(value), op.maxBatch);
      assert.equal(count, Math.min(op.maxBatch, model.length));
      assert.deepEqual(seen, model.splice(0, count));
    }
    assert.equal(consumer.size, model.length);
  }
}

const queueOp: fc.Arbitrary<QueueOp> = fc.oneof(
  fc.record({
    kind: fc.constant('push' as const),
    values: fc.array(fc.integer({ min: 0, max: 0x7fffffff }), { maxLength: 20 }),
  }),
  fc.record({ kind: fc.constant('pop' as const) }),
  fc.record({ kind: fc.constant('drain' as const), maxBatch: fc.integer({ min: 1, max: 20 }) }),
);

test('random push/pop/drain sequences match an array model (fast-check)', () => {
  fc.assert(
    fc.property(
      fc.constantFrom(2, 4, 8, 16),
      fc.array(queueOp, { maxLength: 300 }),
      (capacity, ops) => {
        const producer = SpscQueue.create(capacity);
        checkAgainstModel(producer, SpscQueue.attach(producer.buffer), ops);
      },
    ),
    { numRuns: propertyRuns(300) },
  );
});

test('counters wrap past 2^31 and 2^32 without losing entries (fast-check)', () => {
  fc.assert(
    fc.property(
      fc.constantFrom(0x7ffffff0, -20, -1, 0x7fffffff),
      fc.array(queueOp, { minLength: 50, maxLength: 300 }),
      (start, ops) => {
        const created = SpscQueue.create(8);
        const words = new Int32Array(created.buffer);
        words[kQueueTail] = start;
        words[kQueueHead] = start;
        const producer = SpscQueue.attach(created.buffer);
        checkAgainstModel(producer, SpscQueue.attach(created.buffer), ops);
      },
    ),
    { numRuns: propertyRuns(200) },
  );
});

test('wrap-around many times: 100,000 entries through a 4-entry queue', () => {
  const producer = SpscQueue.create(4);
  const consumer = SpscQueue.attach(producer.buffer);
  let next = 0;
  let expected = 0;
  while (expected < 100_000) {
    while (next < 100_000 && producer.push(next)) next += 1;
    let value = consumer.pop();
    while (value >= 0) {
      assert.equal(value, expected);
      expected += 1;
      value = consumer.pop();
    }
  }
  assert.equal(consumer.pop(), -1);
});

/**
 * A pending Atomics.waitAsync (and its resolution task) does not keep Node's event loop alive;
 * real consumers have sockets or ports. Same-thread tests hold a timer instead.
 */
async function withKeepAlive(body: () => Promise<void>): Promise<void> {
  const keepAlive = setInterval(() => undefined, 1000);
  try {
    await body();
  } finally {
    clearInterval(keepAlive);
  }
}

test('notify only when the consumer sleeps, at most one per publish', () =>
  withKeepAlive(async () => {
    const producer = SpscQueue.create(16);
    const consumer = SpscQueue.attach(producer.buffer);
    assert.equal(producer.push(1), true);
    assert.equal(producer.notifyCount, 0, 'awake consumer: no notify');
    assert.equal(consumer.waitAsync(), null, 'data available: do not sleep');
    assert.equal(consumer.consumerSleeping, false);
    assert.equal(consumer.pop(), 1);
    const sleep = consumer.waitAsync(10_000);
    assert.notEqual(sleep, null);
    assert.equal(consumer.consumerSleeping, true);
    for (let value = 0; value < 5; value++) producer.stage(value);
    assert.equal(producer.publish(), true);
    assert.equal(producer.notifyCount, 1, 'one notify for a batch of five');
    assert.equal(await sleep, 'ok');
    assert.equal(consumer.drain(() => undefined, 16), 5);
    assert.equal(consumer.consumerSleeping, false, 'drain clears the sleeping flag');
    producer.push(9);
    assert.equal(producer.notifyCount, 1, 'awake again: no notify');
    assert.equal(consumer.pop(), 9);
    assert.equal(await consumer.waitAsync(1), 'timed-out');
  }));

test('doorbell: snapshot, ring, sleep; notifies only a sleeping consumer', () =>
  withKeepAlive(async () => {
    const bell = Doorbell.create();
    const producer = Doorbell.attach(bell.buffer);
    const first = bell.snapshot();
    assert.equal(producer.ring(), false, 'consumer awake: no notify');
    assert.equal(bell.waitAsync(first), null, 'rang since the snapshot: do not sleep');
    const second = bell.snapshot();
    const sleep = bell.waitAsync(second, 10_000);
    assert.notEqual(sleep, null);
    assert.equal(bell.consumerSleeping, true);
    assert.equal(producer.ring(), true);
    assert.equal(await sleep, 'ok');
    assert.equal(producer.notifyCount, 1);
    assert.notEqual(bell.snapshot(), second);
    assert.equal(bell.consumerSleeping, false);
  }));

interface ConsumerResult {
  received: number;
  sum: number;
  orderErrors: number;
  firstBadIndex: number;
  waits: number;
}

const kWorkerTestOptions = { timeout: 120_000 };

test(
  'worker consumer: 1,000,000 sequenced values, no loss/duplicate/hang',
  kWorkerTestOptions,
  async () => {
    const total = 1_000_000;
    const producer = SpscQueue.create(1024);
    const worker = new Worker(new URL('./spsc-consumer.worker.js', import.meta.url), {
      workerData: { buffer: producer.buffer, total, maxBatch: 256 },
    });
    const resultPromise = once(worker, 'message');
    const exited = once(worker, 'exit');
    try {
      // Wait until the consumer is asleep so the first publish must wake it.
      for (let attempt = 0; attempt < 10_000 && !producer.consumerSleeping; attempt++) {
        await sleepMs(1);
      }
      assert.equal(producer.consumerSleeping, true, 'consumer went to sleep on an empty queue');

      const batch = new Int32Array(512);
      let next = 0;
      let round = 0;
      while (next < total) {
        const count = Math.min(total - next, 1 + ((round * 37) % 512));
        for (let index = 0; index < count; index++) batch[index] = next + index;
        let offset = 0;
        while (offset < count) {
          offset += producer.pushMany(batch, offset, count - offset);
          if (offset < count) await yieldTurn();
        }
        next += count;
        round += 1;
        if (round % 500 === 0) await sleepMs(1); // let the consumer fall asleep now and then
      }
      assert.ok(producer.notifyCount >= 1, 'the sleeping consumer was notified');
      const [result] = (await resultPromise) as [ConsumerResult];
      assert.equal(result.received, total);
      assert.equal(result.orderErrors, 0, `first out-of-order index ${result.firstBadIndex}`);
      assert.equal(result.sum, (total * (total - 1)) / 2);
      assert.ok(result.waits >= 1, 'the consumer slept at least once');
      await exited;
    } finally {
      await worker.terminate();
    }
  },
);
