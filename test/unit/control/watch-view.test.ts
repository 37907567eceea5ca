/**
 * `enbd status --watch`'s live block (src/control/watch-view.ts): at 40, 80 and 120 columns no
 * line is longer than the width, the header's parts are all there (wrapped, not cut), each leg
 * appears once, a resyncing leg's bar is whole ("[" to "]"); and the repaint writes event lines
 * above the block, never inside it.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { LegView, StatusResult } from '../../../src/control/protocol.js';
import { renderWatch, TerminalStatusView, type WatchTerminal } from '../../../src/control/watch-view.js';

function leg(index: number, overrides: Partial<LegView> = {}): LegView {
  return {
    index, name: String.fromCharCode(97 + index), uri: `nbd+unix:///?socket=/tmp/enbd-watch-0123456789abcdef/some/long/dir/leg${index}.sock`, kind: 'nbd',
    state: 'in-sync', failureReason: null, inFlight: 3, latencyMeanMs: 0.42, requests: 10, errors: 0, connected: true, dirtyBytes: 0,
    reconnectAttempts: 0, failures: 0, recentFailures: 0, resync: null, resyncedBytes: 0, member: null, ...overrides,
  };
}

function status(legs: LegView[]): StatusResult {
  return {
    export: { name: 'a-rather-long-export-name', sizeBytes: 1024 ** 3, clients: 12 },
    daemon: { pid: 1, uptimeSeconds: 5, logLevel: 'info', control: '/tmp/x.ctl' },
    legs,
    resync: { paused: false, minBytesPerSecond: 32 * 1024 ** 2, maxBytesPerSecond: 0 },
    stats: { requests: {}, writeRequests: 0, writeCopies: 0, writeBytesCopied: 0, ringSlotsInUse: 17, ringSlots: 256, payloadBytesCopied: 0, payloadBytesDirect: 0 },
    latency: {},
    metadata: null,
  };
}

const resyncing = leg(1, {
  state: 'resyncing', dirtyBytes: 600 * 1024 ** 2, failureReason: 'missed writes while it was out',
  resync: { bytesTotal: 1024 ** 3, bytesLeft: 600 * 1024 ** 2, bytesDone: 424 * 1024 ** 2, bytesPerSecond: 12 * 1024 ** 2, etaSeconds: 50, paused: true } as never,
});

for (const columns of [40, 80, 120]) {
  test(`renderWatch at ${columns} columns: within the width, whole header, each leg once, whole bar`, () => {
    const lines = renderWatch(status([leg(0), resyncing, leg(2, { state: 'failed', failureReason: 'x'.repeat(300) })]), columns);
    for (const line of lines) assert.ok(line.length <= columns, `line of ${line.length} > ${columns}: ${line}`);
    const text = lines.join(' ').replace(/\s+/g, ' ');
    for (const part of ['export "a-rather-long-export-name": 1.0 GiB', '(1073741824 bytes)', '12 clients', 'ring 17/256 slots in use', 'resync: running', 'floor 32.0 MiB/s', 'ceiling unlimited']) {
      assert.ok(text.includes(part), `header part "${part}" is there:\n${lines.join('\n')}`);
    }
    for (const name of ['a', 'b', 'c']) {
      assert.equal(lines.filter((line) => new RegExp(`^${name}\\s+(in-sync|resyncing|failed)\\s`).test(line)).length, 1, `leg ${name} once:\n${lines.join('\n')}`);
    }
    const bars = lines.filter((line) => /^\s+\[[#-]+\]/.test(line));
    assert.equal(bars.length, 1, 'one bar, for the resyncing leg');
    assert.ok(text.includes('41.4%') && text.includes('paused'), 'percent and paused shown');
  });
}

test('the repaint: event lines go above the block, the block is redrawn in place', () => {
  const writes: string[] = [];
  const listeners: Array<() => void> = [];
  const out: WatchTerminal = { columns: 80, write: (text) => writes.push(text) > 0, on: (_e, l) => listeners.push(l), off: () => undefined };
  const view = new TerminalStatusView(out);
  view.render(status([leg(0), leg(1)]));
  const first = writes.at(-1) ?? '';
  const blockLines = first.split('\n').length - 1;
  view.log('12:00:00 leg b: failed');
  const second = writes.at(-1) ?? '';
  assert.ok(second.startsWith(`\x1b[${blockLines}A\r\x1b[J12:00:00 leg b: failed\n`), JSON.stringify(second));
  out.columns = 40;
  listeners.forEach((listener) => listener());
  const afterResize = writes.slice(-2).join('');
  assert.ok(afterResize.startsWith('\x1b[H\x1b[2J'), 'a resize clears and repaints');
  for (const line of afterResize.replace(/\x1b\[[0-9;?]*[A-Za-z]|\r/g, '').split('\n')) assert.ok(line.length <= 40, line);
  view.stop();
});
