/**
 * Superblock codec (src/meta/superblock.ts) and copy selection (src/meta/leg-meta.ts), with
 * fast-check: encode/decode round-trips every field; any corruption of one copy on a leg makes
 * the reader fall back to the other copy and report the damaged one; random bytes, and random
 * payloads behind a valid header and checksum, only ever raise EnbdError('ENBD_ERR_META');
 * writes alternate between the copies; a failed write rejects and is retried on the same copy.
 * Plus the CRC-32C check value.
 * Threads: main only.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { Packr } from 'msgpackr';
import { EnbdError } from '../../../src/core/errors.js';
import { crc32c } from '../../../src/meta/crc32c.js';
import { computeLayout, superblockOffsets } from '../../../src/meta/layout.js';
import { LegMeta, bitmapCount, bitmapSet, inspectCopy } from '../../../src/meta/leg-meta.js';
import {
  decodeSuperblock,
  encodeSuperblock,
  kChecksumOffset,
  kHeaderBytes,
  kGenerationsMax,
  kMembersMax,
  type MemberState,
  type Superblock,
} from '../../../src/meta/superblock.js';
import { kCmdWrite, kEIo } from '../../../src/nbd/protocol.js';
import { MemoryDevice } from '../../helpers/memory-device.js';

const kRuns = Number(process.env['ENBD_FUZZ_RUNS'] ?? 300);
const kLegBytes = 1024 * 1024;
const kLayout = computeLayout(kLegBytes, 4096);
const kStates: MemberState[] = ['in-sync', 'needs-resync', 'needs-full-sync', 'removed'];

const safeCount = fc.maxSafeInteger().map((value) => Math.abs(value));

const superblockArbitrary: fc.Arbitrary<Superblock> = fc
  .record({
    arrayUuid: fc.uuid(),
    arrayName: fc.string({ maxLength: 60 }),
    members: fc.array(
      fc.record({ legUuid: fc.uuid(), state: fc.constantFrom(...kStates), events: safeCount, recoveryOffsetBytes: safeCount }, { noNullPrototype: true }),
      { minLength: 1, maxLength: kMembersMax },
    ),
    slotSeed: fc.nat(),
    events: safeCount,
    state: fc.constantFrom('clean' as const, 'active' as const),
    owner: fc.option(fc.record({ host: fc.string({ maxLength: 64 }), pid: fc.nat(), heartbeatMs: safeCount }, { noNullPrototype: true }), { nil: null }),
    createdMs: safeCount,
    updatedMs: safeCount,
    generations: fc.array(fc.stringMatching(/^[0-9a-f]{16}$/), { maxLength: kGenerationsMax }),
  }, { noNullPrototype: true })
  .map(({ slotSeed, members, generations, ...rest }) => {
    const slotIndex = slotSeed % members.length;
    return {
      ...rest,
      ...(generations.length > 0 ? { generations } : {}),
      members,
      slotIndex,
      legUuid: (members[slotIndex] as { legUuid: string }).legUuid,
      legSizeBytes: kLayout.legSizeBytes,
      dataSizeBytes: kLayout.dataSizeBytes,
      bitmapChunkBytes: kLayout.bitmapChunkBytes,
      bitmapOffsetBytes: kLayout.bitmapOffsetBytes,
      bitmapAreaBytes: kLayout.bitmapAreaBytes,
    };
  });

function isMetaError(error: unknown): boolean {
  return error instanceof EnbdError && error.code === 'ENBD_ERR_META';
}

/** Decodes, asserting that nothing but ENBD_ERR_META can escape. */
function decodeOrMetaError(block: Uint8Array): void {
  try {
    decodeSuperblock(block);
  } catch (error) {
    assert.ok(isMetaError(error), `unexpected ${String(error)}`);
    assert.ok((error as Error).message.length > 0);
  }
}

test('crc32c check value', () => {
  assert.equal(crc32c(Buffer.from('123456789')), 0xe3069283);
  assert.equal(crc32c(new Uint8Array(0)), 0);
});

test('round trip: decode(encode(superblock)) returns every field, the copy index and sequence', () => {
  fc.assert(
    fc.property(superblockArbitrary, fc.constantFrom(0, 1), fc.integer({ min: 1, max: Number.MAX_SAFE_INTEGER }), (superblock, copyIndex, sequence) => {
      const block = encodeSuperblock(superblock, copyIndex, sequence);
      assert.equal(block.length, 4096);
      const decoded = decodeSuperblock(block);
      assert.deepEqual(decoded.superblock, superblock);
      assert.equal(decoded.copyIndex, copyIndex);
      assert.equal(decoded.sequence, sequence);
      assert.equal(decoded.formatVersion, 1);
    }),
    { numRuns: kRuns },
  );
});

test('any single changed byte of a copy is caught', () => {
  fc.assert(
    fc.property(superblockArbitrary, fc.nat({ max: 4095 }), fc.integer({ min: 1, max: 255 }), (superblock, at, xor) => {
      const block = encodeSuperblock(superblock, 0, 7);
      block[at] = (block[at] as number) ^ xor;
      assert.throws(() => decodeSuperblock(block), isMetaError);
    }),
    { numRuns: kRuns },
  );
});

test('random bytes never crash the decoder (only ENBD_ERR_META)', () => {
  fc.assert(
    fc.property(fc.uint8Array({ minLength: 0, maxLength: 5000 }), (bytes) => decodeOrMetaError(bytes)),
    { numRuns: kRuns },
  );
});

test('random payloads behind a valid header and checksum only raise ENBD_ERR_META', () => {
  const packr = new Packr({ useRecords: false, mapsAsObjects: true });
  const valid = encodeSuperblock(fc.sample(superblockArbitrary, 1)[0] as Superblock, 0, 1);
  const payloadArbitrary = fc.oneof(
    fc.uint8Array({ minLength: 1, maxLength: 4028 }),
    fc.anything({ maxDepth: 3 }).map((value) => packr.pack(value)),
    // A valid payload with one field replaced by anything.
    fc.tuple(fc.nat(), fc.anything({ maxDepth: 2 })).map(([pick, value]) => {
      const wire = packr.unpack(Buffer.from(valid.subarray(kHeaderBytes, kHeaderBytes + new DataView(valid.buffer).getUint32(36, true)))) as Record<string, unknown>;
      const keys = Object.keys(wire);
      wire[keys[pick % keys.length] as string] = value;
      return packr.pack(wire);
    }),
  );
  fc.assert(
    fc.property(payloadArbitrary, fc.integer({ min: 0, max: 5000 }), (payload, claimed) => {
      if (payload.length > kChecksumOffset - kHeaderBytes) return;
      const block = new Uint8Array(valid.subarray(0, kHeaderBytes));
      const full = new Uint8Array(4096);
      full.set(block);
      full.set(payload, kHeaderBytes);
      const view = new DataView(full.buffer);
      view.setUint32(36, claimed % 7 === 0 ? claimed : payload.length, true);
      view.setUint32(kChecksumOffset, crc32c(full, 0, kChecksumOffset), true);
      decodeOrMetaError(full);
    }),
    { numRuns: kRuns },
  );
});

async function freshLeg(superblock: Superblock): Promise<{ device: MemoryDevice; meta: LegMeta }> {
  const device = new MemoryDevice({ sizeBytes: kLegBytes });
  const meta = new LegMeta(device);
  await meta.writeFresh(superblock);
  return { device, meta };
}

test('a fresh leg has two valid copies; the newer (copy 1) is used', async () => {
  const superblock = fc.sample(superblockArbitrary, 1)[0] as Superblock;
  const { meta } = await freshLeg(superblock);
  const found = await meta.read();
  assert.deepEqual(found.copies.map((copy) => copy.status), ['valid', 'valid']);
  assert.equal(found.usedCopy, 1);
  assert.deepEqual(found.superblock, superblock);
});

test('any corruption of one copy on the leg falls back to the other and reports it', async () => {
  await fc.assert(
    fc.asyncProperty(
      superblockArbitrary,
      fc.constantFrom(0, 1),
      fc.uint8Array({ minLength: 1, maxLength: 64 }),
      fc.nat({ max: 4095 }),
      fc.boolean(),
      async (superblock, victim, garbage, at, zeroTail) => {
        const { device, meta } = await freshLeg(superblock);
        const offset = superblockOffsets(kLegBytes)[victim] as number;
        const before = device.bytes.slice(offset, offset + 4096);
        if (zeroTail) device.bytes.fill(0, offset + Math.min(at, 4095), offset + 4096); // a torn write
        else device.bytes.set(garbage.subarray(0, 4096 - at), offset + at);
        if (Buffer.from(before).equals(device.bytes.subarray(offset, offset + 4096))) return; // nothing changed
        const found = await meta.read();
        assert.equal(found.usedCopy, 1 - victim);
        assert.deepEqual(found.superblock, superblock);
        const damaged = found.copies[victim];
        assert.ok(damaged !== undefined && damaged.status !== 'valid', `copy ${victim} reported ${damaged?.status}`);
        assert.ok((damaged.reason ?? '').length > 0);
        assert.equal(found.hasMetadata, true);
      },
    ),
    { numRuns: Math.min(kRuns, 200) },
  );
});

test('writes alternate: each goes to the copy not in use, with the next sequence', async () => {
  const sampled = fc.sample(superblockArbitrary, 1)[0] as Superblock;
  // Room for six more events: the sample may sit at Number.MAX_SAFE_INTEGER, past which encode refuses.
  const superblock = { ...sampled, events: sampled.events % 1_000_000_000 };
  const { meta } = await freshLeg(superblock);
  await meta.read();
  for (let round = 0; round < 6; round += 1) {
    const next = { ...superblock, events: superblock.events + round + 1 };
    const written = await meta.writeSuperblock(next);
    assert.equal(written.copyIndex, round % 2 === 0 ? 0 : 1);
    assert.equal(written.sequence, 3 + round);
    const found = await meta.read(); // re-reads both copies from the device
    assert.equal(found.usedCopy, written.copyIndex);
    assert.equal(found.superblock?.events, next.events);
    // The other copy still holds the previous superblock (what a torn write falls back to).
    const other = found.copies[1 - written.copyIndex];
    assert.equal(other?.status, 'valid');
    assert.equal(other?.sequence, written.sequence - 1);
  }
});

test('encode refuses an events count the reader would refuse (past Number.MAX_SAFE_INTEGER)', () => {
  const superblock = fc.sample(superblockArbitrary, 1)[0] as Superblock;
  assert.throws(() => encodeSuperblock({ ...superblock, events: Number.MAX_SAFE_INTEGER + 2 }, 0, 1), (error: unknown) => error instanceof EnbdError && error.code === 'ENBD_ERR_META' && /events/.test(error.message));
  assert.ok(encodeSuperblock({ ...superblock, events: Number.MAX_SAFE_INTEGER }, 0, 1).length > 0);
});

test('generations: more than kGenerationsMax, or ids that are not 16 hex digits, are refused on encode', () => {
  const superblock = fc.sample(superblockArbitrary, 1)[0] as Superblock;
  const tooMany = Array.from({ length: kGenerationsMax + 1 }, (_unused, at) => at.toString(16).padStart(16, '0'));
  for (const generations of [tooMany, ['xyz'], ['0123456789ABCDEF']]) {
    assert.throws(() => encodeSuperblock({ ...superblock, generations }, 0, 1), (error: unknown) => isMetaError(error) && /generations/.test((error as Error).message));
  }
  const round = decodeSuperblock(encodeSuperblock({ ...superblock, generations: ['00000000000000ff', '0123456789abcdef'] }, 0, 1));
  assert.deepEqual(round.superblock.generations, ['00000000000000ff', '0123456789abcdef']);
});

test('a write after a torn copy goes to the torn copy, keeping the good one', async () => {
  const superblock = fc.sample(superblockArbitrary, 1)[0] as Superblock;
  const { device, meta } = await freshLeg(superblock);
  const offsets = superblockOffsets(kLegBytes);
  device.bytes.fill(0xee, offsets[0] + 100, offsets[0] + 200);
  const found = await meta.read();
  assert.equal(found.usedCopy, 1);
  const written = await meta.writeSuperblock({ ...superblock, state: 'active' });
  assert.deepEqual(written, { copyIndex: 0, sequence: 3 });
  const reread = await meta.read();
  assert.deepEqual(reread.copies.map((copy) => copy.status), ['valid', 'valid']);
  assert.equal(reread.superblock?.state, 'active');
});

test('a blank leg: both copies blank, no metadata; a copy in the other slot is refused', async () => {
  const device = new MemoryDevice({ sizeBytes: kLegBytes });
  const found = await new LegMeta(device).read();
  assert.deepEqual(found.copies.map((copy) => copy.status), ['blank', 'blank']);
  assert.equal(found.usedCopy, null);
  assert.equal(found.hasMetadata, false);
  const superblock = fc.sample(superblockArbitrary, 1)[0] as Superblock;
  const misplaced = inspectCopy(1, 0, encodeSuperblock(superblock, 0, 5));
  assert.equal(misplaced.status, 'invalid');
  assert.match(misplaced.reason ?? '', /misplaced/);
});

test('bitmap pages: written bits read back; bytes past the bitmap stay zero', async () => {
  const device = new MemoryDevice({ sizeBytes: kLegBytes });
  const meta = new LegMeta(device);
  await meta.clearBitmap(kLayout);
  const bitmap = new Uint8Array(kLayout.bitmapBytes);
  for (const chunk of [0, 7, 8, 100, kLayout.chunkCount - 1]) bitmapSet(bitmap, chunk);
  await meta.writeBitmapPages(kLayout, bitmap, 0, 1);
  const read = await meta.readBitmap(kLayout);
  assert.deepEqual(Buffer.from(read), Buffer.from(bitmap));
  assert.equal(bitmapCount(read, kLayout.chunkCount), 5);
  const tail = device.bytes.subarray(kLayout.bitmapOffsetBytes + kLayout.bitmapBytes, kLayout.bitmapOffsetBytes + kLayout.bitmapAreaBytes);
  assert.ok(tail.every((byte) => byte === 0));
});

test('a failed superblock write rejects with ENBD_ERR_IO and the next write retries the same copy', async () => {
  const superblock = fc.sample(superblockArbitrary, 1)[0] as Superblock;
  let failWrites = false;
  const device = new MemoryDevice({ sizeBytes: kLegBytes, errnoFor: (command) => (failWrites && command === kCmdWrite ? kEIo : 0) });
  const meta = new LegMeta(device);
  await meta.writeFresh(superblock);
  await meta.read();
  failWrites = true;
  await assert.rejects(meta.writeSuperblock({ ...superblock, events: 99 }), (error: unknown) => error instanceof EnbdError && error.code === 'ENBD_ERR_IO' && error.errno === kEIo);
  failWrites = false;
  const written = await meta.writeSuperblock({ ...superblock, events: 100 });
  assert.deepEqual(written, { copyIndex: 0, sequence: 3 });
  const found = await meta.read();
  assert.equal(found.usedCopy, 0);
  assert.equal(found.superblock?.events, 100);
});
