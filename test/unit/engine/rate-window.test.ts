/**
 * RateWindow (src/engine/rate-window.ts): the resync rate over a sliding window. It must fall to 0
 * while nothing moves (a paused resync), not spike in the first moments, and match a steady rate.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { propertyRuns } from '../../helpers/runs.js';
import { RateWindow } from '../../../src/engine/rate-window.js';

test('a steady 10 MB/s reads as 10 MB/s once a second has passed', () => {
  const window = new RateWindow(10_000, 250, 1000);
  window.reset(0);
  for (let ms = 100; ms <= 20_000; ms += 100) window.add(ms, ms * 10_000);
  assert.ok(Math.abs(window.rate(20_000) - 10_000_000) / 10_000_000 < 0.05, `rate ${window.rate(20_000)}`);
});

test('no early spike: 1 MB in the first 10 ms reads as at most 1 MB/s (span floor of 1 s)', () => {
  const window = new RateWindow(10_000, 250, 1000);
  window.reset(0);
  window.add(10, 1_000_000);
  assert.ok(window.rate(10) <= 1_000_000, `rate ${window.rate(10)}`);
});

test('paused: the rate falls to 0 once the window has passed with no bytes', () => {
  const window = new RateWindow(10_000, 250, 1000);
  window.reset(0);
  for (let ms = 250; ms <= 5000; ms += 250) window.add(ms, ms * 1000);
  assert.ok(window.rate(5000) > 0);
  // Nothing more is copied: 30 s later the rate is (close to) 0.
  assert.ok(window.rate(35_000) < 1000, `rate ${window.rate(35_000)}`);
});

test('property: the rate never exceeds the bytes moved in the window over the span floor, never below 0', () => {
  fc.assert(fc.property(fc.array(fc.tuple(fc.integer({ min: 1, max: 2000 }), fc.integer({ min: 0, max: 1_000_000 })), { minLength: 1, maxLength: 200 }), (steps) => {
    const window = new RateWindow(10_000, 250, 1000);
    window.reset(0);
    let now = 0;
    let total = 0;
    for (const [dt, bytes] of steps) {
      now += dt;
      total += bytes;
      window.add(now, total);
      const rate = window.rate(now);
      assert.ok(rate >= 0);
      assert.ok(rate <= total * 1000 / 1000 + 1e-6, `rate ${rate} with ${total} bytes in total`);
    }
  }), { numRuns: propertyRuns(100) });
});
