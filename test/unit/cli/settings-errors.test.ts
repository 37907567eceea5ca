/**
 * Every `enbd mirror` setting with a bad value, in-process (resolveMirrorSettings), twice: as a
 * flag (the message names the flag, `--ring-slots must be ..., got 3`) and as a key of a config
 * file (`ringSlots in bad.yaml must be ..., got 3`). Each is a usage error (ENBD_ERR_USAGE: the
 * CLI exits 2; test/interop/flag-errors.test.ts checks that through the real CLI) in the one
 * form "NAME must be WHAT, got VALUE", with no error code or internal name in the message.
 * Thread: test main thread.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EnbdError } from '../../../src/core/errors.js';
import { resolveMirrorSettings } from '../../../src/cli/mirror.js';

const dir = mkdtempSync(join(tmpdir(), 'enbd-settings-errors-'));
after(() => rmSync(dir, { recursive: true, force: true }));

/** [config key, flag, bad value, the value as shown, extra settings] */
const kRows: Array<[string, string, unknown, string, Record<string, unknown>?]> = [
  ['ringSlots', '--ring-slots', '3', '3'], ['ringSlots', '--ring-slots', '8192', '8192'],
  ['slotBytes', '--slot-bytes', '1000', '1000'], ['copyMode', '--copy-mode', 'bogus', 'bogus'], ['placement', '--placement', 'nowhere', 'nowhere'],
  ['maxPayload', '--max-payload', 'lots', 'lots'], ['maxConnections', '--max-connections', '0', '0'],
  ['handshakeTimeoutMs', '--handshake-timeout', 'soon', 'soon'], ['payloadTimeoutMs', '--payload-timeout', '-1', '-1'],
  ['legTimeoutMs', '--leg-timeout', '50ms', '50ms'], ['legTimeoutMs', '--leg-timeout', '2d', '2d'], ['idleProbeMs', '--idle-probe', '2d', '2d'],
  ['fenceTimeoutMs', '--fence-timeout', '0', '0'], ['probeTimeoutMs', '--probe-timeout', 'x', 'x'], ['legMaxFailures', '--leg-max-failures', 'many', 'many'],
  ['legFailureWindowMs', '--leg-failure-window', '0', '0'], ['legStableMs', '--leg-stable', 'forever', 'forever'],
  ['bitmapChunk', '--bitmap-chunk', '3000', '3000'], ['bitmapPool', '--bitmap-pool', '0', '0'],
  ['reconnectMinMs', '--reconnect-min', '0', '0'], ['reconnectMaxMs', '--reconnect-max', 'never', 'never'],
  ['reconnectMaxMs', '--reconnect-max', '500ms', '500ms', { reconnectMinMs: '1s' }],
  ['resyncRateMin', '--resync-rate-min', 'fast', 'fast'], ['resyncRateMax', '--resync-rate-max', '1M', '1M', { resyncRateMin: '64M' }],
  ['flushTracking', '--flush-tracking', 'maybe', 'maybe'], ['receive', '--receive', 'teleport', 'teleport'],
  ['metadata', '--metadata', 'disk', 'disk'], ['forceSource', '--force-source', '99', '99'], ['tls', '--tls', 'maybe', 'maybe'],
  ['logLevel', '--log-level', 'loud', 'loud'], ['tlsVerifyPeer', '--tls-verify-peer', 'perhaps', 'perhaps'],
  ['degraded', '--degraded', 'sometimes', 'sometimes'], ['readOnly', '--read-only', 'yes please', '"yes please"'],
  ['socket', '--socket', ['a'], '["a"]'], ['listen', '--listen', '99999', '99999'], ['metrics', '--metrics', 'host:port', 'host:port'],
  ['listen', '--listen', ':80', ':80'], ['metrics', '--metrics', '127.0.0.1:70000', '127.0.0.1:70000'],
];

function escaped(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

function refused(run: () => unknown, name: string, shown: string, what: string): void {
  assert.throws(run, (error: unknown) => {
    assert.ok(error instanceof EnbdError, `${what}: an EnbdError`);
    assert.equal(error.code, 'ENBD_ERR_USAGE', `${what}: a usage error (exit 2): ${error.message}`);
    assert.match(error.message, new RegExp(`^${escaped(name)} must be .+, got ${escaped(shown)}$`), what);
    assert.doesNotMatch(error.message, /ENBD_ERR|ring\.|slotCount|options\.|undefined|NaN/, what);
    return true;
  }, what);
}

test('every mirror flag with a bad value: named as the flag', () => {
  for (const [key, flag, value, shown, extra] of kRows) {
    refused(() => resolveMirrorSettings({ leg: ['/tmp/leg.img'], metadata: key === 'forceSource' ? 'leg' : undefined, ...extra, [key]: value }), flag, shown, `${flag} ${String(value)}`);
  }
});

test('every config key with a bad value: named as written in the file', () => {
  for (const [at, [key, , value, shown, extra]] of kRows.entries()) {
    writeFileSync(join(dir, `bad${at}.yaml`), JSON.stringify({ legs: ['/tmp/leg.img'], ...extra, [key]: value }));
    refused(() => resolveMirrorSettings({ config: join(dir, `bad${at}.yaml`), leg: [] }), `${key} in bad${at}.yaml`, shown, `${key}: ${JSON.stringify(value)}`);
  }
});

test('legs: NAME=URI and { name, uri } errors, a name given twice, an unknown key', () => {
  refused(() => resolveMirrorSettings({ leg: ['x.y=/tmp/a.img'] }), '--leg', '"x.y=/tmp/a.img"', 'bad name');
  refused(() => resolveMirrorSettings({ leg: ['b='] }), '--leg', '"b="', 'no URI');
  assert.throws(() => resolveMirrorSettings({ leg: ['x=/tmp/a.img', 'x=/tmp/b.img'] }), /^EnbdError: --leg must give each leg name once, got x twice$/);
  writeFileSync(join(dir, 'twice.yaml'), JSON.stringify({ legs: ['x=/tmp/a.img', { name: 'x', uri: '/tmp/b.img' }] }));
  assert.throws(() => resolveMirrorSettings({ config: join(dir, 'twice.yaml'), leg: [] }), /^EnbdError: legs in twice\.yaml must give each leg name once, got x twice$/);
  writeFileSync(join(dir, 'legs.yaml'), JSON.stringify({ legs: [{ name: 'a b', uri: '/tmp/a.img' }] }));
  refused(() => resolveMirrorSettings({ config: join(dir, 'legs.yaml'), leg: [] }), 'the leg name in legs in legs.yaml', '"a b"', 'mapping name');
  writeFileSync(join(dir, 'legs.yaml'), JSON.stringify({ legs: '/tmp/a.img' }));
  refused(() => resolveMirrorSettings({ config: join(dir, 'legs.yaml'), leg: [] }), 'legs in legs.yaml', '/tmp/a.img', 'not a list');
  writeFileSync(join(dir, 'legs.yaml'), JSON.stringify({ legs: ['/tmp/a.img'], ringSlots: 3 }));
  refused(() => resolveMirrorSettings({ config: join(dir, 'legs.yaml'), leg: [], ringSlots: '5' }), '--ring-slots', '5', 'the flag wins and is named');
  writeFileSync(join(dir, 'legs.yaml'), JSON.stringify({ legs: ['/tmp/a.img'], bogusKey: 1 }));
  assert.throws(() => resolveMirrorSettings({ config: join(dir, 'legs.yaml'), leg: [] }), /^EnbdError: bogusKey in legs\.yaml is not a setting \(settings: legs, /);
  const named = resolveMirrorSettings({ leg: ['fast=nbd+unix:///?socket=/run/a.sock', 'nbd+unix:///x?socket=/run/b=c.sock'], metadata: 'none' });
  assert.deepEqual([named.legs, named.legNames], [['nbd+unix:///?socket=/run/a.sock', 'nbd+unix:///x?socket=/run/b=c.sock'], ['fast', null]]);
});

test('--write-mostly: a leg name (given or automatic), an index, a URI, or write-mostly=1 in the URI', () => {
  const legs = ['fast=/tmp/a.img', 'slow=/tmp/b.img', '/tmp/c.img', 'file:///tmp/d.img?write-mostly=1'];
  assert.deepEqual(resolveMirrorSettings({ leg: legs, writeMostly: ['slow'], metadata: 'none' }).writeMostly, [1, 3]);
  assert.deepEqual(resolveMirrorSettings({ leg: legs, writeMostly: ['a', '0', '/tmp/c.img'], metadata: 'none' }).writeMostly, [0, 2, 3]);
  writeFileSync(join(dir, 'wm.yaml'), JSON.stringify({ legs, writeMostly: ['slow', 2] }));
  assert.deepEqual(resolveMirrorSettings({ config: join(dir, 'wm.yaml'), leg: [], metadata: 'none' }).writeMostly, [1, 2, 3]);
  refused(() => resolveMirrorSettings({ leg: legs, writeMostly: ['nope'] }), '--write-mostly', 'nope', 'unknown name');
  assert.throws(() => resolveMirrorSettings({ leg: legs, writeMostly: ['9'] }), /^EnbdError: --write-mostly must be a leg name \(fast, slow, a, b\), an index from 0 to 3 or a leg's URI, got 9$/);
  writeFileSync(join(dir, 'wm.yaml'), JSON.stringify({ legs, writeMostly: ['nope'] }));
  refused(() => resolveMirrorSettings({ config: join(dir, 'wm.yaml'), leg: [] }), 'writeMostly in wm.yaml', 'nope', 'unknown name in the file');
  refused(() => resolveMirrorSettings({ leg: ['nbd+unix:///?socket=/run/a.sock&write-mostly=yes'] }), '--leg', 'nbd+unix:///?socket=/run/a.sock&write-mostly=yes', 'bad URI parameter');
  assert.deepEqual(resolveMirrorSettings({ leg: ['nbd+unix:///?socket=/run/a.sock&write-mostly=0', '/tmp/b.img'], metadata: 'none' }).writeMostly, []);
});
