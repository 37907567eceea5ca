/**
 * Who gets ring slots when they free up: the one place in the engine that decides (issue 15,
 * "one engine-side queue decides who waits for ring slots"). Everything that found the ring
 * full waits here, and `onFreed` hands the freed slots out in one fixed order.
 *
 * Thread: main thread (session master). Plain fields, no Atomics.
 *
 * Design notes
 * | order | waiter                                   | how it waits                   | on a free                        |
 * |-------|------------------------------------------|--------------------------------|----------------------------------|
 * | 1     | payload-less client requests (FLUSH,     | `queueSubmit`, FIFO; the       | each takes one slot, oldest first|
 * |       | TRIM, ZERO, CACHE, empty WRITE)          | record is reused (free list)   | (`start` dispatches it)          |
 * | 2     | the NBD server, refused a payload buffer | `serverRefused` (one flag)     | told once (`onBufferAvailable`)  |
 * | 3     | the engine's own runs (resync copies,    | `internalWait` (a Promise)     | all woken; each retries and waits|
 * |       | verify units)                            |                                | again if its run is still taken  |
 * Clients come before the engine's own work: a resync or verify never takes the slot a client
 * request is waiting for. Payload-less requests come before payload buffers because they need
 * one slot and hold no client bytes. The server's own fair share (src/nbd/server/buffer-share.ts)
 * decides among its connections.
 * A queued request's record is taken from a free list and given back when it starts, so a
 * steady overload allocates nothing per request once the list has grown.
 *
 * Invariants:
 * - A queued submit is started exactly once, or failed exactly once by `drainAll` at close.
 * - The server is told at most once per refusal; internal waiters are all woken at every free
 *   that leaves a slot, and at close.
 */

/** A payload-less client request that found the ring full. */
export interface QueuedSubmit {
  command: number;
  flags: number;
  offsetBytes: number;
  lengthBytes: number;
  token: number;
}

/** What onFreed needs from the master. */
export interface SlotGiver {
  /** One slot (index) or -1 when none is free. */
  allocateOne(): number;
  /** Free slots left now. */
  freeCount(): number;
  /** Binds and dispatches a queued request in `slot` (the record is reused after this). */
  start(slot: number, request: QueuedSubmit): void;
  /** The server may try its buffers again. */
  notifyServer(): void;
}

export class SlotWaiters {
  private readonly queued: QueuedSubmit[] = [];
  private queuedHead = 0;
  private readonly spare: QueuedSubmit[] = [];
  private serverWanted = false;
  private internal: Array<() => void> = [];
  private internalSpare: Array<() => void> = [];

  /** Payload-less client requests waiting for a slot. */
  get queuedCount(): number {
    return this.queued.length - this.queuedHead;
  }

  /** The engine's own runs waiting for slots. */
  get internalCount(): number {
    return this.internal.length;
  }

  queueSubmit(command: number, flags: number, offsetBytes: number, lengthBytes: number, token: number): void {
    const record = this.spare.pop() ?? { command: 0, flags: 0, offsetBytes: 0, lengthBytes: 0, token: -1 };
    record.command = command;
    record.flags = flags;
    record.offsetBytes = offsetBytes;
    record.lengthBytes = lengthBytes;
    record.token = token;
    this.queued.push(record);
  }

  /** The server was refused a payload buffer: tell it at the next free. */
  serverRefused(): void {
    this.serverWanted = true;
  }

  /** Resolves at the next free that leaves a slot (or at close); the caller retries. */
  internalWait(): Promise<void> {
    return new Promise<void>((resolve) => this.internal.push(resolve));
  }

  /** Slots were freed: hand them out in the table's order. */
  onFreed(giver: SlotGiver): void {
    while (this.queuedHead < this.queued.length) {
      const slot = giver.allocateOne();
      if (slot < 0) return; // nothing left for the server or the engine either
      const record = this.queued[this.queuedHead] as QueuedSubmit;
      this.queuedHead += 1;
      giver.start(slot, record);
      this.spare.push(record);
    }
    if (this.queuedHead > 0) {
      this.queued.length = 0;
      this.queuedHead = 0;
    }
    if (this.serverWanted) {
      this.serverWanted = false;
      giver.notifyServer();
    }
    if (this.internal.length > 0 && giver.freeCount() > 0) this.wakeInternal();
  }

  /** Close: every internal waiter wakes (it sees the engine closed); returns the queued submits. */
  drainAll(): QueuedSubmit[] {
    const left = this.queued.slice(this.queuedHead);
    this.queued.length = 0;
    this.queuedHead = 0;
    this.serverWanted = false;
    this.wakeInternal();
    return left;
  }

  private wakeInternal(): void {
    // Swap the arrays: a woken waiter that waits again lands in the fresh list, not this loop.
    const wake = this.internal;
    this.internal = this.internalSpare;
    this.internalSpare = wake;
    for (const resolve of wake) resolve();
    wake.length = 0;
  }
}
