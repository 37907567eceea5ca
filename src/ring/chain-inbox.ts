/**
 * Chained slots (issue 15, resync copies): a connection actor that finished the READ of a resync
 * copy hands the slot straight to the target leg's actor as a WRITE, without a round trip
 * through the master. `ChainInboxes` is one SAB holding, per leg index, an inbox: a set of slots
 * handed to that leg's actor (many producers: any other actor; one consumer: the leg's actor)
 * and a wake-up word.
 *
 * Threads: `post` + `ring` on any actor thread (the source), `drain`/`snapshot`/`waitAsync` on
 * the inbox leg's actor thread only (the target); `setChainLeg` on the master only.
 *
 * SAB layout (Int32Array), for leg i at base i * stride (stride = kInboxHeaderWords + one bit
 * per slot, rounded up to whole words and a 64-byte line):
 *   kInboxCount    (0)   producers: Atomics.add once per batch posted (the wake-up count).
 *   kInboxNotifyCount (1) producers: Atomics.add per notify issued (statistics).
 *   kInboxSleeping (16)  consumer: Atomics.store 1 before Atomics.waitAsync on count, 0 when
 *                        awake. Producers Atomics.load it after their add.
 *   bits from kInboxHeaderWords (32): bit s of word s >> 5: slot s was handed to this leg.
 *                        Producers Atomics.or (after writing the slot's WRITE descriptor);
 *                        the consumer Atomics.exchange(word, 0) takes every bit of a word.
 *
 * Slot descriptor word kSlotChainLeg (layout.ts): the master stores target leg + 1 before it
 * dispatches a copy's READ (0 = no chain; RequestRing.resetMasks clears it on every dispatch).
 * The READ leg's actor, when its ack completed the READ without error and the word is set,
 * `chainToWrite`s the slot: command WRITE, flags 0, target mask = the target's bit, visited,
 * failed and errno 0, chain word 0, all before its Atomics.or of the inbox bit; the target's
 * actor takes the bit with Atomics.exchange, so it sees every one of those words (SC order),
 * and the READ bytes the source's device wrote before the ack. The slot stays Dispatched and
 * readLeg keeps the source (the master settles its inFlight with it).
 *
 * Lost-wakeup freedom: the Doorbell argument (spsc-queue.ts) with the count in place of the
 * ring count: consumer `snapshot()` (sleeping 0, load count), drain, then `waitAsync(snapshot)`
 * (sleeping 1, re-load count, Atomics.waitAsync(count, snapshot)); producer Atomics.or bits,
 * Atomics.add count, Atomics.load sleeping, notify if 1. A bit posted after the drain's
 * exchange changed count before the producer read sleeping, so either the consumer's re-load
 * sees the new count, or the producer sees sleeping 1 and its notify finds the waiter (or the
 * wait, not started yet, finds count != snapshot).
 *
 * Allocation: none per slot. `waitAsync` returns the pending Atomics.waitAsync Promise of an
 * earlier call while it has not resolved (an actor that was woken by its other queue sleeps
 * again without stacking waiters on this word).
 */
import { assert } from '../core/assert.js';
import { kSlotChainLeg, kMaxLegs, kSlotCommand, kSlotErrno, kSlotFailedMask, kSlotFlags, kSlotTargetMask, kSlotVisitedMask } from './layout.js';
import type { RequestRing } from './request-ring.js';

export const kInboxCount = 0;
export const kInboxNotifyCount = 1;
export const kInboxSleeping = 16;
export const kInboxHeaderWords = 32;

type WaitResult = 'ok' | 'timed-out';
type WaitAsyncResult = { async: false; value: 'not-equal' | 'timed-out' } | { async: true; value: Promise<WaitResult> };
const atomicsAsync = Atomics as unknown as { waitAsync(array: Int32Array, index: number, value: number): WaitAsyncResult };

function strideFor(slotCount: number): number {
  const words = kInboxHeaderWords + Math.ceil(slotCount / 32);
  return Math.ceil(words / 16) * 16;
}

export class ChainInboxes {
  readonly buffer: SharedArrayBuffer;
  private readonly words: Int32Array;
  private readonly stride: number;
  private readonly slotCount: number;
  /** Consumer side: per leg, the pending wait on its inbox, if any. */
  private readonly pendingWaits: Array<Promise<WaitResult> | null> = new Array<Promise<WaitResult> | null>(kMaxLegs).fill(null);

  private constructor(buffer: SharedArrayBuffer, slotCount: number) {
    this.buffer = buffer;
    this.words = new Int32Array(buffer);
    this.slotCount = slotCount;
    this.stride = strideFor(slotCount);
    assert(this.words.length === this.stride * kMaxLegs, 'chain inbox SAB size matches the slot count');
  }

  /** Master: one inbox per possible leg index (legs added later find theirs). */
  static create(slotCount: number): ChainInboxes {
    return new ChainInboxes(new SharedArrayBuffer(strideFor(slotCount) * kMaxLegs * 4), slotCount);
  }

  static attach(buffer: SharedArrayBuffer, slotCount: number): ChainInboxes {
    assert(buffer instanceof SharedArrayBuffer, 'chain inbox buffer is a SharedArrayBuffer');
    return new ChainInboxes(buffer, slotCount);
  }

  // ---- producer (the READ leg's actor) ------------------------------------------------------

  /** Hands `slot` to leg `legIndex`'s inbox (publish with ring(legIndex) once per batch). */
  post(legIndex: number, slot: number): void {
    assert(slot >= 0 && slot < this.slotCount, 'slot in range');
    const base = legIndex * this.stride + kInboxHeaderWords;
    Atomics.or(this.words, base + (slot >>> 5), 1 << (slot & 31));
  }

  /** After a batch of posts to leg `legIndex`: bump its count, notify only if it sleeps. */
  ring(legIndex: number): boolean {
    const base = legIndex * this.stride;
    Atomics.add(this.words, base + kInboxCount, 1);
    if (Atomics.load(this.words, base + kInboxSleeping) === 0) return false;
    // Every waiter: normally one; two only while the master still drains a gone actor's inbox
    // (mirror.ts adoptInbox) after a new actor took the leg index.
    Atomics.notify(this.words, base + kInboxCount);
    Atomics.add(this.words, base + kInboxNotifyCount, 1);
    return true;
  }

  /** Statistics: rings and notifies into leg `legIndex`'s inbox. */
  counts(legIndex: number): { rings: number; notifies: number } {
    const base = legIndex * this.stride;
    return { rings: Atomics.load(this.words, base + kInboxCount), notifies: Atomics.load(this.words, base + kInboxNotifyCount) };
  }

  // ---- consumer (the inbox leg's actor) -----------------------------------------------------

  /** The count to pass to waitAsync after draining; marks the consumer awake. */
  snapshot(legIndex: number): number {
    const base = legIndex * this.stride;
    Atomics.store(this.words, base + kInboxSleeping, 0);
    return Atomics.load(this.words, base + kInboxCount);
  }

  /** Hands every slot posted to leg `legIndex` to `callback`; returns how many. */
  drain(legIndex: number, callback: (slot: number) => void): number {
    const base = legIndex * this.stride + kInboxHeaderWords;
    const end = base + Math.ceil(this.slotCount / 32);
    let count = 0;
    for (let word = base; word < end; word += 1) {
      if (Atomics.load(this.words, word) === 0) continue;
      let bits = Atomics.exchange(this.words, word, 0);
      while (bits !== 0) {
        const bit = 31 - Math.clz32(bits & -bits);
        bits &= bits - 1;
        callback(((word - base) << 5) + bit);
        count += 1;
      }
    }
    return count;
  }

  /**
   * Sleeps until a ring after `snapshot`: null when one already happened (drain again), else a
   * Promise (the same one while an earlier wait is still pending).
   */
  waitAsync(legIndex: number, snapshot: number): Promise<WaitResult> | null {
    const base = legIndex * this.stride;
    Atomics.store(this.words, base + kInboxSleeping, 1);
    if (Atomics.load(this.words, base + kInboxCount) !== snapshot) {
      Atomics.store(this.words, base + kInboxSleeping, 0);
      return null;
    }
    const earlier = this.pendingWaits[legIndex] ?? null;
    if (earlier !== null) return earlier;
    const result = atomicsAsync.waitAsync(this.words, base + kInboxCount, snapshot);
    if (!result.async) {
      Atomics.store(this.words, base + kInboxSleeping, 0);
      return null;
    }
    const pending = result.value;
    this.pendingWaits[legIndex] = pending;
    void pending.then(() => {
      if (this.pendingWaits[legIndex] === pending) this.pendingWaits[legIndex] = null;
    });
    return pending;
  }
}

/** Master: the copy READ in `slot` goes on as a WRITE to `legIndex` (after RequestRing.resetMasks). */
export function setChainLeg(ring: RequestRing, slot: number, legIndex: number): void {
  assert(Number.isInteger(legIndex) && legIndex >= 0 && legIndex < kMaxLegs, 'chain leg index');
  Atomics.store(ring.control, ring.word(slot, kSlotChainLeg), legIndex + 1);
}

/**
 * READ leg's actor, after its ack completed the READ without error: the leg the slot goes on
 * to (its descriptor rewritten as that leg's WRITE, see the header), or -1 (no chain: hand it to
 * the master as usual).
 */
export function chainToWrite(ring: RequestRing, slot: number, writeCommand: number): number {
  const control = ring.control;
  const base = ring.word(slot, 0);
  const next = Atomics.load(control, base + kSlotChainLeg) - 1;
  if (next < 0) return -1;
  assert(next < kMaxLegs, 'chain leg index');
  Atomics.store(control, base + kSlotChainLeg, 0);
  control[base + kSlotCommand] = writeCommand;
  control[base + kSlotFlags] = 0;
  Atomics.store(control, base + kSlotErrno, 0);
  Atomics.store(control, base + kSlotFailedMask, 0);
  Atomics.store(control, base + kSlotTargetMask, 1 << next);
  Atomics.store(control, base + kSlotVisitedMask, 0);
  return next;
}
