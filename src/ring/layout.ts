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
 *   kSlotChainLeg     W master (setChainLeg, chain-inbox.ts) before dispatching a resync copy's
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
 * - dataBytes = slotCount * slotBytes <= kDataBytesMax (2 GiB), so every data offset and every
 *   request length fits a u32 and maxRequestBytes fits the NBD 32-bit length field.
 */

import { assert, isPowerOfTwo } from '../core/assert.js';
import { OptionError } from '../core/errors.js';

export const kLayoutMagic = 0x45524e47; // 'ERNG'
export const kLayoutVersion = 1;

export const kPageBytes = 4096;
export const kSlotCountMin = 2;
export const kSlotCountMax = 4096;
export const kSlotCountDefault = 256;
export const kSlotBytesMin = 4 * 1024;
export const kSlotBytesMax = 32 * 1024 * 1024;
export const kSlotBytesDefault = 256 * 1024;
/** Cap on the data SAB: keeps offsets and lengths within u32 and allocations sane. */
export const kDataBytesMax = 2 * 1024 * 1024 * 1024;

/** Legs are bits 0..30 of an Int32 mask. */
export const kMaxLegs = 31;
export const kAllLegsMask = 0x7fffffff;

// Header words.
export const kHeaderMagic = 0;
export const kHeaderVersion = 1;
export const kHeaderSlotCount = 2;
export const kHeaderSlotBytes = 3;
export const kHeaderSlotWords = 4;
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
/** Resync copy READ: target leg + 1 its actor hands the slot to as a WRITE (chain-inbox.ts); 0 none. */
export const kSlotChainLeg = 13;
// Words 14..15 spare.
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
assert(kHeaderSlotWords < kHeaderWords, 'header fields fit the header');

export interface RingOptions {
  /** Number of request slots: a power of two in 2..4096. Default 256. */
  slotCount: number;
  /** Bytes of data area per slot: a multiple of 4096 in 4 KiB..32 MiB. Default 256 KiB. */
  slotBytes: number;
}

export interface RingLayout {
  readonly slotCount: number;
  readonly slotBytes: number;
  readonly slotWords: number;
  /** Int32 words in the control SAB (header + descriptors). */
  readonly controlWords: number;
  readonly controlBytes: number;
  /** Bytes in the data SAB (= slotCount * slotBytes). */
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
  const dataBytes = slotCount * slotBytes;
  if (dataBytes > kDataBytesMax) {
    throw new OptionError('ENBD_ERR_RING_OPTION', 
      `ring.slotCount * ring.slotBytes must be at most ${kDataBytesMax} bytes, ` +
        `got ${slotCount} * ${slotBytes} = ${dataBytes}`,
    );
  }
  const controlWords = kHeaderWords + slotCount * kSlotWords;
  const layout: RingLayout = {
    slotCount,
    slotBytes,
    slotWords: kSlotWords,
    controlWords,
    controlBytes: controlWords * 4,
    dataBytes,
    maxRequestBytes: dataBytes,
  };
  assert(layout.maxRequestBytes <= 0x100000000, 'max request fits the NBD u32 length');
  assert(layout.dataBytes % kPageBytes === 0, 'data area is whole pages');
  return layout;
}

/** Word index of field `field` of slot `slot` in the control Int32Array. */
export function slotWord(slot: number, field: number): number {
  return kHeaderWords + slot * kSlotWords + field;
}
