/**
 * Control message shapes (src/control/protocol.ts): requests from clients and messages from
 * the daemon; as many invalid cases as valid ones. Plus the text helpers of format.ts.
 * Threads: main only.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ProtocolError, isControlMethod, parseRequest, parseServerMessage } from '../../../src/control/protocol.js';
import { formatBytes, formatCeiling, formatDuration, formatResync } from '../../../src/control/format.js';

test('parseRequest accepts { id, method, params } and defaults params to {}', () => {
  assert.deepStrictEqual(parseRequest({ id: 0, method: 'status' }), { id: 0, method: 'status', params: {} });
  assert.deepStrictEqual(parseRequest({ id: 7, method: 'leg.fail', params: { leg: 1 } }), { id: 7, method: 'leg.fail', params: { leg: 1 } });
  assert.deepStrictEqual(parseRequest({ id: 2 ** 53 - 1, method: 'x', params: null }), { id: 2 ** 53 - 1, method: 'x', params: {} });
});

test('parseRequest refuses every malformed request with a ProtocolError naming the problem', () => {
  const cases: Array<[unknown, RegExp, number | null]> = [
    [42, /must be a map/, null],
    ['status', /must be a map/, null],
    [[1, 'status'], /must be a map/, null],
    [null, /must be a map/, null],
    [{ method: 'status' }, /id must be/, null],
    [{ id: -1, method: 'status' }, /id must be/, null],
    [{ id: 1.5, method: 'status' }, /id must be/, null],
    [{ id: '1', method: 'status' }, /id must be/, null],
    [{ id: 3 }, /method must be/, 3],
    [{ id: 3, method: '' }, /method must be/, 3],
    [{ id: 3, method: 'x'.repeat(65) }, /method must be/, 3],
    [{ id: 4, method: 'status', params: [1] }, /params must be a map/, 4],
    [{ id: 4, method: 'status', params: 'leg=1' }, /params must be a map/, 4],
  ];
  for (const [value, message, id] of cases) {
    assert.throws(() => parseRequest(value), (error: unknown) => error instanceof ProtocolError && message.test(error.message) && error.id === id, JSON.stringify(value));
  }
});

test('parseServerMessage reads answers and events', () => {
  assert.deepStrictEqual(parseServerMessage({ id: 1, ok: true, result: { a: 1 } }), { kind: 'response', id: 1, ok: true, result: { a: 1 } });
  assert.deepStrictEqual(parseServerMessage({ id: 2, ok: false, error: { code: 'ENBD_ERR_CONFIG', message: 'no' } }), { kind: 'response', id: 2, ok: false, error: { code: 'ENBD_ERR_CONFIG', message: 'no' } });
  assert.deepStrictEqual(parseServerMessage({ event: 'leg-state', data: { leg: 1 } }), { kind: 'event', event: 'leg-state', data: { leg: 1 } });
  for (const bad of [1, { ok: true }, { id: 1 }, { id: 1, ok: false }, { id: 1, ok: false, error: 'x' }, { id: -1, ok: true }]) {
    assert.throws(() => parseServerMessage(bad), ProtocolError, JSON.stringify(bad));
  }
});

test('isControlMethod knows the methods and nothing else', () => {
  assert.ok(isControlMethod('status'));
  assert.ok(isControlMethod('repl.eval'));
  assert.ok(!isControlMethod('shutdown'));
  assert.ok(!isControlMethod('__proto__'));
});

test('format helpers: bytes, rates, durations, resync line', () => {
  assert.equal(formatBytes(0), '0 B');
  assert.equal(formatBytes(1023), '1023 B');
  assert.equal(formatBytes(4096), '4.0 KiB');
  assert.equal(formatBytes(64 * 1024 * 1024), '64.0 MiB');
  assert.equal(formatCeiling(0), 'unlimited');
  assert.equal(formatCeiling(1024 * 1024), '1.0 MiB/s');
  assert.equal(formatDuration(null), '?');
  assert.equal(formatDuration(7), '7 s');
  assert.equal(formatDuration(125), '2 min 05 s');
  assert.equal(formatDuration(3720), '1 h 02 min');
  const line = formatResync({ leg: 1, running: true, paused: true, bytesDone: 1024, bytesLeft: 3072, bytesTotal: 4096, bytesPerSecond: 2048, etaSeconds: 2, startedAt: 0, copiesInFlight: 1 });
  assert.equal(line, 'resync 25.0% 3.0 KiB of 4.0 KiB left, 2.0 KiB/s, ETA 2 s, paused');
});
