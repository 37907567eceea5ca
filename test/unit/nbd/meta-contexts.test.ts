/**
 * Meta context matching and map extents (src/nbd/server/meta-contexts.ts): LIST matches no
 * query, namespace and empty-leaf prefixes and exact names; SET only exact names, deduplicated;
 * extents alternate dirty/clean at chunk boundaries, merge adjacent equal chunks, clip to the
 * asked range, cover it without gaps, and respect extentsMax; a vanished context reads dirty.
 * Threads: main only.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { propertyRuns } from '../../helpers/runs.js';
import { DirtyMap } from '../../../src/bitmap/dirty-map.js';
import { kDirtyFlag, mapExtents, matchMetaContexts } from '../../../src/nbd/server/meta-contexts.js';

const kNames = ['qemu:dirty-bitmap:a', 'qemu:dirty-bitmap:b', 'enbd:dirty:0', 'enbd:dirty:1'];

test('LIST and SET query matching', () => {
  assert.deepEqual(matchMetaContexts(kNames, [], false), kNames);
  assert.deepEqual(matchMetaContexts(kNames, [], true), []);
  assert.deepEqual(matchMetaContexts(kNames, ['qemu:'], false), kNames.slice(0, 2));
  assert.deepEqual(matchMetaContexts(kNames, ['qemu:dirty-bitmap:'], false), kNames.slice(0, 2));
  assert.deepEqual(matchMetaContexts(kNames, ['enbd:dirty:'], false), kNames.slice(2));
  assert.deepEqual(matchMetaContexts(kNames, ['qemu:', 'enbd:'], true), [], 'SET takes no prefixes');
  assert.deepEqual(matchMetaContexts(kNames, ['enbd:dirty:1', 'qemu:dirty-bitmap:a', 'enbd:dirty:1'], true), ['enbd:dirty:1', 'qemu:dirty-bitmap:a']);
  assert.deepEqual(matchMetaContexts(kNames, ['base:allocation', 'qemu:dirty-bitmap:zz', 'other:'], false), []);
});

test('extents follow the map at chunk boundaries, merged, clipped, gap-free (property)', () => {
  fc.assert(fc.property(
    fc.array(fc.tuple(fc.nat(255), fc.integer({ min: 1, max: 8 })), { maxLength: 20 }),
    fc.nat(256 * 4096 - 1), fc.integer({ min: 1, max: 256 * 4096 }), fc.integer({ min: 1, max: 50 }),
    (marks, offset, length, extentsMax) => {
      const deviceBytes = 256 * 4096;
      const map = DirtyMap.create({ deviceBytes, chunkBytes: 4096, poolPages: 1 });
      for (const [chunk, count] of marks) map.markChunks(chunk, Math.min(count, 256 - chunk));
      const asked = Math.min(length, deviceBytes - offset);
      const extents = mapExtents(map, offset, asked, extentsMax);
      assert.ok(extents.length >= 1 && extents.length <= extentsMax);
      let at = offset;
      let previous = -1;
      for (const extent of extents) {
        assert.ok(extent.lengthBytes > 0);
        assert.notEqual(extent.flags, previous, 'adjacent extents differ (merged)');
        previous = extent.flags;
        const end = at + extent.lengthBytes;
        assert.ok(end === offset + asked || end % 4096 === 0, 'an extent ends at a chunk boundary or the range end');
        for (let byte = at; byte < end; byte += 4096) assert.equal(map.isChunkDirty(Math.floor(byte / 4096)) ? kDirtyFlag : 0, extent.flags);
        at = end;
      }
      assert.ok(at <= offset + asked);
      if (extents.length < extentsMax) assert.equal(at, offset + asked, 'the whole range is covered');
    },
  ), { numRuns: propertyRuns(300) });
  assert.deepEqual(mapExtents(null, 0, 8192, 10), [{ lengthBytes: 8192, flags: kDirtyFlag }], 'a vanished context reads dirty');
});
