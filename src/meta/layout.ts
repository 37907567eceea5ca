/**
 * On-leg layout of enbd metadata, md 1.0 style: the metadata lives at the END of each leg and
 * the data starts at offset 0, so a leg stays a plain image of the exported device (it can be
 * copied, mounted or served on its own without enbd).
 *
 * Threads: any (pure arithmetic, no I/O).
 *
 * Design notes
 *
 *   offset 0                                                              legSizeBytes
 *   |<------------- data (dataSizeBytes) ------------->|gap|bitmap area|sb 0|sb 1|tail|
 *                                                       ^   ^           ^    ^    ^
 *                  dataSizeBytes (multiple of chunk) --+   |           |    |    +-- leg end
 *                                    bitmapOffsetBytes ----+           |    |        rounded
 *                                     superblockOffsets[0] = end4K - 8K-+    |        down to 4K
 *                                          superblockOffsets[1] = end4K - 4K-+
 *
 * | region       | size                                   | alignment | written by            |
 * |--------------|----------------------------------------|-----------|-----------------------|
 * | data         | dataSizeBytes = metadataOffset rounded  | chunk     | clients (the export)  |
 * |              | down to the bitmap chunk               |           |                       |
 * | gap          | < one bitmap chunk, never read/written | -         | nobody                |
 * | bitmap area  | ceil(chunks/8) rounded up to 4 KiB      | 4 KiB     | the daemon (bits set  |
 * |              | (one bit per chunk; chunk i = byte     |           | before a chunk's first|
 * |              | i>>3, bit i&7; the rest is reserved)   |           | write; cleared lazily)|
 * | superblock 0 | 4 KiB                                  | 4 KiB     | create; the daemon,   |
 * | superblock 1 | 4 KiB                                  | 4 KiB     | alternating copies    |
 * | tail         | legSizeBytes mod 4 KiB (unused)         | -         | nobody                |
 *
 * The superblock copies sit at fixed distances from the (4 KiB-rounded) end of the leg, so a
 * reader finds them from the leg size alone; everything else is recorded in the superblock and
 * cross-checked against `computeLayout(legSizeBytes, bitmapChunkBytes)`. A leg that grows or
 * shrinks after `enbd create` therefore loses its metadata (as with md 1.0), by design: the
 * reader reports "no metadata" instead of guessing.
 *
 * Default bitmap chunk (`defaultBitmapChunkBytes`). mdadm (super1.c, internal bitmap, no
 * --bitmap-chunk) takes the smallest power of two >= 4 KiB whose bitmap fits in 128 KiB (less its
 * 256-byte header), and never less than 64 MiB. enbd keeps that rule and adds one: because the
 * data size is rounded down to the chunk, the chunk is also at most legSize / 1024 (largest power
 * of two, never below 4 KiB), so small legs lose at most ~0.1% to rounding instead of up to
 * 64 MiB. Results (on-leg = the 4 KiB-rounded bitmap area; memory = one bit per chunk):
 *
 * | leg size | chunk  | chunks  | bitmap memory | bitmap on leg | metadata area | data lost to rounding |
 * |----------|--------|---------|---------------|---------------|---------------|-----------------------|
 * | 1 GiB    | 1 MiB  | 1 023   | 128 B         | 4 KiB         | 12 KiB        | 1 MiB                 |
 * | 1 TiB    | 64 MiB | 16 383  | 2 KiB         | 4 KiB         | 12 KiB        | 64 MiB                |
 * | 16 TiB   | 64 MiB | 262 143 | 32 KiB        | 32 KiB        | 40 KiB        | 64 MiB                |
 * (asserted in test/unit/meta/layout.test.ts; "chunks" counts whole chunks of the data area.)
 *
 * Invariants (checked by computeLayout's asserts and the tests):
 * - dataSizeBytes % bitmapChunkBytes === 0 and dataSizeBytes > 0.
 * - dataSizeBytes <= bitmapOffsetBytes < superblockOffsets[0] < superblockOffsets[1]
 *   and superblockOffsets[1] + 4 KiB <= legSizeBytes.
 * - bitmapAreaBytes * 8 >= chunkCount; bitmapAreaBytes <= 16 MiB (a smaller chunk is refused);
 *   every offset is a multiple of 4 KiB.
 */
import { assert, isPowerOfTwo } from '../core/assert.js';
import { EnbdError } from '../core/errors.js';

export const kMetaBlockBytes = 4096;
export const kSuperblockBytes = 4096;
export const kSuperblockCopies = 2;
/** Smallest bitmap chunk (mdadm: "sub-page chunks don't work yet"). */
export const kBitmapChunkBytesMin = 4096;
/** Largest bitmap chunk accepted by --bitmap-chunk (1 TiB). */
export const kBitmapChunkBytesMax = 2 ** 40;
/** Largest bitmap area (2^27 chunks): bounds the memory `examine` and the engine hold for it. */
export const kBitmapAreaBytesMax = 16 * 1024 * 1024;
/** mdadm's floor for the default chunk of an internal bitmap. */
export const kDefaultChunkBytesFloor = 64 * 1024 * 1024;
/** mdadm's cap on the size of a default internal bitmap, less its 256-byte header. */
export const kDefaultBitmapBytesMax = 128 * 1024 - 256;
/** enbd's extra rule: the default chunk leaves at least this many chunks (bounds rounding loss). */
export const kDefaultChunkCountMin = 1024;

assert(kSuperblockBytes === kMetaBlockBytes, 'a superblock copy is one metadata block');
assert(isPowerOfTwo(kBitmapChunkBytesMin) && kBitmapChunkBytesMin % kMetaBlockBytes === 0, 'chunk floor is 4K-aligned');

export interface LegLayout {
  legSizeBytes: number;
  bitmapChunkBytes: number;
  /** Whole chunks in the data area (bits used in the bitmap). */
  chunkCount: number;
  /** Bytes the bitmap needs in memory: ceil(chunkCount / 8). */
  bitmapBytes: number;
  /** Bytes reserved for the bitmap on the leg (bitmapBytes rounded up to 4 KiB). */
  bitmapAreaBytes: number;
  bitmapOffsetBytes: number;
  /** Offsets of superblock copy 0 and copy 1. */
  superblockOffsets: readonly [number, number];
  /** Start of the metadata area (= bitmapOffsetBytes). */
  metadataOffsetBytes: number;
  /** Bytes from metadataOffsetBytes to the 4 KiB-rounded end of the leg. */
  metadataBytes: number;
  /** The exported size: data from offset 0, a multiple of bitmapChunkBytes. */
  dataSizeBytes: number;
}

function roundDown(value: number, unit: number): number {
  return Math.floor(value / unit) * unit;
}

function roundUp(value: number, unit: number): number {
  return Math.ceil(value / unit) * unit;
}

function largestPowerOfTwoAtMost(value: number): number {
  assert(value >= 1, 'largestPowerOfTwoAtMost needs a positive value');
  let power = 1;
  while (power * 2 <= value) power *= 2;
  return power;
}

/** Offsets of the two superblock copies: the last two 4 KiB blocks of the 4 KiB-rounded leg. */
export function superblockOffsets(legSizeBytes: number): readonly [number, number] {
  assert(Number.isSafeInteger(legSizeBytes) && legSizeBytes >= 0, 'leg size is a safe integer');
  const end = roundDown(legSizeBytes, kMetaBlockBytes);
  if (end < kSuperblockCopies * kSuperblockBytes) {
    throw new EnbdError('ENBD_ERR_META', `a leg of ${legSizeBytes} bytes is too small to hold enbd metadata`);
  }
  return [end - 2 * kSuperblockBytes, end - kSuperblockBytes];
}

/**
 * The default bitmap chunk for a leg: mdadm's rule (smallest power of two >= 4 KiB keeping the
 * bitmap within 128 KiB - 256 B, at least 64 MiB), then at most legSize / 1024 (never < 4 KiB).
 */
export function defaultBitmapChunkBytes(legSizeBytes: number): number {
  assert(Number.isSafeInteger(legSizeBytes) && legSizeBytes >= 0, 'leg size is a safe integer');
  const bitsMax = kDefaultBitmapBytesMax * 8;
  let chunkBytes = kBitmapChunkBytesMin;
  let bits = Math.floor(legSizeBytes / chunkBytes) + 1;
  while (bits > bitsMax) {
    chunkBytes *= 2;
    bits = Math.ceil(bits / 2);
  }
  chunkBytes = Math.max(chunkBytes, kDefaultChunkBytesFloor);
  const smallCap = largestPowerOfTwoAtMost(Math.max(1, Math.floor(legSizeBytes / kDefaultChunkCountMin)));
  chunkBytes = Math.max(kBitmapChunkBytesMin, Math.min(chunkBytes, smallCap));
  assert(isPowerOfTwo(chunkBytes), 'default chunk is a power of two');
  return chunkBytes;
}

/** Throws ENBD_ERR_META unless `chunkBytes` is a power of two from 4 KiB to 1 TiB. */
export function checkBitmapChunk(chunkBytes: number): void {
  if (!isPowerOfTwo(chunkBytes) || chunkBytes < kBitmapChunkBytesMin || chunkBytes > kBitmapChunkBytesMax) {
    throw new EnbdError('ENBD_ERR_META', `bitmap chunk ${chunkBytes} must be a power of two from 4096 (4K) to 1T`);
  }
}

/**
 * The layout of a leg of `legSizeBytes` with a bitmap of `bitmapChunkBytes` per bit.
 * Throws ENBD_ERR_META for a bad chunk or a leg too small for metadata plus one chunk of data.
 */
export function computeLayout(legSizeBytes: number, bitmapChunkBytes: number): LegLayout {
  checkBitmapChunk(bitmapChunkBytes);
  const offsets = superblockOffsets(legSizeBytes);
  // Size the bitmap for every chunk before the superblocks (a slight over-estimate: the bitmap
  // area itself holds no data), which breaks the circle between bitmap size and data size.
  const bitsUpperBound = Math.ceil(offsets[0] / bitmapChunkBytes);
  const bitmapAreaBytes = Math.max(kMetaBlockBytes, roundUp(Math.ceil(bitsUpperBound / 8), kMetaBlockBytes));
  if (bitmapAreaBytes > kBitmapAreaBytesMax) {
    const wanted = Math.ceil(offsets[0] / (kBitmapAreaBytesMax * 8));
    const atMost = largestPowerOfTwoAtMost(wanted);
    const chunkMin = Math.max(kBitmapChunkBytesMin, atMost === wanted ? atMost : atMost * 2);
    throw new EnbdError('ENBD_ERR_META', `a ${bitmapChunkBytes}-byte bitmap chunk needs a ${bitmapAreaBytes}-byte bitmap on a ${legSizeBytes}-byte leg (at most ${kBitmapAreaBytesMax}); use a chunk of at least ${chunkMin}`);
  }
  const bitmapOffsetBytes = offsets[0] - bitmapAreaBytes;
  const dataSizeBytes = bitmapOffsetBytes > 0 ? roundDown(bitmapOffsetBytes, bitmapChunkBytes) : 0;
  if (dataSizeBytes <= 0) {
    throw new EnbdError(
      'ENBD_ERR_META',
      `a leg of ${legSizeBytes} bytes is too small for enbd metadata (${offsets[1] + kSuperblockBytes - Math.max(0, bitmapOffsetBytes)} bytes) plus one ${bitmapChunkBytes}-byte bitmap chunk of data`,
    );
  }
  const chunkCount = dataSizeBytes / bitmapChunkBytes;
  const layout: LegLayout = {
    legSizeBytes,
    bitmapChunkBytes,
    chunkCount,
    bitmapBytes: Math.ceil(chunkCount / 8),
    bitmapAreaBytes,
    bitmapOffsetBytes,
    superblockOffsets: offsets,
    metadataOffsetBytes: bitmapOffsetBytes,
    metadataBytes: offsets[1] + kSuperblockBytes - bitmapOffsetBytes,
    dataSizeBytes,
  };
  assert(Number.isInteger(chunkCount) && chunkCount >= 1, 'at least one whole chunk');
  assert(layout.bitmapAreaBytes * 8 >= chunkCount, 'the bitmap area holds a bit per chunk');
  assert(dataSizeBytes <= bitmapOffsetBytes && bitmapOffsetBytes % kMetaBlockBytes === 0, 'data ends before the bitmap');
  assert(offsets[1] + kSuperblockBytes <= legSizeBytes, 'superblocks inside the leg');
  return layout;
}

/** The byte range of the bitmap area holding `chunkIndex`'s bit, as a 4 KiB page index. */
export function bitmapPageOfChunk(chunkIndex: number): number {
  assert(Number.isSafeInteger(chunkIndex) && chunkIndex >= 0, 'chunk index is a safe integer');
  return Math.floor(chunkIndex / (kMetaBlockBytes * 8));
}
