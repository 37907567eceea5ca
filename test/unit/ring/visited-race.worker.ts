/**
 * Worker for visited-mask.test.ts (lockstep race): every leg acks every slot of the ring, in
 * the same order, starting each round at the same instant (spin on a shared round word), so
 * legs collide on the same visited word as often as possible. Counts completions per slot in
 * a shared array for the master to check. Thread: one worker thread per leg.
 */

import { parentPort, workerData } from 'node:worker_threads';
import { RequestRing, type RingBuffers } from '../../../src/ring/request-ring.js';
import { ackSlot } from '../../../src/ring/visited-mask.js';
import { legErrnoFor, legFails } from './visited-rules.js';

interface RaceData {
  legIndex: number;
  ring: RingBuffers;
  /** Int32: [0] round go word (master), [1] legs done with the round, [2 + slot] completers. */
  shared: SharedArrayBuffer;
  rounds: number;
}

const kRaceGo = 0;
const kRaceDone = 1;
const kRaceCounts = 2;

const data = workerData as RaceData;
const ring = RequestRing.attach(data.ring);
const shared = new Int32Array(data.shared);
let completions = 0;

for (let round = 1; round <= data.rounds; round++) {
  let spins = 0;
  while (Atomics.load(shared, kRaceGo) < round) {
    spins += 1;
    if (spins > 100_000) Atomics.wait(shared, kRaceGo, round - 1, 1);
  }
  for (let slot = 0; slot < ring.slotCount; slot++) {
    const failed = legFails(slot, round, data.legIndex);
    if (ackSlot(ring, slot, data.legIndex, failed, failed ? legErrnoFor(data.legIndex) : 0)) {
      completions += 1;
      Atomics.add(shared, kRaceCounts + slot, 1);
    }
  }
  Atomics.add(shared, kRaceDone, 1);
  Atomics.notify(shared, kRaceDone);
}

parentPort?.postMessage({ completions });
