/**
 * The resync rate limiter (src/engine/resync.ts takeTokens: a token bucket at the ceiling while
 * clients are idle, at the floor while they are busy) measured on a fake clock: node:test mock
 * timers drive setTimeout and Date, the host stamps each copy with the fake time, and the test
 * checks the bytes copied by every moment against rate x time + one burst, and the rate obtained
 * over the whole resync against the rate asked for. No wall time is measured.
 * Thread: test main thread.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { DirtyMap } from '../../../src/bitmap/dirty-map.js';
import { createLogger } from '../../../src/core/log.js';
import { Resync, type ResyncHost, type ResyncRates } from '../../../src/engine/resync.js';

const kChunk = 4096;
const kCopyBytes = 64 * 1024;
const kMiB = 1024 * 1024;
const logger = createLogger({ level: 'silent', pretty: false });

interface Stamp {
  atMs: number;
  bytes: number;
}

interface Run {
  stamps: Stamp[];
  resync: Resync;
  /** Fake milliseconds until the resync ended. */
  endMs: number;
}

/**
 * Runs a resync of `dirtyBytes` on the fake clock, 5 ms per step; `onStep` may change the
 * rates or the client load as fake time passes.
 */
async function runOnFakeClock(t: TestContext, dirtyBytes: number, rates: ResyncRates, busy: () => boolean, onStep?: (nowMs: number, resync: Resync) => void): Promise<Run> {
  t.mock.timers.enable({ apis: ['setTimeout', 'Date'], now: 0 });
  const map = DirtyMap.create({ deviceBytes: 4 * dirtyBytes, chunkBytes: kChunk });
  map.markRange(0, dirtyBytes);
  const stamps: Stamp[] = [];
  const host: ResyncHost = {
    async copyRange(_leg, offsetBytes, lengthBytes) {
      await Promise.resolve();
      stamps.push({ atMs: Date.now(), bytes: lengthBytes });
      map.clearRange(offsetBytes, lengthBytes);
      return 'copied';
    },
    stillResyncing: () => true,
    clientBusy: busy,
    resyncDone: () => undefined,
  };
  const resync = new Resync(0, map, host, rates, logger, 4, kCopyBytes);
  let finished = false;
  const started = resync.start().then(() => {
    finished = true;
  });
  const kStepMs = 5;
  const kMaxSteps = 200_000; // 1000 fake seconds: a limiter that stalls fails here, not by hanging
  for (let step = 0; !finished; step += 1) {
    assert.ok(step < kMaxSteps, `resync still running after ${step * kStepMs} fake ms (${stamps.length} copies)`);
    await new Promise((resolve) => setImmediate(resolve)); // real: lets every lane run its microtasks
    onStep?.(Date.now(), resync);
    t.mock.timers.tick(kStepMs);
  }
  await started;
  const endMs = Date.now();
  t.mock.timers.reset();
  const copied = stamps.reduce((sum, stamp) => sum + stamp.bytes, 0);
  assert.equal(copied, dirtyBytes, 'every dirty byte was copied once');
  return { stamps, resync, endMs };
}

/** Checks the bucket's promise: by any moment, at most one burst plus rate x elapsed. */
function assertUnderCeiling(stamps: Stamp[], bytesPerSecond: number, fromIndex = 0, fromMs = 0): void {
  const burst = Math.max(kCopyBytes, bytesPerSecond / 10);
  let total = 0;
  for (const stamp of stamps.slice(fromIndex)) {
    total += stamp.bytes;
    const allowed = burst + (bytesPerSecond * (stamp.atMs - fromMs)) / 1000;
    assert.ok(total <= allowed, `${total} bytes copied by ${stamp.atMs} ms; the ceiling allows ${Math.floor(allowed)}`);
  }
}

/** Bytes per second obtained between the first and the last copy of `stamps`. */
function obtainedRate(stamps: Stamp[]): number {
  const first = stamps[0];
  const last = stamps[stamps.length - 1];
  assert.ok(first !== undefined && last !== undefined && last.atMs > first.atMs, 'copies spread over fake time');
  const bytesAfterFirst = stamps.slice(1).reduce((sum, stamp) => sum + stamp.bytes, 0);
  return (bytesAfterFirst * 1000) / (last.atMs - first.atMs);
}

test('idle clients: the copy rate is the ceiling, never above it at any moment', async (t) => {
  const ceiling = kMiB;
  const { stamps } = await runOnFakeClock(t, 4 * kMiB, { minBytesPerSecond: 0, maxBytesPerSecond: ceiling }, () => false);
  assertUnderCeiling(stamps, ceiling);
  const rate = obtainedRate(stamps);
  assert.ok(rate <= ceiling * 1.02, `rate ${Math.round(rate)} B/s over the ceiling ${ceiling}`);
  assert.ok(rate >= ceiling * 0.9, `rate ${Math.round(rate)} B/s far under the ceiling ${ceiling}: the limiter wastes time`);
});

test('busy clients: the copy rate drops to the floor', async (t) => {
  const floor = 256 * 1024;
  const { stamps } = await runOnFakeClock(t, kMiB, { minBytesPerSecond: floor, maxBytesPerSecond: 8 * kMiB }, () => true);
  assertUnderCeiling(stamps, floor);
  const rate = obtainedRate(stamps);
  assert.ok(rate <= floor * 1.02 && rate >= floor * 0.9, `rate ${Math.round(rate)} B/s, floor ${floor}`);
});

test('a ceiling of 0 is unlimited: the whole resync takes no fake time', async (t) => {
  const { stamps, endMs } = await runOnFakeClock(t, 2 * kMiB, { minBytesPerSecond: 0, maxBytesPerSecond: 0 }, () => false);
  assert.equal(stamps.filter((stamp) => stamp.atMs > 0).length, 0, 'no copy waited for the clock');
  assert.ok(endMs < 1000, `ended at ${endMs} fake ms`);
});

test('setRates mid-resync: the new ceiling holds from then on', async (t) => {
  const slow = 512 * 1024;
  const fast = 2 * kMiB;
  let switchedAt = -1;
  const { stamps } = await runOnFakeClock(t, 4 * kMiB, { minBytesPerSecond: 0, maxBytesPerSecond: slow }, () => false, (nowMs, resync) => {
    if (switchedAt < 0 && nowMs >= 2000) {
      switchedAt = nowMs;
      resync.setRates({ minBytesPerSecond: 0, maxBytesPerSecond: fast });
    }
  });
  assert.ok(switchedAt >= 2000);
  const before = stamps.filter((stamp) => stamp.atMs < switchedAt);
  const afterIndex = before.length;
  assertUnderCeiling(before, slow);
  assertUnderCeiling(stamps, fast, afterIndex, switchedAt);
  const rateBefore = obtainedRate(before);
  const rateAfter = obtainedRate(stamps.slice(afterIndex));
  assert.ok(rateBefore <= slow * 1.02 && rateBefore >= slow * 0.9, `before: ${Math.round(rateBefore)} B/s, ceiling ${slow}`);
  assert.ok(rateAfter <= fast * 1.05 && rateAfter >= fast * 0.85, `after: ${Math.round(rateAfter)} B/s, ceiling ${fast}`);
});
