/**
 * Unit tests of core/timeout: the race settles as the promise does or with the fallback, a
 * rejection passes through, and no timer is left behind either way (fake timers count them).
 * Thread: test main thread.
 */
import { test, mock } from 'node:test';
import assert from 'node:assert/strict';
import { settlesWithin, withTimeout } from '../../../src/core/timeout.js';

test('withTimeout gives the value when the promise wins and the fallback when the timer wins', async (t) => {
  t.mock.timers.enable({ apis: ['setTimeout'] });
  assert.equal(await withTimeout(Promise.resolve(7), 1000, -1), 7);
  let resolveLate: (value: number) => void = () => undefined;
  const late = new Promise<number>((resolve) => (resolveLate = resolve));
  const raced = withTimeout(late, 1000, -1);
  t.mock.timers.tick(999);
  await Promise.resolve();
  t.mock.timers.tick(1);
  assert.equal(await raced, -1);
  resolveLate(5); // a late answer changes nothing
  assert.equal(await raced, -1);
});

test('withTimeout rejects with the promise and clears its timer on every path', async () => {
  const cleared = mock.method(globalThis, 'clearTimeout');
  try {
    await assert.rejects(withTimeout(Promise.reject(new Error('boom')), 60_000, null), /boom/);
    assert.equal(await withTimeout(Promise.resolve('x'), 60_000, null), 'x');
    assert.equal(cleared.mock.callCount(), 2);
  } finally {
    cleared.mock.restore();
  }
});

test('settlesWithin says whether the promise fulfilled in time', async (t) => {
  t.mock.timers.enable({ apis: ['setTimeout'] });
  assert.equal(await settlesWithin(Promise.resolve(), 10), true);
  const never = settlesWithin(new Promise(() => undefined), 10);
  t.mock.timers.tick(10);
  assert.equal(await never, false);
});
