/**
 * parseDurationMs: bare numbers are milliseconds (as before), units ms/s/m/h; out-of-range and
 * malformed values are refused naming the flag as the user wrote it and the value.
 * Thread: test main thread.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseDurationMs } from '../../../src/cli/parse.js';

test('parseDurationMs: bare milliseconds and units', () => {
  const cases: Array<[string, number]> = [['5000', 5000], ['0', 0], ['500ms', 500], ['2s', 2000], ['1.5s', 1500], ['1m', 60_000], ['1h', 3_600_000], [' 250 ms ', 250], ['2S', 2000]];
  for (const [text, ms] of cases) assert.equal(parseDurationMs('--leg-timeout', text, 0, 3_600_000), ms, text);
});

test('parseDurationMs: refuses malformed and out-of-range values, naming the flag', () => {
  for (const bad of ['', '-5', 'soon', '1d', '2 s s', '1.2.3', 'ms', '.5s', '2h']) {
    assert.throws(() => parseDurationMs('--leg-timeout', bad, 0, 3_600_000), (error: Error) => {
      assert.match(error.message, /^--leg-timeout must be a duration from 0 ms to 3600000 ms/);
      assert.ok(error.message.endsWith(`got ${bad === '' || bad.includes(' ') ? `"${bad}"` : bad}`), error.message);
      return true;
    }, bad);
  }
  assert.throws(() => parseDurationMs('--fence-timeout', '0', 1, 10), /--fence-timeout must be a duration from 1 ms/);
});
