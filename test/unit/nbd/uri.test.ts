/**
 * NBD URI parsing and formatting: accepted forms, every rejection names the URI and the
 * problem with code ENBD_ERR_URI, and parse(format(a)) round-trips (fast-check).
 * Threads: main only.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { propertyRuns } from '../../helpers/runs.js';
import { describeNbdAddress, formatNbdUri, parseNbdUri, type NbdAddress } from '../../../src/nbd/uri.js';
import { EnbdError } from '../../../src/core/errors.js';

const accepted: [string, NbdAddress][] = [
  ['nbd://localhost/', { kind: 'tcp', host: 'localhost', port: 10809, exportName: '' }],
  ['nbd://localhost', { kind: 'tcp', host: 'localhost', port: 10809, exportName: '' }],
  ['nbd://127.0.0.1:1234/disk', { kind: 'tcp', host: '127.0.0.1', port: 1234, exportName: 'disk' }],
  ['nbd://[::1]:10810/a/b', { kind: 'tcp', host: '::1', port: 10810, exportName: 'a/b' }],
  ['nbd://[::1]/', { kind: 'tcp', host: '::1', port: 10809, exportName: '' }],
  ['NBD://host:1/x', { kind: 'tcp', host: 'host', port: 1, exportName: 'x' }],
  ['nbd://h:65535/with%20space%2Fslash', { kind: 'tcp', host: 'h', port: 65535, exportName: 'with space/slash' }],
  ['nbd+unix:///?socket=/tmp/s.sock', { kind: 'unix', socketPath: '/tmp/s.sock', exportName: '' }],
  ['nbd+unix:///?socket=relative.sock', { kind: 'unix', socketPath: 'relative.sock', exportName: '' }],
  ['nbd+unix:///exp?socket=/tmp/a%20b.sock', { kind: 'unix', socketPath: '/tmp/a b.sock', exportName: 'exp' }],
  ['nbd+unix:///%C3%A9t%C3%A9?socket=/s', { kind: 'unix', socketPath: '/s', exportName: 'été' }],
];

for (const [text, expected] of accepted) {
  test(`accepts ${text}`, () => {
    assert.deepEqual(parseNbdUri(text), expected);
  });
}

const rejected: [string, RegExp][] = [
  ['', /empty URI/],
  ['localhost:10809', /expected 'nbd:\/\/'/],
  ['nbds://alice@host/', /needs tls-psk-file/],
  ['nbds+unix:///?socket=/s&tls-verify-peer=yes', /true or false/],
  ['nbd+vsock://1:2/', /vsock/],
  ['http://host/', /unknown scheme 'http'/],
  ['nbd+unix:///export', /requires \?socket=PATH/],
  ['nbd+unix:///export?socket=', /socket path is empty/],
  ['nbd+unix:///?socket=/a&socket=/b', /more than once/],
  ['nbd+unix:///?sock=/a', /unsupported query parameter 'sock'/],
  ['nbd+unix://host/?socket=/a', /takes no host/],
  ['nbd://host:0/', /port 0 is out of range/],
  ['nbd://host:65536/', /port 65536 is out of range/],
  ['nbd://host:12a/', /bad port '12a'/],
  ['nbd://host:/', /bad port ''/],
  ['nbd://host:123456/', /bad port/],
  ['nbd:///export', /missing host/],
  ['nbd://:10809/', /missing host/],
  ['nbd://::1/', /brackets/],
  ['nbd://[::1/', /closing/],
  ['nbd://[nothost]/', /not an IPv6 address/],
  ['nbd://[::1]x/', /unexpected 'x'/],
  ['nbd://user@host/', /user names/],
  ['nbd://host/?tls=on', /query parameters are not supported/],
  ['nbd://host/x#frag', /fragments/],
  ['nbd://host/%zz', /malformed percent-encoding/],
  ['nbd://host/a%00b', /NUL/],
  [`nbd://host/${'x'.repeat(4097)}`, /longer than 4096 bytes/],
  ['nbd://ho st/', /invalid host/],
];

for (const [text, message] of rejected) {
  test(`rejects ${JSON.stringify(text.slice(0, 40))} with ENBD_ERR_URI`, () => {
    assert.throws(
      () => parseNbdUri(text),
      (error: unknown) => {
        assert.ok(error instanceof EnbdError);
        assert.equal(error.code, 'ENBD_ERR_URI');
        assert.match(error.message, message);
        if (text.length > 0) assert.ok(error.message.includes(text), `message names the URI: ${error.message}`);
        return true;
      },
    );
  });
}

test('formats both kinds', () => {
  assert.equal(formatNbdUri({ kind: 'tcp', host: '::1', port: 10809, exportName: 'a b' }), 'nbd://[::1]:10809/a%20b');
  assert.equal(formatNbdUri({ kind: 'unix', socketPath: '/tmp/x&y.sock', exportName: 'd/e' }), 'nbd+unix:///d/e?socket=/tmp/x%26y.sock');
  assert.equal(describeNbdAddress({ kind: 'tcp', host: '::1', port: 5, exportName: '' }), '[::1]:5');
  assert.equal(describeNbdAddress({ kind: 'unix', socketPath: '/s', exportName: '' }), 'unix:/s');
});

test('formatting a name that is not valid UTF-8 throws ENBD_ERR_URI', () => {
  assert.throws(
    () => formatNbdUri({ kind: 'tcp', host: 'h', port: 1, exportName: '\uD800' }),
    (error: unknown) => error instanceof EnbdError && error.code === 'ENBD_ERR_URI',
  );
});

const hostArbitrary = fc.oneof(
  fc.stringMatching(/^[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?$/),
  fc.ipV4(),
  fc.ipV6(),
);
const nameArbitrary = fc
  .string({ unit: 'grapheme', maxLength: 40 })
  .filter((name) => !name.includes('\0'));
const addressArbitrary: fc.Arbitrary<NbdAddress> = fc.oneof(
  fc.record({
    kind: fc.constant('tcp' as const),
    host: hostArbitrary,
    port: fc.integer({ min: 1, max: 65535 }),
    exportName: nameArbitrary,
  }),
  fc.record({
    kind: fc.constant('unix' as const),
    socketPath: nameArbitrary.filter((path) => path.length > 0),
    exportName: nameArbitrary,
  }),
);

test('property: parseNbdUri(formatNbdUri(a)) equals a', () => {
  fc.assert(
    fc.property(addressArbitrary, (address) => {
      // fc.record builds null-prototype objects; compare as plain ones.
      assert.deepEqual(parseNbdUri(formatNbdUri(address)), { ...address });
    }),
    { numRuns: propertyRuns(2000) },
  );
});

test('property: parsing arbitrary text either succeeds or throws ENBD_ERR_URI', () => {
  fc.assert(
    fc.property(fc.oneof(fc.string(), fc.constantFrom('nbd://', 'nbd+unix://').chain((prefix) => fc.string().map((rest) => prefix + rest))), (text) => {
      try {
        const address = parseNbdUri(text);
        assert.deepEqual(parseNbdUri(formatNbdUri(address)), address);
      } catch (error) {
        assert.ok(error instanceof EnbdError, String(error));
        assert.equal(error.code, 'ENBD_ERR_URI');
      }
    }),
    { numRuns: propertyRuns(2000) },
  );
});
