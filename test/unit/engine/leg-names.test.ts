/**
 * Leg names (src/engine/leg-names.ts): NAME=URI splitting (URIs with '=' stay whole), automatic
 * names, name checks, and reference resolution (name, index, URI).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { assignLegNames, autoLegName, legNameProblem, nextAutoLegName, resolveLegRef, splitLegSpec } from '../../../src/engine/leg-names.js';

test('splitLegSpec: NAME=URI only when the text before = has no : or /', () => {
  assert.deepEqual(splitLegSpec('b=nbd://host:10809/x', '--leg'), { name: 'b', uri: 'nbd://host:10809/x' });
  assert.deepEqual(splitLegSpec('fast_1=/dev/sdb', '--leg'), { name: 'fast_1', uri: '/dev/sdb' });
  assert.deepEqual(splitLegSpec('nbd+unix:///x?socket=/run/a.sock', '--leg'), { name: null, uri: 'nbd+unix:///x?socket=/run/a.sock' });
  assert.deepEqual(splitLegSpec('nbds://h/x?tls-certificates=/etc/pki', '--leg'), { name: null, uri: 'nbds://h/x?tls-certificates=/etc/pki' });
  assert.deepEqual(splitLegSpec('/tmp/a=b.img', '--leg'), { name: null, uri: '/tmp/a=b.img' });
  assert.deepEqual(splitLegSpec('c=nbd+unix:///?socket=/s=1', '--leg'), { name: 'c', uri: 'nbd+unix:///?socket=/s=1' });
  assert.deepEqual(splitLegSpec('disk.img', '--leg'), { name: null, uri: 'disk.img' });
  assert.deepEqual(splitLegSpec('=x', '--leg'), { name: null, uri: '=x' });
});

test('splitLegSpec refuses a bad name or an empty URI, naming the flag', () => {
  assert.throws(() => splitLegSpec('a b=x.img', '--leg'), /^EnbdError: --leg must be \[NAME=\]URI with a NAME of 1 to 32 letters, digits, _ or - \(not all digits\) and a URI after "=", got "a b=x.img"$/);
  assert.throws(() => splitLegSpec('7=x.img', '--leg'), /^EnbdError: --leg must be .*, got "7=x.img"$/);
  assert.throws(() => splitLegSpec('b=', 'legs in m.yaml'), /^EnbdError: legs in m.yaml must be .*, got "b="$/);
});

test('automatic names: a..z, then aa, ab, ...; first free, skipping retired names', () => {
  assert.deepEqual([0, 1, 25, 26, 27, 51, 52].map(autoLegName), ['a', 'b', 'z', 'aa', 'ab', 'az', 'ba']);
  assert.equal(nextAutoLegName(new Set(['a', 'b']), new Set()), 'c');
  assert.equal(nextAutoLegName(new Set(['b']), new Set(['a', 'b'])), 'c', 'a removed leg\'s name is not given automatically');
  assert.deepEqual(assignLegNames([null, 'a', null, 'fast']), ['b', 'a', 'c', 'fast']);
  assert.throws(() => assignLegNames(['x', null, 'x']), /--leg must give each leg name once, got x twice/);
});

test('legNameProblem', () => {
  assert.equal(legNameProblem('a'), null);
  assert.equal(legNameProblem('Leg-2_b'), null);
  assert.notEqual(legNameProblem(''), null);
  assert.notEqual(legNameProblem('x'.repeat(33)), null);
  assert.notEqual(legNameProblem('a.b'), null);
  assert.notEqual(legNameProblem('12'), null);
});

test('resolveLegRef: a live name, then an index, then a live URI', () => {
  const legs = [
    { index: 0, name: 'a', uri: '/tmp/0.img', live: true },
    { index: 1, name: 'b', uri: 'nbd://h/1', live: false },
    { index: 2, name: 'c', uri: 'nbd://h/2', live: true },
  ];
  assert.equal(resolveLegRef('c', legs), 2);
  assert.equal(resolveLegRef('0', legs), 0);
  assert.equal(resolveLegRef(2, legs), 2);
  assert.equal(resolveLegRef('nbd://h/2', legs), 2);
  assert.throws(() => resolveLegRef('b', legs), /^EnbdError: no leg "b" \(legs: a, c; a name, an index or a leg's URI\)$/);
  assert.throws(() => resolveLegRef('nbd://h/1', legs), /no leg "nbd:\/\/h\/1"/);
});
