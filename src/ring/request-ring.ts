/**
 * The request ring: a table of slot descriptors (control SAB) plus the slots' data area (data
 * SAB), and the master-side slot allocator. Field layout, writers and Atomics ops per field:
 * see layout.ts.
 *
 * Threads:
 * - The session master (main thread) creates the ring (`RequestRing.create`) and is the only
 *   thread that allocates, frees, and writes request fields, generations and states.
 * - Connection actors (worker threads, or inline on the main thread) get `ring.buffers` through
 *   workerData and build their own views with `RequestRing.attach(buffers)` - no copying. They
 *   read request fields, read/write slot data (a leg READ fills it), and ack through
 *   visited-mask.ts. They never call allocate/free (asserted).
 *
 * Lifecycle of a request (first slot of a run of `spanSlots` contiguous slots):
 *   master: allocate(span) -> Allocated (other slots of the run: Continuation)
 *   master: setRequest(...) [+ setReadLeg] ; payload lands in the data area (socket read)
 *   master: markDispatched(slot) (Atomics.store state) ; push slot index on each leg's SPSC
 *           queue ; publish (Atomics.store tail)
 *   actor:  Atomics.load tail -> sees every field and payload byte written before the publish
 *           (JS Atomics are sequentially consistent: plain writes before an Atomics.store are
 *           visible to a thread whose Atomics.load reads that stored value)
 *   actor:  I/O, then ackSlot; the completing acker pushes the slot on its completion queue
 *   master: replies to the client from the slot, then free(slot) -> Free
 *
 * Memory-ordering note for READ data: the read leg fills the slot data with plain writes, then
 * does Atomics.or on the visited mask (and an Atomics.store of its completion queue tail); the
 * master observes either via an Atomics load, so the bytes are visible when it replies.
 *
 * Views and allocation: all accessors are allocation-free. `slotData(slot)` returns a cached
 * full-slot Uint8Array created once at construction; `data` + `dataOffset(slot)` let hot paths
 * address a multi-slot run without new views. `dataView(slot, lengthBytes)` makes a subarray
 * (one small allocation): use it only where an API needs an exact-length view.
 *
 * Shadow descriptors (write-behind; layout.ts "Shadow descriptors and the shadow arena"):
 * `allocateShadow(lengthBytes)` takes a free descriptor from [slotCount, descriptorCount) and a
 * run of whole granules of the arena (first fit from the arena's start over a bit map, 32
 * granules a word, so full words are skipped: the live shadows stay packed at the low end, so
 * their bytes stay in cache and the arena's untouched pages are never faulted in; a rotating
 * cursor walked the whole arena, a page fault and a cache miss per 4 KiB shadow), writes the run's byte offset into the
 * descriptor's kSlotDataOffset word and returns the descriptor index; `free` gives both back.
 * A shadow descriptor is a one-slot run in every other respect (state, generation, setRequest,
 * masks, dispatch queues), so actors need nothing new: `dataOffset`/`dataView` read the word.
 * No allocation: the free descriptors are a stack in an Int32Array.
 *
 * Invariants:
 * - A slot is in exactly one state; a run of span slots is [first: Allocated|Dispatched,
 *   first+1 .. first+span-1: Continuation]; runs never wrap past the last slot (data contiguity).
 * - freeCount = number of slots (not shadow descriptors) in state Free; inUse = number of live
 *   runs (requests) in slots; shadowsInUse = live shadow descriptors.
 * - A granule bit is set iff the granule belongs to a live shadow's run; runs never wrap past
 *   the arena's end; freeGranules = clear bits.
 * - generation of every slot of a run is bumped on allocate.
 */

import { assert, assertSafeInteger } from '../core/assert.js';
import { kTwoPow32 } from '../core/u64.js';
import {
  computeRingLayout,
  kGenerationMask,
  kHeaderMagic,
  kHeaderSlotBytes,
  kHeaderSlotCount,
  kHeaderShadowGranules,
  kHeaderShadowSlots,
  kHeaderSlotWords,
  kHeaderVersion,
  kHeaderWords,
  kLayoutMagic,
  kLayoutVersion,
  kMaxLegs,
  kShadowGranuleBytes,
  kSlotCommand,
  kSlotDataOffset,
  kSlotErrno,
  kSlotFailedMask,
  kSlotFlags,
  kSlotGeneration,
  kSlotLegErrnoBase,
  kSlotLengthBytes,
  kSlotOffsetHigh,
  kSlotOffsetLow,
  kSlotReadLeg,
  kSlotChainLeg,
  kSlotSpanSlots,
  kSlotState,
  kSlotStateAllocated,
  kSlotStateContinuation,
  kSlotStateDispatched,
  kSlotStateFree,
  kSlotTargetMask,
  kSlotVisitedMask,
  kSlotWords,
  type RingLayout,
  type RingOptions,
} from './layout.js';

/** What crosses to a worker in workerData (structured clone shares SABs, never copies them). */
export interface RingBuffers {
  control: SharedArrayBuffer;
  data: SharedArrayBuffer;
}

export class RequestRing {
  readonly layout: RingLayout;
  readonly buffers: RingBuffers;
  /** The control area (header + descriptors). Exposed for visited-mask.ts and tests. */
  readonly control: Int32Array;
  /** The whole data area; slot i starts at dataOffset(i). */
  readonly data: Uint8Array;
  readonly slotCount: number;
  readonly slotBytes: number;
  readonly maxRequestBytes: number;
  /** slotCount + shadow descriptors: every descriptor (slot) index is below it. */
  readonly descriptorCount: number;
  /** Shadow descriptors (0: no shadow arena). */
  readonly shadowSlots: number;
  /** True only in the instance returned by `create` (the master's). */
  readonly isMaster: boolean;

  private readonly slotViews: Uint8Array[];
  // Master-only allocator state (plain memory: only the master thread touches it).
  private readonly runSpans: Int32Array;
  private cursor = 0;
  private freeSlots: number;
  private liveRuns = 0;
  // Master-only shadow allocator (see the header).
  private readonly shadowFree: Int32Array;
  private shadowFreeTop = 0;
  private readonly granuleBits: Int32Array;
  private readonly granuleCount: number;
  private readonly shadowFirstGranule: Int32Array;
  private readonly shadowGranules: Int32Array;
  private freeGranuleCount: number;

  private constructor(layout: RingLayout, buffers: RingBuffers, isMaster: boolean) {
    this.layout = layout;
    this.buffers = buffers;
    this.control = new Int32Array(buffers.control);
    this.data = new Uint8Array(buffers.data);
    this.slotCount = layout.slotCount;
    this.slotBytes = layout.slotBytes;
    this.maxRequestBytes = layout.maxRequestBytes;
    this.descriptorCount = layout.descriptorCount;
    this.shadowSlots = layout.shadowSlots;
    this.isMaster = isMaster;
    assert(this.control.length === layout.controlWords, 'control SAB size matches layout');
    assert(this.data.length === layout.dataBytes, 'data SAB size matches layout');
    this.slotViews = [];
    for (let slot = 0; slot < layout.slotCount; slot++) {
      const startByte = slot * layout.slotBytes;
      this.slotViews.push(this.data.subarray(startByte, startByte + layout.slotBytes));
    }
    this.runSpans = new Int32Array(isMaster ? layout.descriptorCount : 0);
    this.freeSlots = layout.slotCount;
    const shadows = isMaster ? layout.shadowSlots : 0;
    this.granuleCount = layout.shadowArenaBytes / kShadowGranuleBytes;
    this.shadowFree = new Int32Array(shadows);
    // Pushed in reverse, so the first shadow taken is the lowest descriptor (a stack: the most
    // recently freed descriptor is reused first, its words still in cache).
    for (let index = 0; index < shadows; index++) this.shadowFree[index] = layout.descriptorCount - 1 - index;
    this.shadowFreeTop = shadows;
    this.granuleBits = new Int32Array(isMaster ? Math.ceil(this.granuleCount / 32) : 0);
    this.shadowFirstGranule = new Int32Array(shadows);
    this.shadowGranules = new Int32Array(shadows);
    this.freeGranuleCount = isMaster ? this.granuleCount : 0;
  }

  /** Master: validates options, creates both SABs, writes the header. */
  static create(options: Partial<RingOptions> = {}): RequestRing {
    const layout = computeRingLayout(options);
    const buffers: RingBuffers = {
      control: new SharedArrayBuffer(layout.controlBytes),
      data: new SharedArrayBuffer(layout.dataBytes),
    };
    const control = new Int32Array(buffers.control);
    control[kHeaderVersion] = kLayoutVersion;
    control[kHeaderSlotCount] = layout.slotCount;
    control[kHeaderSlotBytes] = layout.slotBytes;
    control[kHeaderSlotWords] = kSlotWords;
    control[kHeaderShadowSlots] = layout.shadowSlots;
    control[kHeaderShadowGranules] = layout.shadowArenaBytes / kShadowGranuleBytes;
    for (let slot = 0; slot < layout.descriptorCount; slot++) {
      control[kHeaderWords + slot * kSlotWords + kSlotReadLeg] = -1;
    }
    // Magic last: an attacher that sees it sees a fully written header.
    Atomics.store(control, kHeaderMagic, kLayoutMagic);
    return new RequestRing(layout, buffers, true);
  }

  /** Worker (or inline actor): views over the master's SABs. Validates the header. */
  static attach(buffers: RingBuffers): RequestRing {
    assert(buffers.control instanceof SharedArrayBuffer, 'ring control is a SharedArrayBuffer');
    assert(buffers.data instanceof SharedArrayBuffer, 'ring data is a SharedArrayBuffer');
    assert(buffers.control.byteLength >= kHeaderWords * 4, 'ring control holds a header');
    const control = new Int32Array(buffers.control);
    assert(Atomics.load(control, kHeaderMagic) === kLayoutMagic, 'ring control magic');
    assert(control[kHeaderVersion] === kLayoutVersion, 'ring layout version');
    assert(control[kHeaderSlotWords] === kSlotWords, 'ring descriptor stride');
    const layout = computeRingLayout({
      slotCount: control[kHeaderSlotCount] ?? 0,
      slotBytes: control[kHeaderSlotBytes] ?? 0,
      shadowSlots: control[kHeaderShadowSlots] ?? 0,
      shadowArenaBytes: (control[kHeaderShadowGranules] ?? 0) * kShadowGranuleBytes,
    });
    return new RequestRing(layout, buffers, false);
  }

  /** Word index of `field` of `slot` in `control` (asserts the slot index). */
  word(slot: number, field: number): number {
    assert(slot >= 0 && slot < this.descriptorCount, 'slot index in range');
    return kHeaderWords + slot * kSlotWords + field;
  }

  private checkSlot(slot: number): void {
    assert(Number.isInteger(slot) && slot >= 0 && slot < this.descriptorCount, 'slot index in range');
  }

  private field(slot: number, field: number): number {
    const value = this.control[kHeaderWords + slot * kSlotWords + field];
    assert(value !== undefined && slot < this.descriptorCount, 'slot index in range');
    return value;
  }

  // ---- Request fields (writer: master) ------------------------------------------------

  /**
   * Master: describe the request held by the run starting at `slot` and reset its masks.
   * Plain writes: published to actors by the later Atomics.store of a dispatch queue tail.
   */
  setRequest(
    slot: number,
    command: number,
    flags: number,
    offsetBytes: number,
    lengthBytes: number,
    spanSlots: number,
    targetMask: number,
  ): void {
    assert(this.isMaster, 'setRequest is master-only');
    this.checkSlot(slot);
    assert(this.field(slot, kSlotState) === kSlotStateAllocated, 'setRequest on an allocated slot');
    assert(this.runSpans[slot] === spanSlots, 'spanSlots equals the allocated run');
    this.control[kHeaderWords + slot * kSlotWords + kSlotSpanSlots] = spanSlots;
    this.describe(slot, command, flags, offsetBytes, lengthBytes, targetMask);
  }

  /** The request fields of setRequest and redescribe (all but the span), then fresh masks. */
  private describe(slot: number, command: number, flags: number, offsetBytes: number, lengthBytes: number, targetMask: number): void {
    assertSafeInteger(offsetBytes, 'offsetBytes');
    assert(Number.isInteger(lengthBytes) && lengthBytes >= 0, 'lengthBytes is a u32');
    assert(lengthBytes < kTwoPow32, 'lengthBytes is a u32');
    const base = kHeaderWords + slot * kSlotWords;
    const control = this.control;
    control[base + kSlotCommand] = command;
    control[base + kSlotFlags] = flags;
    control[base + kSlotOffsetHigh] = Math.floor(offsetBytes / kTwoPow32);
    control[base + kSlotOffsetLow] = offsetBytes % kTwoPow32 | 0;
    control[base + kSlotLengthBytes] = lengthBytes | 0;
    control[base + kSlotReadLeg] = -1;
    this.resetMasks(slot, targetMask);
  }

  /**
   * Master: a new request in a run that stays allocated to its owner between requests (the
   * metadata keeper's reserved slot). Like setRequest, on a slot that is Allocated or whose last
   * request was answered by every leg it targeted (Dispatched, visited = target).
   */
  redescribe(slot: number, command: number, flags: number, offsetBytes: number, lengthBytes: number, targetMask: number): void {
    assert(this.isMaster, 'redescribe is master-only');
    this.checkSlot(slot);
    const state = this.field(slot, kSlotState);
    if (state === kSlotStateAllocated) {
      this.setRequest(slot, command, flags, offsetBytes, lengthBytes, this.runSpans[slot] ?? 1, targetMask);
      return;
    }
    assert(state === kSlotStateDispatched, 'redescribe a live slot');
    assert(this.visitedMask(slot) === this.targetMask(slot), 'redescribe only an answered request');
    this.describe(slot, command, flags, offsetBytes, lengthBytes, targetMask);
  }

  /**
   * Master, before (re)dispatch (never while legs may still ack it): target = targetMask;
   * visited, failed, aggregate errno and every per-leg errno word = 0 (only the previously
   * failed legs' words can be non-zero). Atomics.store throughout.
   */
  resetMasks(slot: number, targetMask: number): void {
    assert(this.isMaster, 'resetMasks is master-only');
    this.checkSlot(slot);
    assert(Number.isInteger(targetMask) && targetMask > 0, 'targetMask names at least one leg');
    assert(targetMask <= 0x7fffffff, 'targetMask uses legs 0..30 only');
    const state = this.field(slot, kSlotState);
    assert(state === kSlotStateAllocated || state === kSlotStateDispatched, 'slot is live');
    const base = kHeaderWords + slot * kSlotWords;
    const control = this.control;
    // Only legs in the previous failed mask have non-zero errno words: clear just those.
    let failed = Atomics.load(control, base + kSlotFailedMask);
    while (failed !== 0) {
      const leg = 31 - Math.clz32(failed & -failed);
      assert(leg < kMaxLegs, 'failed mask uses legs 0..30 only');
      Atomics.store(control, base + kSlotLegErrnoBase + leg, 0);
      failed &= failed - 1;
    }
    Atomics.store(control, base + kSlotTargetMask, targetMask);
    Atomics.store(control, base + kSlotVisitedMask, 0);
    Atomics.store(control, base + kSlotFailedMask, 0);
    Atomics.store(control, base + kSlotErrno, 0);
    Atomics.store(control, base + kSlotChainLeg, 0);
  }

  /**
   * Master, between the phases of a resync copy (the slot completed, no leg holds it): the
   * same range and data become a new request (READ from the source, then WRITE to the target).
   */
  rephase(slot: number, command: number, flags: number, targetMask: number): void {
    assert(this.isMaster, 'rephase is master-only');
    this.checkSlot(slot);
    const base = kHeaderWords + slot * kSlotWords;
    this.control[base + kSlotCommand] = command;
    this.control[base + kSlotFlags] = flags;
    this.control[base + kSlotReadLeg] = -1;
    this.resetMasks(slot, targetMask);
  }

  /** Master: which leg serves a READ (-1: none). */
  setReadLeg(slot: number, legIndex: number): void {
    assert(this.isMaster, 'setReadLeg is master-only');
    this.checkSlot(slot);
    assert(Number.isInteger(legIndex) && legIndex >= -1 && legIndex < kMaxLegs, 'leg index');
    this.control[this.word(slot, kSlotReadLeg)] = legIndex;
  }

  /** Master: Allocated -> Dispatched, just before pushing the slot to the legs' queues. */
  markDispatched(slot: number): void {
    assert(this.isMaster, 'markDispatched is master-only');
    this.checkSlot(slot);
    assert(this.field(slot, kSlotState) === kSlotStateAllocated, 'dispatch an allocated slot');
    assert((this.field(slot, kSlotTargetMask) | 0) > 0, 'dispatch with a target mask');
    Atomics.store(this.control, this.word(slot, kSlotState), kSlotStateDispatched);
  }

  // ---- Field readers (any thread) --------------------------------------------------------

  state(slot: number): number {
    return Atomics.load(this.control, this.word(slot, kSlotState));
  }
  generation(slot: number): number {
    return this.field(slot, kSlotGeneration);
  }
  command(slot: number): number {
    return this.field(slot, kSlotCommand);
  }
  flags(slot: number): number {
    return this.field(slot, kSlotFlags);
  }
  offsetBytes(slot: number): number {
    const high = this.field(slot, kSlotOffsetHigh);
    const low = this.field(slot, kSlotOffsetLow) >>> 0;
    return high * kTwoPow32 + low;
  }
  lengthBytes(slot: number): number {
    return this.field(slot, kSlotLengthBytes) >>> 0;
  }
  spanSlots(slot: number): number {
    return this.field(slot, kSlotSpanSlots);
  }
  readLeg(slot: number): number {
    return this.field(slot, kSlotReadLeg);
  }
  targetMask(slot: number): number {
    return Atomics.load(this.control, this.word(slot, kSlotTargetMask));
  }
  visitedMask(slot: number): number {
    return Atomics.load(this.control, this.word(slot, kSlotVisitedMask));
  }
  failedMask(slot: number): number {
    return Atomics.load(this.control, this.word(slot, kSlotFailedMask));
  }
  /** The first failure's NBD errno (0 when no leg failed). */
  errno(slot: number): number {
    return Atomics.load(this.control, this.word(slot, kSlotErrno));
  }
  /** Leg `legIndex`'s NBD errno for this dispatch (0 unless its bit is in failedMask). */
  legErrno(slot: number, legIndex: number): number {
    assert(legIndex >= 0 && legIndex < kMaxLegs, 'leg index');
    return Atomics.load(this.control, this.word(slot, kSlotLegErrnoBase + legIndex));
  }

  // ---- Data area --------------------------------------------------------------------------

  /**
   * Byte offset of slot `slot` in `data`. A run's bytes are contiguous from its first slot; a
   * shadow descriptor's bytes are its granule run in the arena (kSlotDataOffset).
   */
  dataOffset(slot: number): number {
    if (slot < this.slotCount) return slot * this.slotBytes;
    return this.field(slot, kSlotDataOffset);
  }
  /** True for a shadow descriptor (index slotCount and up). */
  isShadow(slot: number): boolean {
    return slot >= this.slotCount;
  }
  /** Cached view of exactly one slot's bytes (no allocation). */
  slotData(slot: number): Uint8Array {
    const view = this.slotViews[slot];
    assert(view !== undefined, 'slot index in range');
    return view;
  }
  /**
   * A new exact-length view from the start of `slot` (may span a run). Allocates one view:
   * only for APIs that need an exact length; hot paths use `data` + `dataOffset`.
   */
  dataView(slot: number, lengthBytes: number): Uint8Array {
    this.checkSlot(slot);
    const start = this.dataOffset(slot);
    assert(lengthBytes >= 0, 'view length is non-negative');
    assert(start + lengthBytes <= this.data.length, 'view inside the data area');
    return this.data.subarray(start, start + lengthBytes);
  }

  // ---- Master-side allocator --------------------------------------------------------------

  /** Slots in state Free. */
  get freeCount(): number {
    return this.freeSlots;
  }
  /** Live allocations (requests), each a run of one or more slots. */
  get inUse(): number {
    return this.liveRuns;
  }
  /** Live shadow descriptors. */
  get shadowsInUse(): number {
    return this.shadowSlots - this.shadowFreeTop;
  }
  /** Free granules of the shadow arena. */
  get freeGranules(): number {
    return this.freeGranuleCount;
  }
  /** Granules of the shadow arena. */
  get granules(): number {
    return this.granuleCount;
  }
  /** Slots needed to hold `lengthBytes` of data (at least 1). */
  slotsFor(lengthBytes: number): number {
    return lengthBytes <= this.slotBytes ? 1 : Math.ceil(lengthBytes / this.slotBytes);
  }

  /**
   * Master: first-fit run of `spanSlots` contiguous free slots, searching from a rotating
   * cursor so slots are reused round-robin. Returns the first slot, or -1 when no run fits.
   * Runs never wrap past the last slot. O(slotCount): at most two passes over the table.
   */
  allocate(spanSlots: number): number {
    assert(this.isMaster, 'allocate is master-only');
    assert(Number.isInteger(spanSlots) && spanSlots >= 1, 'spanSlots >= 1');
    assert(spanSlots <= this.slotCount, 'spanSlots <= slotCount (caller splits larger requests)');
    if (spanSlots > this.freeSlots) return -1;
    let first = this.findRun(this.cursor, this.slotCount, spanSlots);
    if (first < 0) first = this.findRun(0, this.slotCount, spanSlots);
    if (first < 0) return -1;
    const control = this.control;
    for (let slot = first; slot < first + spanSlots; slot++) {
      const base = kHeaderWords + slot * kSlotWords;
      const generation = control[base + kSlotGeneration] as number;
      control[base + kSlotGeneration] = (generation + 1) & kGenerationMask;
      const state = slot === first ? kSlotStateAllocated : kSlotStateContinuation;
      Atomics.store(control, base + kSlotState, state);
    }
    this.runSpans[first] = spanSlots;
    this.freeSlots -= spanSlots;
    this.liveRuns += 1;
    this.cursor = (first + spanSlots) & (this.slotCount - 1);
    assert(this.freeSlots >= 0, 'free slot count stays non-negative');
    return first;
  }

  private findRun(startSlot: number, endSlot: number, spanSlots: number): number {
    const control = this.control;
    let run = 0;
    for (let slot = startSlot; slot < endSlot; slot++) {
      if (control[kHeaderWords + slot * kSlotWords + kSlotState] === kSlotStateFree) {
        run += 1;
        if (run === spanSlots) return slot - spanSlots + 1;
      } else {
        run = 0;
      }
    }
    return -1;
  }

  /**
   * Master: a shadow descriptor whose data is a run of ceil(lengthBytes / granule) (at least
   * one) granules of the arena; -1 when no descriptor is free or no run fits. The descriptor
   * is Allocated (a one-slot run: setRequest with spanSlots 1); `free` gives everything back.
   */
  allocateShadow(lengthBytes: number): number {
    assert(this.isMaster, 'allocateShadow is master-only');
    const need = lengthBytes <= kShadowGranuleBytes ? 1 : Math.ceil(lengthBytes / kShadowGranuleBytes);
    if (this.shadowFreeTop === 0 || need > this.freeGranuleCount) return -1;
    const first = this.findGranules(need);
    if (first < 0) return -1;
    const bits = this.granuleBits;
    for (let granule = first; granule < first + need; granule++) bits[granule >>> 5] = (bits[granule >>> 5] as number) | (1 << (granule & 31));
    this.freeGranuleCount -= need;
    this.shadowFreeTop -= 1;
    const slot = this.shadowFree[this.shadowFreeTop] as number;
    const index = slot - this.slotCount;
    this.shadowFirstGranule[index] = first;
    this.shadowGranules[index] = need;
    const base = kHeaderWords + slot * kSlotWords;
    const control = this.control;
    control[base + kSlotDataOffset] = this.layout.shadowArenaOffset + first * kShadowGranuleBytes;
    control[base + kSlotGeneration] = ((control[base + kSlotGeneration] as number) + 1) & kGenerationMask;
    assert(control[base + kSlotState] === kSlotStateFree, 'a free shadow descriptor is Free');
    Atomics.store(control, base + kSlotState, kSlotStateAllocated);
    this.runSpans[slot] = 1;
    return slot;
  }

  /** First fit of `need` clear granule bits from the arena's start to its end; -1: none. */
  private findGranules(need: number): number {
    const bits = this.granuleBits;
    const end = this.granuleCount;
    let run = 0;
    let granule = 0;
    while (granule < end) {
      const word = bits[granule >>> 5] as number;
      if (word === -1) {
        // 32 granules in use: skip the word.
        run = 0;
        granule = (granule | 31) + 1;
        continue;
      }
      if (word === 0 && (granule & 31) === 0 && granule + 32 <= end) {
        if (run + 32 >= need) return granule - run;
        run += 32;
        granule += 32;
        continue;
      }
      if ((word & (1 << (granule & 31))) === 0) {
        run += 1;
        if (run === need) return granule - need + 1;
      } else {
        run = 0;
      }
      granule += 1;
    }
    return -1;
  }

  private freeShadow(slot: number): void {
    const index = slot - this.slotCount;
    const first = this.shadowFirstGranule[index] as number;
    const count = this.shadowGranules[index] as number;
    assert(count >= 1, 'a live shadow holds granules');
    const bits = this.granuleBits;
    for (let granule = first; granule < first + count; granule++) {
      const mask = 1 << (granule & 31);
      assert(((bits[granule >>> 5] as number) & mask) !== 0, 'a shadow frees only its own granules');
      bits[granule >>> 5] = (bits[granule >>> 5] as number) & ~mask;
    }
    this.shadowGranules[index] = 0;
    this.freeGranuleCount += count;
    this.runSpans[slot] = 0;
    Atomics.store(this.control, this.word(slot, kSlotState), kSlotStateFree);
    this.shadowFree[this.shadowFreeTop] = slot;
    this.shadowFreeTop += 1;
    assert(this.shadowFreeTop <= this.shadowSlots && this.freeGranuleCount <= this.granuleCount, 'shadow allocator counts in range');
  }

  /** Master: release the run that starts at `firstSlot` (after the client reply is sent). */
  free(firstSlot: number): void {
    assert(this.isMaster, 'free is master-only');
    this.checkSlot(firstSlot);
    if (firstSlot >= this.slotCount) {
      const state = this.field(firstSlot, kSlotState);
      assert(state === kSlotStateAllocated || state === kSlotStateDispatched, 'free a live shadow');
      this.freeShadow(firstSlot);
      return;
    }
    const state = this.field(firstSlot, kSlotState);
    assert(state === kSlotStateAllocated || state === kSlotStateDispatched, 'free a live run head');
    const spanSlots = this.runSpans[firstSlot] as number;
    assert(spanSlots >= 1 && firstSlot + spanSlots <= this.slotCount, 'run inside the table');
    const control = this.control;
    for (let slot = firstSlot; slot < firstSlot + spanSlots; slot++) {
      const base = kHeaderWords + slot * kSlotWords;
      if (slot !== firstSlot) {
        assert(control[base + kSlotState] === kSlotStateContinuation, 'run tail is Continuation');
      }
      Atomics.store(control, base + kSlotState, kSlotStateFree);
    }
    this.runSpans[firstSlot] = 0;
    this.freeSlots += spanSlots;
    this.liveRuns -= 1;
    assert(this.freeSlots <= this.slotCount && this.liveRuns >= 0, 'allocator counts in range');
  }
}
