/**
 * healthCode (the exit code of `enbd status` / `enbd wait`) for every mix of leg states, and
 * parseSeconds (`enbd wait --timeout`), valid and invalid input.
 * Thread: test main thread.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { describeLagging, healthCode, parseSeconds } from '../../../src/control/health.js';

const legs = (...states: string[]): Array<{ index: number; name: string; state: string; resync: null }> =>
  states.map((state, index) => ({ index, name: String.fromCharCode(97 + index), state, resync: null }));

test('healthCode: 0 only when every non-removed leg is in sync', () => {
  assert.equal(healthCode(legs('in-sync')), 0);
  assert.equal(healthCode(legs('in-sync', 'in-sync', 'in-sync')), 0);
  assert.equal(healthCode(legs('in-sync', 'removed')), 0);
});

test('healthCode: 1 when some leg is in sync and another is not', () => {
  for (const other of ['resyncing', 'probation', 'degraded', 'fencing', 'reconnecting', 'faulty', 'failed']) {
    assert.equal(healthCode(legs('in-sync', other)), 1, other);
    assert.equal(healthCode(legs(other, 'in-sync', 'removed')), 1, other);
  }
});

test('healthCode: 2 when no leg is in sync (resyncing does not count), or no leg at all', () => {
  assert.equal(healthCode(legs('resyncing', 'failed')), 2);
  assert.equal(healthCode(legs('degraded', 'degraded')), 2);
  assert.equal(healthCode(legs('removed')), 2);
  assert.equal(healthCode([]), 2);
});

test('describeLagging names the legs that are not in sync', () => {
  assert.equal(describeLagging(legs('in-sync', 'in-sync')), 'every leg in sync');
  assert.equal(describeLagging(legs('in-sync', 'failed', 'removed')), 'leg b failed');
  const resyncing = [{ index: 2, name: 'c', state: 'resyncing', resync: { bytesTotal: 200, bytesLeft: 50 } }];
  assert.equal(describeLagging(resyncing as never), 'leg c resyncing 75.0%');
});

test('parseSeconds: plain seconds and ms/s/m/h units', () => {
  assert.equal(parseSeconds('30'), 30);
  assert.equal(parseSeconds('1.5'), 1.5);
  assert.equal(parseSeconds('500ms'), 0.5);
  assert.equal(parseSeconds('2s'), 2);
  assert.equal(parseSeconds('1m'), 60);
  assert.equal(parseSeconds('1h'), 3600);
  assert.equal(parseSeconds('0'), 0);
});

test('parseSeconds: refuses what is not a duration', () => {
  for (const bad of ['', '-1', 'abc', '1d', '1.2.3', 's', '1 parsec', '.5']) assert.equal(parseSeconds(bad), null, bad);
});
