/**
 * HeaderArena (client send path): model-based test with fast-check. Headers handed to the sink
 * are never overwritten before the sink releases them, the byte stream keeps submit order
 * (including headers that overflowed into their own buffers), and the arena wraps and refills.
 * Threads: main only.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { propertyRuns } from '../../helpers/runs.js';
import { HeaderArena } from '../../../src/nbd/client/client-arena.js';
import { kRequestHeaderBytes } from '../../../src/nbd/protocol.js';

interface Written {
  view: Buffer | null;
  snapshot: Buffer;
}

function simulate(capacityBytes: number, operations: number[]): { wraps: number; overflows: number } {
  const written: Written[] = [];
  const unreleased: Written[] = [];
  const arena: HeaderArena = new HeaderArena(capacityBytes, {
    writeRun: (view) => {
      const entry = { view, snapshot: Buffer.from(view) };
      written.push(entry);
      unreleased.push(entry);
    },
  });
  const stream: Buffer[] = [];
  let stamp = 0;
  let overflows = 0;
  let wraps = 0;
  let lastAt = -1;
  for (const operation of operations) {
    if (operation < 5) {
      const header = Buffer.alloc(kRequestHeaderBytes, stamp & 0xff);
      header.writeUInt32BE(stamp, 0);
      stamp += 1;
      stream.push(header);
      const at = arena.reserve();
      if (at < 0) {
        overflows += 1;
        arena.flushRun();
        written.push({ view: null, snapshot: header });
      } else {
        if (at < lastAt) wraps += 1;
        lastAt = at;
        header.copy(arena.buffer, at);
      }
    } else if (operation < 7) {
      arena.flushRun();
    } else {
      // 7, 9: release the oldest run; 8: release until at most one run is in flight.
      const keep = operation === 8 ? 1 : Math.max(0, unreleased.length - 1);
      while (unreleased.length > keep) {
        const oldest = unreleased.shift() as Written;
        assert.ok((oldest.view as Buffer).equals(oldest.snapshot), 'a run was overwritten before its release');
        arena.releaseRun();
      }
    }
    for (const entry of unreleased) assert.ok((entry.view as Buffer).equals(entry.snapshot), 'in-flight run intact');
    assert.equal(arena.pendingRuns, unreleased.length);
  }
  arena.flushRun();
  assert.deepEqual(Buffer.concat(written.map((entry) => entry.snapshot)), Buffer.concat(stream), 'stream order kept');
  return { wraps, overflows };
}

test('property: runs in flight are never overwritten and order is kept', () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 2 * kRequestHeaderBytes, max: 12 * kRequestHeaderBytes + 27 }),
      fc.array(fc.integer({ min: 0, max: 9 }), { maxLength: 400 }),
      (capacityBytes, operations) => {
        simulate(capacityBytes, operations);
      },
    ),
    { numRuns: propertyRuns(1000) },
  );
});

test('a steady producer/consumer wraps the arena many times without overflow', () => {
  // Per round: 3 headers, flush, release all but the newest run (the arena never drains).
  const operations: number[] = [];
  for (let round = 0; round < 200; round++) operations.push(0, 0, 0, 5, 8);
  const { wraps, overflows } = simulate(10 * kRequestHeaderBytes + 5, operations);
  assert.ok(wraps > 10, `wrapped ${wraps} times`);
  assert.equal(overflows, 0);
});

test('a stalled sink fills the arena; reserve reports full instead of overwriting', () => {
  const { overflows } = simulate(4 * kRequestHeaderBytes, [0, 5, 0, 5, 0, 5, 0, 5, 0, 0, 0]);
  assert.equal(overflows, 3);
});

test('reset forgets runs; late releases are ignored', () => {
  const runs: Buffer[] = [];
  const arena = new HeaderArena(4 * kRequestHeaderBytes, { writeRun: (view) => runs.push(view) });
  assert.equal(arena.reserve(), 0);
  arena.flushRun();
  assert.equal(arena.pendingRuns, 1);
  arena.reset();
  arena.releaseRun();
  assert.equal(arena.pendingRuns, 0);
  assert.equal(arena.reserve(), 0);
});
