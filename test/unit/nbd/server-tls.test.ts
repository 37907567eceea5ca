/**
 * TLS settings: loadServerTls's configuration errors, psktool file parsing, and the mirror's
 * flags and config-file keys (tls, tlsCertificates, tlsVerifyPeer, tlsPsk).
 * Threads: test process main thread.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { scratch, type Scratch } from '../../helpers/tools.js';
import { loadServerTls, parseTlsMode } from '../../../src/nbd/server/server-tls.js';
import { parsePskFile } from '../../../src/nbd/tls-psk.js';
import { resolveMirrorSettings } from '../../../src/cli/mirror.js';

let dir: Scratch;
before(() => {
  dir = scratch('enbd-tls-unit-');
});
after(() => dir.cleanup());

test('parseTlsMode and loadServerTls refuse inconsistent settings', () => {
  assert.equal(parseTlsMode('--tls', 'require'), 'require');
  assert.throws(() => parseTlsMode('--tls', 'maybe'), /off, on or require/);
  assert.equal(loadServerTls({ mode: 'off' }), null);
  assert.throws(() => loadServerTls({ mode: 'off', certificatesDir: '/x' }), /need --tls on or --tls require/);
  assert.throws(() => loadServerTls({ mode: 'require' }), /needs --tls-certificates DIR .* or --tls-psk FILE/);
  assert.throws(() => loadServerTls({ mode: 'on', certificatesDir: dir.path('none') }), /server-cert\.pem/);
  const keys = dir.path('k.psk');
  writeFileSync(keys, `alice:${'ab'.repeat(32)}\n`);
  assert.throws(() => loadServerTls({ mode: 'require', pskFile: keys, certificatesDir: '/x' }), /excludes/);
  const loaded = loadServerTls({ mode: 'require', pskFile: keys });
  assert.equal(loaded?.pskKeys?.get('alice')?.length, 32);
});

test('parsePskFile reads psktool lines and names the bad line', () => {
  const keys = parsePskFile(`# comment\nalice:${'01'.repeat(16)}\n\nbob:${'ff'.repeat(32)}\n`, 'f');
  assert.deepEqual([...keys.keys()], ['alice', 'bob']);
  assert.equal(keys.get('bob')?.toString('hex'), 'ff'.repeat(32));
  assert.throws(() => parsePskFile('alice:xyz\n', 'f'), /f:1: expected username:hexkey/);
  assert.throws(() => parsePskFile(':abcd\n', 'f'), /f:1/);
  assert.throws(() => parsePskFile('\n', 'f'), /no keys/);
});

test('mirror settings: TLS flags, and config-file keys under them', () => {
  const config = dir.path('m.yaml');
  writeFileSync(config, 'legs: [a.img, b.img]\ntls: on\ntlsCertificates: /etc/pki\ntlsVerifyPeer: true\n');
  const fromConfig = resolveMirrorSettings({ config });
  assert.deepEqual(fromConfig.tls, { mode: 'on', certificatesDir: '/etc/pki', verifyPeer: true });
  const flagsWin = resolveMirrorSettings({ config, tls: 'require', tlsVerifyPeer: false });
  assert.equal(flagsWin.tls.mode, 'require');
  writeFileSync(config, 'legs: [a.img, b.img]\ntls: require\ntlsPsk: /etc/keys.psk\n');
  assert.deepEqual(resolveMirrorSettings({ config }).tls, { mode: 'require', pskFile: '/etc/keys.psk', verifyPeer: false });
  assert.deepEqual(resolveMirrorSettings({ leg: ['a.img', 'b.img'] }).tls, { mode: 'off', verifyPeer: false });
  assert.throws(() => resolveMirrorSettings({ leg: ['a.img'], tls: 'sometimes' }), /off, on or require/);
});
