/**
 * Shared-memory layout of the request ring: field indices (`k` constants), sizes, and the
 * validated `RingLayout` computed from `RingOptions`. Pure data plus one validating function;
 * no views, no Atomics (those live in request-ring.ts, visited-mask.ts, spsc-queue.ts).
 * Threads: any (the master computes the layout; workers re-derive it from the control header).
 *
 * Two SharedArrayBuffers, both created once by the session master (the main thread):
 *
 *   control SAB (Int32Array, `controlWords` words)     data SAB (Uint8Array, `dataBytes` bytes)
 *   +--------------------------------+                 +-----------+-----------+---- ... ----+
 *   | header: kHeaderWords words     |                 |  slot 0   |  slot 1   |  slot N-1   |
 *   +--------------------------------+                 | slotBytes | slotBytes |  slotBytes  |
 *   | slot 0 descriptor: kSlotWords  |                 +-----------+-----------+---- ... ----+
 *   | slot 1 descriptor              |
 *   | ...                            |   Why two: the control words are small and hot (Atomics on
 *   | slot N-1 descriptor            |   masks) while the data area is large and touched only with
 *   +--------------------------------+   plain byte copies / socket reads; keeping them apart lets
 *                                        the data area be a page-aligned region of exactly
 *   slotCount * slotBytes bytes, and keeps Int32 index arithmetic away from byte offsets.
 *
 * Header words (written once by the master before any worker starts; read-only afterwards):
 *   kHeaderMagic      'ERNG' magic, checked by RequestRing.attach
 *   kHeaderVersion    kLayoutVersion
 *   kHeaderSlotCount  slotCount
 *   kHeaderSlotBytes  slotBytes
 *   kHeaderSlotWords  kSlotWords (descriptor stride)
 *   kHeaderShadowSlots    shadowSlots (descriptors after the slotCount slot descriptors)
 *   kHeaderShadowGranules shadowArenaBytes / kShadowGranuleBytes
 *
 * Shadow descriptors and the shadow arena (write-behind, src/engine/write-behind.ts): when
 * shadowSlots > 0 the control SAB holds shadowSlots more descriptors (indices slotCount ..
 * slotCount + shadowSlots - 1, `descriptorCount` in all) and the data SAB ends with a shadow
 * arena of shadowArenaBytes, cut into kShadowGranuleBytes granules. A shadow descriptor owns
 * no slot of the data area: its data is a run of granules of the arena, at the byte offset in
 * its kSlotDataOffset word. So a 4 KiB shadow write takes 4 KiB and one descriptor, never a
 * 256 KiB slot, and shadows never take slots from clients.
 *
 *   data SAB: | slot 0 | slot 1 | ... | slot N-1 | shadow arena: granule 0 | granule 1 | ... |
 *
 * Slot descriptor words (word offset inside a descriptor; W = writer, op = how it is written):
 *   kSlotState        W master. Atomics.store. kSlotStateFree / Allocated / Dispatched /
 *                     Continuation (a non-first slot of a multi-slot run). Actors only load it
 *                     (to assert Dispatched).
 *   kSlotGeneration   W master on allocate (bumped, 31-bit wrap). Plain write, published by the
 *                     Atomics.store of the dispatch queue tail. Cookie = (generation, slot index).
 *   kSlotCommand      W master (setRequest). NBD command number.
 *   kSlotFlags        W master (setRequest). NBD command flags.
 *   kSlotOffsetHigh   W master (setRequest). offsetBytes / 2^32 (offset < 2^53).
 *   kSlotOffsetLow    W master (setRequest). offsetBytes mod 2^32, stored as int32, read >>> 0.
 *   kSlotLengthBytes  W master (setRequest). u32 stored as int32, read >>> 0.
 *   kSlotSpanSlots    W master (setRequest). Slots in this request's contiguous run (>= 1); only
 *                     the first slot's descriptor describes the request.
 *   kSlotTargetMask   W master (setRequest / resetMasks) before dispatch. Bit i = leg i must ack.
 *   kSlotVisitedMask  W actors: Atomics.or(bit) once per leg per dispatch. Master: Atomics.store(0)
 *                     in resetMasks before dispatch.
 *   kSlotFailedMask   W actors: Atomics.or(bit) BEFORE the visited Atomics.or, when the leg
 *                     failed. Master: Atomics.store(0) before dispatch.
 *   kSlotErrno        W actors: Atomics.compareExchange(0 -> errno): the first failure's NBD
 *                     errno (aggregate). Master: Atomics.store(0) before dispatch.
 *   kSlotReadLeg      W master (setReadLeg) before dispatch: which leg serves a READ (-1: none).
 *   kSlotDataOffset   Shadow descriptors only. W master (allocateShadow), plain, published by
 *                     the dispatch queue tail store: byte offset of the shadow's data in the
 *                     data SAB (inside the arena). Slot descriptors: unused (data at slot *
 *                     slotBytes).
 *   kSlotChainLeg     (word 14) W master (setChainLeg, chain-inbox.ts) before dispatching a resync copy's
 *                     READ: target leg + 1 (0: none); Atomics.store. Cleared (Atomics.store 0) by
 *                     resetMasks on every dispatch and by the READ leg's actor when it hands the
 *                     slot on (chainToWrite, which then also writes command, flags and the masks
 *                     of the WRITE: the one place an actor writes descriptor words besides acks).
 *   kSlotLegErrnoBase + i  (i in 0..kMaxLegs-1)
 *                     W actor of leg i: Atomics.store(errno) BEFORE its failed/visited ors.
 *                     Master: Atomics.store(0) before dispatch for every leg of the previous
 *                     failed mask, so a word is non-zero iff its leg is in failedMask.
 *   remaining words   spare (zero), reserved for later fields.
 *
 * Leg limit: masks are Int32 words and bit 31 is the sign bit, so legs are numbered 0..30
 * (kMaxLegs = 31). Every leg has its own errno word, so no leg limit beyond the mask width.
 *
 * Invariants (checked by computeRingLayout and at module load):
 * - slotCount is a power of two in [kSlotCountMin, kSlotCountMax].
 * - slotBytes is a multiple of kPageBytes in [kSlotBytesMin, kSlotBytesMax].
 * - dataBytes = slotCount * slotBytes + shadowArenaBytes <= kDataBytesMax (2 GiB), so every
 *   data offset and every request length fits a u32 and maxRequestBytes fits the NBD 32-bit
 *   length field.
 * - shadowSlots in [0, kShadowSlotsMax]; shadowArenaBytes a multiple of kShadowGranuleBytes,
 *   0 exactly when shadowSlots is 0.
 */

import { assert, isPowerOfTwo } from '../core/assert.js';
import { OptionError } from '../core/errors.js';

export const kLayoutMagic = 0x45524e47; // 'ERNG'
export const kLayoutVersion = 2;

export const kPageBytes = 4096;
export const kSlotCountMin = 2;
export const kSlotCountMax = 4096;
export const kSlotCountDefault = 256;
export const kSlotBytesMin = 4 * 1024;
export const kSlotBytesMax = 32 * 1024 * 1024;
export const kSlotBytesDefault = 256 * 1024;
/** Cap on the data SAB: keeps offsets and lengths within u32 and allocations sane. */
export const kDataBytesMax = 2 * 1024 * 1024 * 1024;

/** Shadow arena granule: the unit a shadow's data is allocated in. */
export const kShadowGranuleBytes = 4096;
/** Most shadow descriptors a ring can have. */
export const kShadowSlotsMax = 8192;

/** Legs are bits 0..30 of an Int32 mask. */
export const kMaxLegs = 31;
export const kAllLegsMask = 0x7fffffff;

// Header words.
export const kHeaderMagic = 0;
export const kHeaderVersion = 1;
export const kHeaderSlotCount = 2;
export const kHeaderSlotBytes = 3;
export const kHeaderSlotWords = 4;
export const kHeaderShadowSlots = 5;
export const kHeaderShadowGranules = 6;
/** Header is padded to one 64-byte cache line. */
export const kHeaderWords = 16;

// Slot descriptor words (offset inside one descriptor).
export const kSlotState = 0;
export const kSlotGeneration = 1;
export const kSlotCommand = 2;
export const kSlotFlags = 3;
export const kSlotOffsetHigh = 4;
export const kSlotOffsetLow = 5;
export const kSlotLengthBytes = 6;
export const kSlotSpanSlots = 7;
export const kSlotTargetMask = 8;
export const kSlotVisitedMask = 9;
export const kSlotFailedMask = 10;
export const kSlotErrno = 11;
export const kSlotReadLeg = 12;
export const kSlotDataOffset = 13;
/** Resync copy READ: target leg + 1 its actor hands the slot to as a WRITE (chain-inbox.ts); 0 none. */
export const kSlotChainLeg = 14;
// Word 15 spare.
export const kSlotLegErrnoBase = 16;
// Words 47..63 spare.
/** Descriptor stride: 64 words = 256 bytes (four cache lines). */
export const kSlotWords = 64;

// kSlotState values.
export const kSlotStateFree = 0;
export const kSlotStateAllocated = 1;
export const kSlotStateDispatched = 2;
export const kSlotStateContinuation = 3;

/** Generations wrap within 31 bits so they stay non-negative in an Int32 word. */
export const kGenerationMask = 0x7fffffff;

assert(kSlotLegErrnoBase + kMaxLegs <= kSlotWords, 'per-leg errno words fit the descriptor');
assert(kSlotReadLeg < kSlotLegErrnoBase, 'fixed fields precede the per-leg errno words');
assert(isPowerOfTwo(kSlotCountMin) && isPowerOfTwo(kSlotCountMax), 'slot count bounds');
assert(kSlotBytesMin % kPageBytes === 0 && kSlotBytesMax % kPageBytes === 0, 'slot bytes bounds');
assert(kSlotCountDefault * kSlotBytesDefault <= kDataBytesMax, 'default ring fits the cap');
assert(kHeaderShadowGranules < kHeaderWords, 'header fields fit the header');
assert(kSlotDataOffset < kSlotLegErrnoBase, 'fixed fields precede the per-leg errno words');

export interface RingOptions {
  /** Number of request slots: a power of two in 2..4096. Default 256. */
  slotCount: number;
  /** Bytes of data area per slot: a multiple of 4096 in 4 KiB..32 MiB. Default 256 KiB. */
  slotBytes: number;
  /** Shadow descriptors (write-behind), 0..kShadowSlotsMax. Default 0. */
  shadowSlots: number;
  /** Bytes of the shadow arena, a multiple of kShadowGranuleBytes; 0 without shadows. Default 0. */
  shadowArenaBytes: number;
}

export interface RingLayout {
  readonly slotCount: number;
  readonly slotBytes: number;
  readonly slotWords: number;
  readonly shadowSlots: number;
  readonly shadowArenaBytes: number;
  /** slotCount + shadowSlots: every descriptor index is below it. */
  readonly descriptorCount: number;
  /** Byte offset of the shadow arena in the data SAB (= slotCount * slotBytes). */
  readonly shadowArenaOffset: number;
  /** Int32 words in the control SAB (header + descriptors). */
  readonly controlWords: number;
  readonly controlBytes: number;
  /** Bytes in the data SAB (= slotCount * slotBytes + shadowArenaBytes). */
  readonly dataBytes: number;
  /** Largest request one allocation can hold (all slots); bigger requests must be split. */
  readonly maxRequestBytes: number;
}

function checkNumber(name: string, value: unknown): number {
  if (typeof value !== 'number') {
    const kind = value === null ? 'null' : typeof value;
    throw new OptionError('ENBD_ERR_RING_OPTION', `ring.${name} must be a number, got ${kind}`);
  }
  return value;
}

/**
 * Validates options (defaults fill missing fields) and derives every size. Throws OptionError
 * (code ENBD_ERR_RING_OPTION) naming the option ('ring.slotCount must be ...').
 */
export function computeRingLayout(options: Partial<RingOptions> = {}): RingLayout {
  const slotCount = checkNumber(
    'slotCount',
    options.slotCount === undefined ? kSlotCountDefault : options.slotCount,
  );
  const slotBytes = checkNumber(
    'slotBytes',
    options.slotBytes === undefined ? kSlotBytesDefault : options.slotBytes,
  );
  if (!isPowerOfTwo(slotCount) || slotCount < kSlotCountMin || slotCount > kSlotCountMax) {
    throw new OptionError('ENBD_ERR_RING_OPTION', 
      `ring.slotCount must be a power of two between ${kSlotCountMin} and ${kSlotCountMax}, ` +
        `got ${slotCount}`,
    );
  }
  if (
    !Number.isInteger(slotBytes) ||
    slotBytes % kPageBytes !== 0 ||
    slotBytes < kSlotBytesMin ||
    slotBytes > kSlotBytesMax
  ) {
    throw new OptionError('ENBD_ERR_RING_OPTION', 
      `ring.slotBytes must be a multiple of ${kPageBytes} between ${kSlotBytesMin} and ` +
        `${kSlotBytesMax}, got ${slotBytes}`,
    );
  }
  const shadowSlots = checkNumber('shadowSlots', options.shadowSlots ?? 0);
  const shadowArenaBytes = checkNumber('shadowArenaBytes', options.shadowArenaBytes ?? 0);
  if (!Number.isInteger(shadowSlots) || shadowSlots < 0 || shadowSlots > kShadowSlotsMax) {
    throw new OptionError('ENBD_ERR_RING_OPTION', `ring.shadowSlots must be an integer between 0 and ${kShadowSlotsMax}, got ${shadowSlots}`);
  }
  if (!Number.isInteger(shadowArenaBytes) || shadowArenaBytes < 0 || shadowArenaBytes % kShadowGranuleBytes !== 0 || (shadowArenaBytes === 0) !== (shadowSlots === 0)) {
    throw new OptionError('ENBD_ERR_RING_OPTION', `ring.shadowArenaBytes must be a multiple of ${kShadowGranuleBytes}, non-zero exactly when ring.shadowSlots is, got ${shadowArenaBytes}`);
  }
  const slotDataBytes = slotCount * slotBytes;
  const dataBytes = slotDataBytes + shadowArenaBytes;
  if (dataBytes > kDataBytesMax) {
    throw new OptionError('ENBD_ERR_RING_OPTION', 
      `ring.slotCount * ring.slotBytes (+ ring.shadowArenaBytes) must be at most ${kDataBytesMax} bytes, ` +
        `got ${slotCount} * ${slotBytes} + ${shadowArenaBytes} = ${dataBytes}`,
    );
  }
  const descriptorCount = slotCount + shadowSlots;
  const controlWords = kHeaderWords + descriptorCount * kSlotWords;
  const layout: RingLayout = {
    slotCount,
    slotBytes,
    slotWords: kSlotWords,
    shadowSlots,
    shadowArenaBytes,
    descriptorCount,
    shadowArenaOffset: slotDataBytes,
    controlWords,
    controlBytes: controlWords * 4,
    dataBytes,
    maxRequestBytes: slotDataBytes,
  };
  assert(layout.maxRequestBytes <= 0x100000000, 'max request fits the NBD u32 length');
  assert(layout.dataBytes % kPageBytes === 0, 'data area is whole pages');
  return layout;
}

/** Word index of field `field` of slot `slot` in the control Int32Array. */
export function slotWord(slot: number, field: number): number {
  return kHeaderWords + slot * kSlotWords + field;
}
