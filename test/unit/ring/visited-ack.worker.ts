/**
 * Worker for visited-mask.test.ts: one leg's connection actor in miniature. Drains slot
 * indices from its dispatch queue, checks the request fields and payload the master wrote,
 * acks with ackSlot (failing by a deterministic rule), and when its ack completes the target
 * hands the slot back on its completion queue and rings the master's doorbell, once per batch.
 * Stops on the kStop entry and posts { completions, acks, fieldErrors }.
 * Thread: one worker thread per leg.
 */

import { parentPort, workerData } from 'node:worker_threads';
import { RequestRing, type RingBuffers } from '../../../src/ring/request-ring.js';
import { Doorbell, SpscQueue } from '../../../src/ring/spsc-queue.js';
import { ackSlot } from '../../../src/ring/visited-mask.js';
import { expectedOffsetBytes, legErrnoFor, legFails, kStop } from './visited-rules.js';

interface AckerData {
  legIndex: number;
  ring: RingBuffers;
  dispatch: SharedArrayBuffer;
  completion: SharedArrayBuffer;
  doorbell: SharedArrayBuffer;
}

const data = workerData as AckerData;
const ring = RequestRing.attach(data.ring);
const dispatch = SpscQueue.attach(data.dispatch);
const completion = SpscQueue.attach(data.completion);
const doorbell = Doorbell.attach(data.doorbell);
const port = parentPort;
if (port === null) throw new Error('visited-ack.worker must run in a worker thread');

let completions = 0;
let acks = 0;
let fieldErrors = 0;
let stopped = false;
let staged = 0;

function onSlot(slot: number): void {
  if (slot === kStop) {
    stopped = true;
    return;
  }
  const generation = ring.generation(slot);
  if (ring.offsetBytes(slot) !== expectedOffsetBytes(slot, generation)) fieldErrors += 1;
  if (ring.slotData(slot)[0] !== (generation & 0xff)) fieldErrors += 1;
  const failed = legFails(slot, generation, data.legIndex);
  acks += 1;
  if (ackSlot(ring, slot, data.legIndex, failed, failed ? legErrnoFor(data.legIndex) : 0)) {
    completions += 1;
    if (!completion.stage(slot)) throw new Error('completion queue full: capacity < slotCount');
    staged += 1;
  }
}

port.on('message', () => undefined); // keeps the thread alive while waitAsync is pending

async function main(): Promise<void> {
  while (!stopped) {
    const count = dispatch.drain(onSlot, 64);
    if (staged > 0) {
      completion.publish();
      doorbell.ring();
      staged = 0;
    }
    if (count > 0) continue;
    const sleep = dispatch.waitAsync();
    if (sleep !== null) await sleep;
  }
  port?.postMessage({ completions, acks, fieldErrors });
  port?.close();
}

void main();
