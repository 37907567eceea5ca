/**
 * On-leg layout arithmetic (src/meta/layout.ts): the default bitmap chunk (mdadm's rule plus the
 * leg/1024 cap) and the table of the header (1 GiB, 1 TiB, 16 TiB), the layout invariants for
 * random leg sizes and chunks, and the refusals (bad chunk, leg too small).
 * Threads: main only.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { propertyRuns } from '../../helpers/runs.js';
import { EnbdError } from '../../../src/core/errors.js';
import { bitmapPageOfChunk, computeLayout, defaultBitmapChunkBytes, superblockOffsets } from '../../../src/meta/layout.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const TiB = 1024 * GiB;
const kRuns = propertyRuns(500);

function isMetaError(error: unknown): boolean {
  return error instanceof EnbdError && error.code === 'ENBD_ERR_META';
}

test('default chunk: the documented table for 1 GiB, 1 TiB and 16 TiB', () => {
  const rows = [
    { legSizeBytes: GiB, chunk: MiB, chunks: 1023, memory: 128, onLeg: 4 * KiB, metadata: 12 * KiB, lost: MiB },
    { legSizeBytes: TiB, chunk: 64 * MiB, chunks: 16383, memory: 2 * KiB, onLeg: 4 * KiB, metadata: 12 * KiB, lost: 64 * MiB },
    { legSizeBytes: 16 * TiB, chunk: 64 * MiB, chunks: 262143, memory: 32 * KiB, onLeg: 32 * KiB, metadata: 40 * KiB, lost: 64 * MiB },
  ];
  for (const row of rows) {
    const chunk = defaultBitmapChunkBytes(row.legSizeBytes);
    assert.equal(chunk, row.chunk, `chunk for ${row.legSizeBytes}`);
    const layout = computeLayout(row.legSizeBytes, chunk);
    assert.equal(layout.chunkCount, row.chunks);
    assert.equal(layout.bitmapBytes, row.memory);
    assert.equal(layout.bitmapAreaBytes, row.onLeg);
    assert.equal(layout.metadataBytes, row.metadata);
    assert.equal(row.legSizeBytes - layout.dataSizeBytes, row.lost);
  }
});

test('default chunk: mdadm growth above 64 MiB for huge legs, 4 KiB floor for tiny ones', () => {
  // 64 TiB at 64 MiB would need 1 Mi bits > 128 KiB - 256 B: mdadm doubles to 128 MiB.
  assert.equal(defaultBitmapChunkBytes(64 * TiB), 128 * MiB);
  assert.equal(defaultBitmapChunkBytes(4 * MiB), 4 * KiB);
  assert.equal(defaultBitmapChunkBytes(1 * MiB), 4 * KiB);
  assert.equal(defaultBitmapChunkBytes(64 * GiB), 64 * MiB);
  assert.equal(defaultBitmapChunkBytes(32 * GiB), 32 * MiB);
});

test('superblock copies: the last two 4 KiB blocks of the 4K-rounded leg', () => {
  assert.deepEqual(superblockOffsets(GiB), [GiB - 8 * KiB, GiB - 4 * KiB]);
  assert.deepEqual(superblockOffsets(GiB + 123), [GiB - 8 * KiB, GiB - 4 * KiB]);
  assert.throws(() => superblockOffsets(8 * KiB - 1), isMetaError);
});

test('layout invariants hold for random leg sizes and chunks', () => {
  fc.assert(
    fc.property(fc.integer({ min: 16 * KiB, max: 2 ** 50 }), fc.integer({ min: 12, max: 40 }), (legSizeBytes, chunkShift) => {
      const chunk = 2 ** chunkShift;
      let layout;
      try {
        layout = computeLayout(legSizeBytes, chunk);
      } catch (error) {
        assert.ok(isMetaError(error), String(error));
        // Refused only when metadata plus one chunk does not fit, or the bitmap would pass 16 MiB.
        const tooSmall = legSizeBytes < chunk + 20 * KiB + legSizeBytes / chunk / 8 + 1;
        const bitmapTooBig = legSizeBytes / chunk / 8 > 16 * MiB - 8 * KiB;
        assert.ok(tooSmall || bitmapTooBig, `refused ${legSizeBytes}/${chunk}: ${String(error)}`);
        return;
      }
      assert.equal(layout.dataSizeBytes % chunk, 0);
      assert.ok(layout.dataSizeBytes > 0);
      assert.ok(layout.dataSizeBytes <= layout.bitmapOffsetBytes);
      assert.ok(layout.bitmapOffsetBytes - layout.dataSizeBytes < chunk, 'the gap is less than a chunk');
      assert.equal(layout.bitmapOffsetBytes % 4096, 0);
      assert.equal(layout.bitmapOffsetBytes + layout.bitmapAreaBytes, layout.superblockOffsets[0]);
      assert.equal(layout.superblockOffsets[1], layout.superblockOffsets[0] + 4096);
      assert.ok(layout.superblockOffsets[1] + 4096 <= legSizeBytes);
      assert.ok(legSizeBytes - (layout.superblockOffsets[1] + 4096) < 4096, 'only the sub-4K tail is unused');
      assert.ok(layout.bitmapAreaBytes * 8 >= layout.chunkCount);
      assert.equal(layout.bitmapBytes, Math.ceil(layout.chunkCount / 8));
      assert.ok(layout.bitmapAreaBytes - layout.bitmapBytes < 4096 + layout.bitmapAreaBytes / chunk / 8 + 2, 'bitmap area not oversized');
    }),
    { numRuns: kRuns },
  );
});

test('default chunk layouts lose at most 1/1024 of a leg (or one 4 KiB chunk) to rounding', () => {
  fc.assert(
    fc.property(fc.integer({ min: 64 * KiB, max: 2 ** 46 }), (legSizeBytes) => {
      const chunk = defaultBitmapChunkBytes(legSizeBytes);
      const layout = computeLayout(legSizeBytes, chunk);
      assert.ok(layout.bitmapBytes <= 128 * KiB, 'bitmap within 128 KiB');
      const lost = legSizeBytes - layout.dataSizeBytes;
      assert.ok(lost <= Math.max(legSizeBytes / 1024, 4 * KiB) + layout.metadataBytes + 4096, `lost ${lost} of ${legSizeBytes}`);
    }),
    { numRuns: kRuns },
  );
});

test('refusals: chunk not a power of two, below 4 KiB, above 1 TiB; leg too small', () => {
  for (const chunk of [0, 1000, 2048, 12288, 2 ** 41]) assert.throws(() => computeLayout(GiB, chunk), isMetaError, `chunk ${chunk}`);
  assert.throws(() => computeLayout(12 * KiB, 4096), isMetaError, 'no room for one chunk of data');
  assert.throws(() => computeLayout(64 * MiB, 64 * MiB), isMetaError, 'a leg of exactly one chunk');
  assert.equal(computeLayout(16 * KiB, 4096).dataSizeBytes, 4096);
  // 4 KiB chunks on 1 TiB would need a 32 MiB bitmap: refused, naming a chunk that works.
  assert.throws(() => computeLayout(TiB, 4096), (error: unknown) => isMetaError(error) && /at least 8192/.test((error as Error).message));
  assert.equal(computeLayout(TiB, 8192).bitmapAreaBytes, 16 * MiB);
});

test('bitmap page of a chunk: 32768 chunks per 4 KiB page', () => {
  assert.equal(bitmapPageOfChunk(0), 0);
  assert.equal(bitmapPageOfChunk(32767), 0);
  assert.equal(bitmapPageOfChunk(32768), 1);
});
