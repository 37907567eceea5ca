/**
 * takeListenFds (systemd socket activation): the fds only when LISTEN_PID is this process, the
 * variables always removed, a bad LISTEN_FDS refused.
 * Thread: test main thread.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { takeListenFds } from '../../../src/cli/activation.js';

function withEnvironment(values: Record<string, string>, body: () => void): void {
  Object.assign(process.env, values);
  try {
    body();
  } finally {
    for (const key of Object.keys(values)) delete process.env[key];
  }
}

test('our LISTEN_PID: fds 3 .. 3+N-1, and the variables are removed', () => {
  withEnvironment({ LISTEN_PID: String(process.pid), LISTEN_FDS: '2', LISTEN_FDNAMES: 'a:b' }, () => {
    assert.deepEqual(takeListenFds(), [3, 4]);
    assert.equal(process.env['LISTEN_PID'], undefined);
    assert.equal(process.env['LISTEN_FDS'], undefined);
    assert.equal(process.env['LISTEN_FDNAMES'], undefined);
  });
});

test('another process\'s LISTEN_PID, or none: no fds (and still removed)', () => {
  withEnvironment({ LISTEN_PID: String(process.pid + 1), LISTEN_FDS: '1' }, () => {
    assert.deepEqual(takeListenFds(), []);
    assert.equal(process.env['LISTEN_FDS'], undefined);
  });
  assert.deepEqual(takeListenFds(), []);
});

test('a LISTEN_FDS that is not a count from 1 to 64 is refused', () => {
  for (const bad of ['0', '-1', 'x', '65', '1.5']) {
    withEnvironment({ LISTEN_PID: String(process.pid), LISTEN_FDS: bad }, () => {
      assert.throws(() => takeListenFds(), /LISTEN_FDS must be a count from 1 to 64/, bad);
    });
  }
});
