/**
 * The ring's shadow descriptors and shadow arena (write-behind storage, src/ring/layout.ts and
 * request-ring.ts): a shadow takes whole 4 KiB granules of the arena and one descriptor above
 * the slot descriptors, never a ring slot. Cases: a full arena refuses, shadows freed out of
 * order leave reusable holes, a shadow bigger than a granule takes a contiguous run, clients
 * get every ring slot while the arena is full, descriptors run out before granules, an attached
 * (actor) view addresses the same bytes, and the layout refuses bad shadow options.
 *
 * Threads: test main thread.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RequestRing } from '../../../src/ring/request-ring.js';
import { computeRingLayout, kShadowGranuleBytes } from '../../../src/ring/layout.js';
import * as p from '../../../src/nbd/protocol.js';

const kGranule = kShadowGranuleBytes;

function ring(shadowSlots: number, granules: number): RequestRing {
  return RequestRing.create({ slotCount: 8, slotBytes: 64 * 1024, shadowSlots, shadowArenaBytes: granules * kGranule });
}

/** [start, end) byte ranges of the live shadows must not overlap and must lie in the arena. */
function assertDisjointInArena(r: RequestRing, shadows: ReadonlyArray<readonly [number, number]>): void {
  const arenaStart = r.layout.shadowArenaOffset;
  const arenaEnd = r.layout.dataBytes;
  const ranges = shadows.map(([slot, length]) => [r.dataOffset(slot), r.dataOffset(slot) + length] as const).sort((a, b) => a[0] - b[0]);
  for (const [index, [start, end]] of ranges.entries()) {
    assert.ok(start >= arenaStart && end <= arenaEnd, `shadow data [${start}, ${end}) inside the arena [${arenaStart}, ${arenaEnd})`);
    const next = ranges[index + 1];
    if (next !== undefined) assert.ok(end <= next[0], `shadow data [${start}, ${end}) and [${next[0]}, ${next[1]}) do not overlap`);
  }
}

test('a 4 KiB shadow takes one granule and one descriptor above the slots; a full arena refuses', () => {
  const r = ring(16, 4);
  assert.equal(r.descriptorCount, 24);
  const shadows: number[] = [];
  for (let index = 0; index < 4; index += 1) {
    const shadow = r.allocateShadow(4096);
    assert.ok(shadow >= r.slotCount && shadow < r.descriptorCount, `shadow ${shadow} is a shadow descriptor`);
    assert.ok(r.isShadow(shadow));
    shadows.push(shadow);
  }
  assert.equal(r.freeGranules, 0);
  assert.equal(r.allocateShadow(1), -1, 'no granule left');
  assert.equal(r.shadowsInUse, 4);
  assert.equal(r.freeCount, r.slotCount, 'no ring slot taken');
  assertDisjointInArena(r, shadows.map((slot) => [slot, 4096] as const));
  for (const shadow of shadows) r.free(shadow);
  assert.equal(r.freeGranules, 4);
  assert.equal(r.shadowsInUse, 0);
});

test('shadows freed out of order leave holes that are reused; a shadow bigger than a granule takes a contiguous run', () => {
  const r = ring(16, 8);
  const a = r.allocateShadow(4096);
  const b = r.allocateShadow(3 * 4096); // 3 granules
  const c = r.allocateShadow(4096);
  const d = r.allocateShadow(2 * 4096 + 1); // 3 granules (rounded up)
  assert.ok(a >= 0 && b >= 0 && c >= 0 && d >= 0);
  assert.equal(r.freeGranules, 0);
  assertDisjointInArena(r, [[a, 4096], [b, 3 * 4096], [c, 4096], [d, 2 * 4096 + 1]]);
  r.free(c); // free the middle ones first
  r.free(a);
  assert.equal(r.freeGranules, 2);
  assert.equal(r.allocateShadow(2 * 4096), -1, 'two free granules, but not contiguous: refused');
  const e = r.allocateShadow(4096);
  const f = r.allocateShadow(4096);
  assert.ok(e >= 0 && f >= 0, 'each hole is reused');
  assertDisjointInArena(r, [[b, 3 * 4096], [d, 2 * 4096 + 1], [e, 4096], [f, 4096]]);
  r.free(b);
  const g = r.allocateShadow(3 * 4096);
  assert.ok(g >= 0, 'the freed 3-granule run fits a 3-granule shadow');
  assertDisjointInArena(r, [[d, 2 * 4096 + 1], [e, 4096], [f, 4096], [g, 3 * 4096]]);
  for (const shadow of [d, e, f, g]) r.free(shadow);
  assert.equal(r.freeGranules, 8);
  const whole = r.allocateShadow(8 * 4096);
  assert.ok(whole >= 0, 'after every free the whole arena is one run again');
  assert.equal(r.dataOffset(whole), r.layout.shadowArenaOffset);
});

test('a run spanning several bit-map words is found (more than 32 granules)', () => {
  const r = ring(8, 100);
  const small = r.allocateShadow(4096);
  const big = r.allocateShadow(70 * 4096);
  assert.ok(small >= 0 && big >= 0);
  assertDisjointInArena(r, [[small, 4096], [big, 70 * 4096]]);
  assert.equal(r.freeGranules, 29);
  assert.equal(r.allocateShadow(30 * 4096), -1);
  assert.ok(r.allocateShadow(29 * 4096) >= 0);
});

test('descriptors run out before granules; clients get every ring slot while the arena is full', () => {
  const r = ring(3, 64);
  const shadows = [r.allocateShadow(4096), r.allocateShadow(4096), r.allocateShadow(4096)];
  assert.ok(shadows.every((slot) => slot >= 0));
  assert.equal(r.allocateShadow(4096), -1, 'no descriptor left');
  const clients: number[] = [];
  for (let index = 0; index < r.slotCount; index += 1) {
    const slot = r.allocate(1);
    assert.ok(slot >= 0 && slot < r.slotCount, 'a client slot');
    clients.push(slot);
  }
  assert.equal(r.allocate(1), -1);
  for (const slot of clients) r.free(slot);
  assert.equal(r.allocate(r.slotCount), 0, 'the whole ring is one run for a client');
  // Freeing a shadow gives a descriptor back, with a new generation for the next one.
  const generation = r.generation(shadows[1] as number);
  r.free(shadows[1] as number);
  const again = r.allocateShadow(4096);
  assert.equal(again, shadows[1]);
  assert.notEqual(r.generation(again), generation);
});

test('a shadow is a one-slot request: described, its bytes seen by an attached (actor) view', () => {
  const r = ring(4, 4);
  const shadow = r.allocateShadow(8192);
  r.setRequest(shadow, p.kCmdWrite, 0, 1 << 20, 8192, 1, 0b10);
  r.dataView(shadow, 8192).fill(0x5a);
  const actor = RequestRing.attach(r.buffers);
  assert.equal(actor.descriptorCount, r.descriptorCount);
  assert.equal(actor.lengthBytes(shadow), 8192);
  assert.equal(actor.offsetBytes(shadow), 1 << 20);
  assert.equal(actor.dataOffset(shadow), r.dataOffset(shadow));
  assert.ok(actor.dataView(shadow, 8192).every((byte) => byte === 0x5a));
  // Client slot data is untouched by shadow writes.
  assert.ok(r.dataView(0, r.slotBytes * r.slotCount).every((byte) => byte === 0));
  r.markDispatched(shadow);
  r.free(shadow);
  assert.equal(r.shadowsInUse, 0);
});

test('the layout refuses bad shadow options and counts the arena in the data SAB', () => {
  assert.throws(() => computeRingLayout({ shadowSlots: 4, shadowArenaBytes: 1000 }), /shadowArenaBytes/);
  assert.throws(() => computeRingLayout({ shadowSlots: 4 }), /shadowArenaBytes/);
  assert.throws(() => computeRingLayout({ shadowArenaBytes: 4096 }), /shadowArenaBytes/);
  assert.throws(() => computeRingLayout({ shadowSlots: -1, shadowArenaBytes: 4096 }), /shadowSlots/);
  const layout = computeRingLayout({ slotCount: 8, slotBytes: 4096, shadowSlots: 2, shadowArenaBytes: 8192 });
  assert.equal(layout.dataBytes, 8 * 4096 + 8192);
  assert.equal(layout.maxRequestBytes, 8 * 4096, 'a client request still fits the slots only');
  assert.equal(layout.descriptorCount, 10);
  const plain = computeRingLayout({ slotCount: 8, slotBytes: 4096 });
  assert.equal(plain.descriptorCount, 8);
  assert.equal(plain.dataBytes, 8 * 4096);
});
