/**
 * Ring layout validation: every bad option is rejected up front with an error naming it, and
 * the derived sizes match the documented layout.
 * Threads: main only.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  computeRingLayout,
  kHeaderWords,
  kMaxLegs,
  kSlotLegErrnoBase,
  kSlotWords,
  slotWord,
} from '../../../src/ring/layout.js';
import { EnbdError } from '../../../src/core/errors.js';

function isRingOptionError(error: unknown): error is EnbdError {
  return error instanceof EnbdError && error.code === 'ENBD_ERR_RING_OPTION';
}

test('defaults: 256 slots of 256 KiB', () => {
  const layout = computeRingLayout();
  assert.equal(layout.slotCount, 256);
  assert.equal(layout.slotBytes, 256 * 1024);
  assert.equal(layout.dataBytes, 256 * 256 * 1024);
  assert.equal(layout.maxRequestBytes, layout.dataBytes);
  assert.equal(layout.controlWords, kHeaderWords + 256 * kSlotWords);
  assert.equal(layout.controlBytes, layout.controlWords * 4);
});

test('explicit bounds are accepted', () => {
  assert.equal(computeRingLayout({ slotCount: 2, slotBytes: 4096 }).dataBytes, 8192);
  assert.equal(computeRingLayout({ slotCount: 4096, slotBytes: 4096 }).slotCount, 4096);
  const largest = computeRingLayout({ slotCount: 64, slotBytes: 32 * 1024 * 1024 });
  assert.equal(largest.dataBytes, 2 ** 31);
});

const badSlotCounts: unknown[] = [3, 0, 1, -2, 8192, 2.5, Number.NaN, Infinity, 6];
for (const slotCount of badSlotCounts) {
  test(`slotCount ${String(slotCount)} -> ENBD_ERR_RING_OPTION naming ring.slotCount`, () => {
    assert.throws(
      () => computeRingLayout({ slotCount: slotCount as number }),
      (error: unknown) =>
        isRingOptionError(error) &&
        error.message.includes('ring.slotCount') &&
        error.message.includes(`got ${String(slotCount)}`),
    );
  });
}

test('exact message for slotCount 3', () => {
  assert.throws(() => computeRingLayout({ slotCount: 3 }), {
    name: 'OptionError',
    code: 'ENBD_ERR_RING_OPTION',
    message: 'ring.slotCount must be a power of two between 2 and 4096, got 3',
  });
});

const badSlotBytes: unknown[] = [
  0, 4095, 4097, 6000, 2048, 64 * 1024 * 1024, -4096, 4096.5, Number.NaN,
];
for (const slotBytes of badSlotBytes) {
  test(`slotBytes ${String(slotBytes)} -> ENBD_ERR_RING_OPTION naming ring.slotBytes`, () => {
    assert.throws(
      () => computeRingLayout({ slotBytes: slotBytes as number }),
      (error: unknown) => isRingOptionError(error) && error.message.includes('ring.slotBytes'),
    );
  });
}

test('data area above 2 GiB -> ENBD_ERR_RING_OPTION naming both options', () => {
  assert.throws(
    () => computeRingLayout({ slotCount: 4096, slotBytes: 32 * 1024 * 1024 }),
    (error: unknown) =>
      isRingOptionError(error) &&
      error.message.includes('ring.slotCount * ring.slotBytes'),
  );
});

test('non-number options -> ENBD_ERR_RING_OPTION naming the option', () => {
  assert.throws(() => computeRingLayout({ slotCount: '256' as unknown as number }), {
    code: 'ENBD_ERR_RING_OPTION',
    message: /ring\.slotCount/,
  });
  assert.throws(() => computeRingLayout({ slotBytes: null as unknown as number }), {
    code: 'ENBD_ERR_RING_OPTION',
    message: /ring\.slotBytes/,
  });
});

test('descriptor words: per-leg errno words for all legs fit the stride', () => {
  assert.equal(kMaxLegs, 31);
  assert.ok(kSlotLegErrnoBase + kMaxLegs <= kSlotWords);
  assert.equal(slotWord(0, 0), kHeaderWords);
  assert.equal(slotWord(3, 5), kHeaderWords + 3 * kSlotWords + 5);
});
