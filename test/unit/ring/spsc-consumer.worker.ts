/**
 * Worker for spsc-queue.test.ts: the consumer side of an SpscQueue. Drains in batches, sleeps
 * with waitAsync when empty, checks that values arrive as 0, 1, 2, ... with no loss and no
 * duplicate, and posts { received, sum, orderErrors, firstBadIndex, waits } when `total`
 * values arrived. Thread: one worker thread.
 */

import { parentPort, workerData } from 'node:worker_threads';
import { SpscQueue } from '../../../src/ring/spsc-queue.js';

interface ConsumerData {
  buffer: SharedArrayBuffer;
  total: number;
  maxBatch: number;
}

const data = workerData as ConsumerData;
const queue = SpscQueue.attach(data.buffer);
const port = parentPort;
if (port === null) throw new Error('spsc-consumer.worker must run in a worker thread');

let received = 0;
let sum = 0;
let orderErrors = 0;
let firstBadIndex = -1;

function onValue(value: number): void {
  if (value !== received) {
    orderErrors += 1;
    if (firstBadIndex < 0) firstBadIndex = received;
  }
  sum += value;
  received += 1;
}

// A pending Atomics.waitAsync does not keep the thread alive; this listener does.
port.on('message', () => undefined);

async function main(): Promise<void> {
  while (received < data.total) {
    if (queue.drain(onValue, data.maxBatch) > 0) continue;
    const sleep = queue.waitAsync();
    if (sleep !== null) await sleep;
  }
  port?.postMessage({ received, sum, orderErrors, firstBadIndex, waits: queue.waitCount });
  port?.close();
}

void main();
