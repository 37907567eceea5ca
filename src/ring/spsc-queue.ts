/**
 * Lock-free bounded single-producer/single-consumer queue of non-negative int32 entries (slot
 * indices) in a SharedArrayBuffer, with batched, sleep-aware wake-ups; plus `Doorbell`, a
 * many-producers -> one-consumer wake-up word (actors ring the master's doorbell).
 *
 * Threads: exactly one producer thread and one consumer thread per queue (they may be the same
 * thread, e.g. an inline actor). Each side builds its own `SpscQueue` over the shared SAB
 * (`create` on one side, `attach(buffer)` on the other) and keeps its cursors in plain fields.
 *
 * Queue SAB layout (Int32Array; producer-written and consumer-written words on different
 * 64-byte cache lines):
 *   word kQueueTail        (0)  producer: Atomics.store on publish. Count of published entries,
 *                               monotonic, wraps at 2^32 (int32 arithmetic). Consumer waits on it.
 *   word kQueueNotifyCount (1)  producer: plain write (statistics: notifies issued).
 *   word kQueueHead       (16)  consumer: Atomics.store after consuming. Count of consumed
 *                               entries. Producer Atomics.loads it only when it looks full.
 *   word kQueueSleeping   (17)  consumer: Atomics.store 1 before sleeping, 0 on its next
 *                               pop/drain. Producer Atomics.loads it after publishing.
 *   word kQueueWaitCount  (18)  consumer: plain write (statistics: sleeps started).
 *   word kQueueSpinHitCount (19) consumer: plain write (statistics: checks that found entries
 *                               while the consumer polled instead of sleeping, noteSpinHit).
 *   word kQueueMagicWord  (32)  creator, once (kQueueMagic). kQueueCapacityWord (33) creator,
 *                               once.
 *   words kQueueEntriesBase .. +capacity-1: entry i lives at (counter & mask). Producer plain
 *                               writes; consumer plain reads.
 *
 * Invariants: 0 <= (tail - head) | 0 <= capacity; the producer writes only entries in
 * [tail, head + capacity) and the consumer reads only [head, tail).
 *
 * Memory ordering: JS Atomics are sequentially consistent. The producer's plain entry writes
 * precede its Atomics.store of tail; a consumer whose Atomics.load of tail returns that value
 * sees them (and anything else the producer wrote before, e.g. slot descriptors and payload).
 * Symmetrically the consumer's reads of entries precede its Atomics.store of head, so the
 * producer never overwrites an entry still being read.
 *
 * Lost-wakeup freedom (queue and doorbell alike):
 *   consumer: Atomics.store(sleeping, 1); t = Atomics.load(tail); if t != head: don't sleep;
 *             else Atomics.waitAsync(tail, head)   // atomically re-checks tail == head
 *   producer: Atomics.store(tail, new); if Atomics.load(sleeping) == 1: Atomics.notify(tail)
 * In the single total order of these SC operations either the consumer's load of tail follows
 * the producer's store (it sees the entry and does not sleep), or the producer's load of
 * sleeping follows the consumer's store (it notifies; a wait that has not started yet sees
 * tail != head and returns 'not-equal'). So a published entry never waits for a later publish.
 * Notifies are batched: one per publish, and only while the consumer announced sleeping.
 *
 * Allocation: push/stage/publish/pop/drain allocate nothing. `waitAsync` returns the Promise
 * made by Atomics.waitAsync (one per sleep, not per entry); while that Promise is pending a
 * later call (a consumer woken by something else, e.g. its chain inbox, going back to sleep)
 * announces sleeping again and returns the same Promise instead of stacking a second waiter. A pending Atomics.waitAsync does
 * not by itself keep a Node thread alive: the consumer thread needs another ref'd handle (a
 * socket, a parentPort listener) while it sleeps.
 */

import { assert, isPowerOfTwo } from '../core/assert.js';
import { OptionError } from '../core/errors.js';

export const kQueueTail = 0;
export const kQueueNotifyCount = 1;
export const kQueueHead = 16;
export const kQueueSleeping = 17;
export const kQueueWaitCount = 18;
export const kQueueSpinHitCount = 19;
export const kQueueMagicWord = 32;
export const kQueueCapacityWord = 33;
export const kQueueEntriesBase = 48;

export const kQueueMagic = 0x53505343; // 'SPSC'
export const kQueueCapacityMin = 2;
export const kQueueCapacityMax = 1 << 20;

export const kBellCount = 0;
export const kBellNotifyCount = 1;
export const kBellSleeping = 16;
/** Consumer, plain write (statistics): sleeps started. */
export const kBellWaitCount = 17;
/** Consumer, plain write (statistics): polls that found a ring instead of sleeping. */
export const kBellSpinHitCount = 18;
export const kBellMagicWord = 32;
export const kBellWords = 48;
export const kBellMagic = 0x42454c4c; // 'BELL'

export type WaitResult = 'ok' | 'timed-out';

type WaitAsyncResult =
  | { async: false; value: 'not-equal' | 'timed-out' }
  | { async: true; value: Promise<WaitResult> };

interface AtomicsWithWaitAsync {
  waitAsync(array: Int32Array, index: number, value: number, timeoutMs?: number): WaitAsyncResult;
}

// lib ES2023 does not declare Atomics.waitAsync; Node 20 (V8 11) has it.
const atomicsAsync = Atomics as unknown as AtomicsWithWaitAsync;
assert(typeof atomicsAsync.waitAsync === 'function', 'Atomics.waitAsync is available');
assert(kQueueHead - kQueueTail >= 16 && kQueueMagicWord - kQueueHead >= 16, 'words on own lines');
assert(isPowerOfTwo(kQueueCapacityMax), 'capacity bound is a power of two');

/** Words of a queue SAB holding `capacity` entries. */
export function queueWords(capacity: number): number {
  return kQueueEntriesBase + capacity;
}

export class SpscQueue {
  readonly buffer: SharedArrayBuffer;
  readonly capacity: number;
  private readonly words: Int32Array;
  private readonly mask: number;
  // Producer-side cursors.
  private stagedTail: number;
  private publishedTail: number;
  private cachedHead: number;
  // Consumer-side cursors.
  private head: number;
  private cachedTail: number;
  private sleeping = false;
  /** Consumer: the Atomics.waitAsync Promise of the last sleep until it resolves. */
  private pendingWait: Promise<WaitResult> | null = null;

  private constructor(buffer: SharedArrayBuffer) {
    this.buffer = buffer;
    this.words = new Int32Array(buffer);
    assert(this.words.length > kQueueEntriesBase, 'queue SAB holds a header');
    assert(Atomics.load(this.words, kQueueMagicWord) === kQueueMagic, 'queue magic');
    this.capacity = this.words[kQueueCapacityWord] as number;
    assert(isPowerOfTwo(this.capacity), 'queue capacity is a power of two');
    assert(this.words.length === queueWords(this.capacity), 'queue SAB size matches capacity');
    this.mask = this.capacity - 1;
    this.stagedTail = Atomics.load(this.words, kQueueTail);
    this.publishedTail = this.stagedTail;
    this.head = Atomics.load(this.words, kQueueHead);
    this.cachedHead = this.head;
    this.cachedTail = this.stagedTail;
  }

  /** New queue in a new SAB. `capacity`: power of two in 2..2^20 (OptionError ENBD_ERR_RING_OPTION otherwise). */
  static create(capacity: number): SpscQueue {
    if (
      !isPowerOfTwo(capacity) ||
      capacity < kQueueCapacityMin ||
      capacity > kQueueCapacityMax
    ) {
      throw new OptionError('ENBD_ERR_RING_OPTION', 
        `queue.capacity must be a power of two between ${kQueueCapacityMin} and ` +
          `${kQueueCapacityMax}, got ${capacity}`,
      );
    }
    const buffer = new SharedArrayBuffer(queueWords(capacity) * 4);
    const words = new Int32Array(buffer);
    words[kQueueCapacityWord] = capacity;
    Atomics.store(words, kQueueMagicWord, kQueueMagic);
    return new SpscQueue(buffer);
  }

  /** The other side's view of an existing queue SAB (from workerData). */
  static attach(buffer: SharedArrayBuffer): SpscQueue {
    assert(buffer instanceof SharedArrayBuffer, 'queue buffer is a SharedArrayBuffer');
    return new SpscQueue(buffer);
  }

  // ---- Producer ---------------------------------------------------------------------------

  /** Producer: write `value` (>= 0) without publishing. False when the queue is full. */
  stage(value: number): boolean {
    assert(Number.isInteger(value) && value >= 0 && value <= 0x7fffffff, 'entry is a u31');
    if (((this.stagedTail - this.cachedHead) | 0) >= this.capacity) {
      this.cachedHead = Atomics.load(this.words, kQueueHead);
      if (((this.stagedTail - this.cachedHead) | 0) >= this.capacity) return false;
    }
    this.words[kQueueEntriesBase + (this.stagedTail & this.mask)] = value;
    this.stagedTail = (this.stagedTail + 1) | 0;
    return true;
  }

  /**
   * Producer: make every staged entry visible (one Atomics.store of tail) and, only if the
   * consumer announced it is sleeping, one Atomics.notify. Returns true iff it notified.
   */
  publish(): boolean {
    if (this.stagedTail === this.publishedTail) return false;
    Atomics.store(this.words, kQueueTail, this.stagedTail);
    this.publishedTail = this.stagedTail;
    if (Atomics.load(this.words, kQueueSleeping) === 0) return false;
    Atomics.notify(this.words, kQueueTail, 1);
    this.words[kQueueNotifyCount] = ((this.words[kQueueNotifyCount] as number) + 1) | 0;
    return true;
  }

  /** Producer: stage + publish one entry. False (nothing published) when full. */
  push(value: number): boolean {
    if (!this.stage(value)) return false;
    this.publish();
    return true;
  }

  /**
   * Producer: stage values[start .. start+count) until full, then publish once.
   * Returns how many were pushed (the rest did not fit).
   */
  pushMany(values: ArrayLike<number>, start: number, count: number): number {
    assert(start >= 0 && count >= 0 && start + count <= values.length, 'pushMany range');
    let pushed = 0;
    while (pushed < count && this.stage(values[start + pushed] as number)) pushed += 1;
    this.publish();
    return pushed;
  }

  /** Producer: entries that can still be staged (may under-report: head is cached). */
  get freeSpace(): number {
    this.cachedHead = Atomics.load(this.words, kQueueHead);
    return this.capacity - ((this.stagedTail - this.cachedHead) | 0);
  }

  /** Statistics: notifies issued by publish (producer-written). */
  get notifyCount(): number {
    return Atomics.load(this.words, kQueueNotifyCount);
  }

  // ---- Consumer ---------------------------------------------------------------------------

  private awake(): void {
    if (this.sleeping) {
      this.sleeping = false;
      Atomics.store(this.words, kQueueSleeping, 0);
    }
  }

  /** Consumer: next entry, or -1 when nothing is published. */
  pop(): number {
    this.awake();
    if (this.head === this.cachedTail) {
      this.cachedTail = Atomics.load(this.words, kQueueTail);
      if (this.head === this.cachedTail) return -1;
    }
    const value = this.words[kQueueEntriesBase + (this.head & this.mask)] as number;
    this.head = (this.head + 1) | 0;
    Atomics.store(this.words, kQueueHead, this.head);
    return value;
  }

  /**
   * Consumer: hand up to `maxBatch` published entries to `callback` (create the callback once,
   * not per call), then free them with one Atomics.store of head. Returns the count.
   */
  drain(callback: (value: number) => void, maxBatch: number): number {
    assert(maxBatch >= 1, 'drain batch >= 1');
    this.awake();
    this.cachedTail = Atomics.load(this.words, kQueueTail);
    const available = (this.cachedTail - this.head) | 0;
    assert(available >= 0 && available <= this.capacity, 'queue count in range');
    const count = available < maxBatch ? available : maxBatch;
    if (count === 0) return 0;
    for (let index = 0; index < count; index++) {
      callback(this.words[kQueueEntriesBase + ((this.head + index) & this.mask)] as number);
    }
    this.head = (this.head + count) | 0;
    Atomics.store(this.words, kQueueHead, this.head);
    return count;
  }

  /** Consumer: published entries not yet consumed. */
  get size(): number {
    return (Atomics.load(this.words, kQueueTail) - this.head) | 0;
  }

  /**
   * Consumer: go to sleep until the producer publishes. Returns null when entries are already
   * available (drain again), else the Promise of Atomics.waitAsync ('ok' or 'timed-out').
   * The sleeping flag is cleared by the next pop/drain.
   */
  waitAsync(timeoutMs = Infinity): Promise<WaitResult> | null {
    if (((Atomics.load(this.words, kQueueTail) - this.head) | 0) !== 0) return null;
    this.sleeping = true;
    Atomics.store(this.words, kQueueSleeping, 1);
    if (((Atomics.load(this.words, kQueueTail) - this.head) | 0) !== 0) {
      this.awake();
      return null;
    }
    // A wait still pending from an earlier call (its consumer was woken by something else,
    // e.g. a chain inbox): reuse it rather than stack a second waiter on the word.
    if (this.pendingWait !== null) return this.pendingWait;
    this.words[kQueueWaitCount] = ((this.words[kQueueWaitCount] as number) + 1) | 0;
    const result = atomicsAsync.waitAsync(this.words, kQueueTail, this.head, timeoutMs);
    if (!result.async) {
      this.awake();
      return null;
    }
    const pending = result.value;
    this.pendingWait = pending;
    void pending.then(() => {
      if (this.pendingWait === pending) this.pendingWait = null;
    });
    return pending;
  }

  /** Whether the consumer has announced it is sleeping (any thread; for tests and stats). */
  get consumerSleeping(): boolean {
    return Atomics.load(this.words, kQueueSleeping) !== 0;
  }

  /** Statistics: sleeps the consumer started (consumer-written). */
  get waitCount(): number {
    return Atomics.load(this.words, kQueueWaitCount);
  }

  /** Consumer (statistics): a poll found entries, so a sleep and its notify were avoided. */
  noteSpinHit(): void {
    this.words[kQueueSpinHitCount] = ((this.words[kQueueSpinHitCount] as number) + 1) | 0;
  }

  /** Statistics: polls that found entries (consumer-written). */
  get spinHitCount(): number {
    return Atomics.load(this.words, kQueueSpinHitCount);
  }
}

/**
 * Many producers -> one consumer wake-up. Producers (actors, after publishing their completion
 * queues) call `ring()`: Atomics.add on the count, then Atomics.notify only if the consumer set
 * sleeping. The consumer takes `snapshot()`, scans its queues, then `waitAsync(snapshot)`: it
 * sleeps only if no ring happened since the snapshot (same argument as the queue above, with
 * the count in place of tail). Layout: kBellCount (producers, Atomics.add), kBellNotifyCount
 * (producers, Atomics.add, statistics), kBellSleeping (consumer, Atomics.store) on its own line,
 * then kBellWaitCount and kBellSpinHitCount (consumer, plain writes, statistics).
 */
export class Doorbell {
  readonly buffer: SharedArrayBuffer;
  private readonly words: Int32Array;
  private sleeping = false;

  private constructor(buffer: SharedArrayBuffer) {
    this.buffer = buffer;
    this.words = new Int32Array(buffer);
    assert(this.words.length === kBellWords, 'doorbell SAB size');
    assert(Atomics.load(this.words, kBellMagicWord) === kBellMagic, 'doorbell magic');
  }

  static create(): Doorbell {
    const buffer = new SharedArrayBuffer(kBellWords * 4);
    Atomics.store(new Int32Array(buffer), kBellMagicWord, kBellMagic);
    return new Doorbell(buffer);
  }

  static attach(buffer: SharedArrayBuffer): Doorbell {
    assert(buffer instanceof SharedArrayBuffer, 'doorbell buffer is a SharedArrayBuffer');
    return new Doorbell(buffer);
  }

  /** Producer (any thread): ring once per published batch. Returns true iff it notified. */
  ring(): boolean {
    Atomics.add(this.words, kBellCount, 1);
    if (Atomics.load(this.words, kBellSleeping) === 0) return false;
    Atomics.notify(this.words, kBellCount, 1);
    Atomics.add(this.words, kBellNotifyCount, 1);
    return true;
  }

  /** Consumer: the ring count to pass to waitAsync after scanning; marks the consumer awake. */
  snapshot(): number {
    if (this.sleeping) {
      this.sleeping = false;
      Atomics.store(this.words, kBellSleeping, 0);
    }
    return Atomics.load(this.words, kBellCount);
  }

  /**
   * Consumer: sleep until a ring after `snapshot`. Null when one already happened (scan again),
   * else the Atomics.waitAsync Promise. The next `snapshot()` clears the sleeping flag.
   */
  waitAsync(snapshot: number, timeoutMs = Infinity): Promise<WaitResult> | null {
    this.sleeping = true;
    Atomics.store(this.words, kBellSleeping, 1);
    if (Atomics.load(this.words, kBellCount) !== snapshot) {
      this.snapshot();
      return null;
    }
    this.words[kBellWaitCount] = ((this.words[kBellWaitCount] as number) + 1) | 0;
    const result = atomicsAsync.waitAsync(this.words, kBellCount, snapshot, timeoutMs);
    if (!result.async) {
      this.snapshot();
      return null;
    }
    return result.value;
  }

  get consumerSleeping(): boolean {
    return Atomics.load(this.words, kBellSleeping) !== 0;
  }

  /** Statistics: notifies issued by ring(). */
  get notifyCount(): number {
    return Atomics.load(this.words, kBellNotifyCount);
  }

  /** Consumer (statistics): a poll found a ring, so a sleep and its notify were avoided. */
  noteSpinHit(): void {
    this.words[kBellSpinHitCount] = ((this.words[kBellSpinHitCount] as number) + 1) | 0;
  }

  /** Statistics: sleeps the consumer started (consumer-written). */
  get waitCount(): number {
    return Atomics.load(this.words, kBellWaitCount);
  }

  /** Statistics: polls that found a ring (consumer-written). */
  get spinHitCount(): number {
    return Atomics.load(this.words, kBellSpinHitCount);
  }
}
