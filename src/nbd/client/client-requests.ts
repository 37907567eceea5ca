/**
 * The NBD client's table of requests in flight: struct-of-arrays indexed by slot, a free-slot
 * stack, and cookies made of (generation << 32 | slot). Preallocated; grows by doubling up to
 * kRequestSlotsMax, never shrinks. Nothing here allocates per request.
 * Threads: the NbdClient's thread only.
 *
 * Slot life:   free --acquire()--> in use (fields filled by the client) --release()--> free
 * Cookie:      high u32 = generation[slot], low u32 = slot. release() bumps the generation, so
 *              a late or duplicated reply for a recycled slot does not match (`lookup` -> -1).
 *
 * Invariants:
 * - inUse[slot] === 1 exactly for slots handed out by acquire() and not yet released.
 * - freeCount + inUseCount === capacity; the free stack holds each free slot once.
 * - data[slot] is null whenever the slot is free (no buffer is retained after completion).
 */
import { assert } from '../../core/assert.js';

export const kRequestSlotsInitial = 256;
/** Upper bound on requests in flight per connection. */
export const kRequestSlotsMax = 65536;

export class RequestTable {
  capacity = 0;
  inUseCount = 0;
  /** NBD command number. */
  command = new Uint8Array(0);
  /** 1 when the request belongs to the client's own Promise API (token is an internal id). */
  internal = new Uint8Array(0);
  inUse = new Uint8Array(0);
  generation = new Uint32Array(0);
  /** Timeout epoch at submit (see NbdClient's request timer). */
  epoch = new Uint32Array(0);
  /** First error seen for the request (structured replies may send several chunks). */
  errno = new Int32Array(0);
  token = new Float64Array(0);
  offsetBytes = new Float64Array(0);
  lengthBytes = new Float64Array(0);
  /** READ: bytes of the range covered so far by data/hole chunks. */
  coveredBytes = new Float64Array(0);
  data: (Uint8Array | null)[] = [];
  private freeStack = new Int32Array(0);
  private freeCount = 0;

  constructor(initialSlots = kRequestSlotsInitial) {
    assert(initialSlots >= 1 && initialSlots <= kRequestSlotsMax, 'initial slots in range');
    this.resize(initialSlots);
  }

  /** A free slot, growing the table when needed; -1 when kRequestSlotsMax are in use. */
  acquire(): number {
    if (this.freeCount === 0) {
      if (this.capacity >= kRequestSlotsMax) return -1;
      this.resize(Math.min(this.capacity * 2, kRequestSlotsMax));
    }
    assert(this.freeCount > 0, 'free slot available after growth');
    this.freeCount -= 1;
    const slot = this.freeStack[this.freeCount] as number;
    assert(this.inUse[slot] === 0, 'acquired slot was free');
    this.inUse[slot] = 1;
    this.inUseCount += 1;
    this.errno[slot] = 0;
    this.coveredBytes[slot] = 0;
    return slot;
  }

  release(slot: number): void {
    assert(slot >= 0 && slot < this.capacity, 'released slot in range');
    assert(this.inUse[slot] === 1, 'released slot was in use');
    this.inUse[slot] = 0;
    this.data[slot] = null;
    this.generation[slot] = ((this.generation[slot] as number) + 1) >>> 0;
    this.inUseCount -= 1;
    this.freeStack[this.freeCount] = slot;
    this.freeCount += 1;
    assert(this.freeCount + this.inUseCount === this.capacity, 'slot accounting');
  }

  /** The slot a reply cookie names, or -1 when no request in flight has that cookie. */
  lookup(cookieHigh: number, cookieLow: number): number {
    if (cookieLow >= this.capacity) return -1;
    if (this.inUse[cookieLow] !== 1) return -1;
    if (this.generation[cookieLow] !== cookieHigh) return -1;
    return cookieLow;
  }

  private resize(capacity: number): void {
    assert(capacity > this.capacity, 'the table only grows');
    const old = this.capacity;
    this.command = grow(this.command, new Uint8Array(capacity));
    this.internal = grow(this.internal, new Uint8Array(capacity));
    this.inUse = grow(this.inUse, new Uint8Array(capacity));
    this.generation = grow(this.generation, new Uint32Array(capacity));
    this.epoch = grow(this.epoch, new Uint32Array(capacity));
    this.errno = grow(this.errno, new Int32Array(capacity));
    this.token = grow(this.token, new Float64Array(capacity));
    this.offsetBytes = grow(this.offsetBytes, new Float64Array(capacity));
    this.lengthBytes = grow(this.lengthBytes, new Float64Array(capacity));
    this.coveredBytes = grow(this.coveredBytes, new Float64Array(capacity));
    for (let slot = old; slot < capacity; slot++) this.data.push(null);
    const freeStack = new Int32Array(capacity);
    freeStack.set(this.freeStack.subarray(0, this.freeCount));
    // Push new slots so that the lowest index is handed out first.
    for (let slot = capacity - 1; slot >= old; slot--) {
      freeStack[this.freeCount] = slot;
      this.freeCount += 1;
    }
    this.freeStack = freeStack;
    this.capacity = capacity;
    assert(this.data.length === capacity, 'data array sized');
  }
}

type NumberArray = Uint8Array | Uint32Array | Int32Array | Float64Array;

function grow<T extends NumberArray>(source: T, target: T): T {
  target.set(source as never);
  return target;
}
