/**
 * kVersion (src/core/version.ts: `enbd --version`, enbd_build_info) equals package.json's version.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { kVersion } from '../../../src/core/version.js';

test('kVersion is package.json version', () => {
  const pkg = JSON.parse(readFileSync(new URL('../../../../package.json', import.meta.url), 'utf8')) as { version: string };
  assert.equal(kVersion, pkg.version);
});
