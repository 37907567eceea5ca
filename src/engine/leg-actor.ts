/**
 * Connection actor logic: one per leg. Takes slot indices from its dispatch queue, performs the
 * slot's request against its leg (a server stub: NBD client or local file) straight from or
 * into the ring's shared memory, and acks into the slot's visited mask. The actor whose ack
 * completes the target mask hands the slot back to the master through its completion queue
 * and rings the master's doorbell.
 *
 * Threads: a worker thread (actors/connection-actor.ts) or the main thread (inline placement);
 * the code and the shared-memory protocol are the same in both.
 *
 * Design notes
 * - Wake-ups are batched: the actor drains up to kDrainBatch slots per turn, then yields to the
 *   event loop (so its sockets get serviced) and sleeps with Atomics.waitAsync only when its
 *   queue is empty. Completions are staged and published once per event-loop turn
 *   (setImmediate), followed by one doorbell ring.
 * - Spin before sleeping (init.spinMicros, src/engine/wake-policy.ts): once the queue runs
 *   empty the actor re-checks it once per event-loop turn for up to spinMicros before it
 *   announces sleeping, so a master publishing within that window needs no Atomics.notify.
 *   A check that finds entries closes the window (SpinWindow; a hit if it came while polling,
 *   counted in the queue by noteSpinHit), the next empty check opens a new one; sleeps are in
 *   the queue's waitCount.
 * - The slot's data is handed to the stub as a Buffer view of the ring: a WRITE is sent from
 *   shared memory, a READ lands in shared memory. No copy in shared mode. The view of each
 *   slot is cached with its length and start (`slotView`; a shadow descriptor's bytes move
 *   within the arena between uses), so a steady workload (the same request size on a slot)
 *   creates no view per request. A plain Uint8Array, not a Buffer: Buffer's slice()
 *   aliases instead of copying, and a stub (the model test's fault legs) snapshots a WRITE's
 *   payload with slice().
 * - Per-leg copy mode (bench experiment): the master posts a private copy of a WRITE payload;
 *   the actor writes from that copy and acks the same visited mask.
 * - Slot ownership: `slotOwner[slot]` names the device a slot was submitted to until it is
 *   acked. A device's completion for a slot it no longer owns is dropped, so a slot acked early
 *   (fence, an abandoned close) is never acked again when the device completes it later, even
 *   after the master re-dispatched that slot index to a newer connection.
 * - Fence: the device leaves `device` at once (new work fails EIO), its completion handler is
 *   swapped for a no-op, every slot it owned is acked with EIO now, then device.fence (NBD:
 *   DISC and wait for the server's close; file: pending I/O) or close() proves the old
 *   connection can apply nothing more. A fence that times out keeps the device in `fencing`
 *   for the next fence() (or disconnect/shutdown, which close it for good).
 * - Probes run outside the ring: tokens >= descriptorCount (never a slot index), private buffers.
 *   Idle probe (init.idleProbeMs > 0): one interval timer per actor compares the time of the
 *   last issue (a timestamp taken on the hot path anyway) with now; after idleProbeMs without
 *   a request it READs one minimum block at offset 0; a failure, or no answer within the
 *   request timeout (idleProbeMs when that is 0), is reported as a drop (events + doorbell),
 *   the same path as a device's onClose, once per connection. Probation probe (probe()):
 *   READ one block at 0, WRITE the same bytes back, FLUSH; only for a leg that gets no client
 *   I/O (otherwise the write-back could undo a client write between the two).
 * - Chained resync copies (init.chain): a copy READ this actor completed without error goes on
 *   as a WRITE to the leg the master named (chainOn: descriptor rewritten, bit set in that
 *   leg's inbox, the inbox rung once per turn with the completion publish); slots other legs
 *   handed here are drained with the dispatch queue, and the actor sleeps on both
 *   (sleepOnBoth: each wait is reused while pending).
 * - Every close is bounded (kCloseBoundMs): a leg that never finishes closing has its slots
 *   acked with EIO and is left to close in the background.
 *
 * Invariants:
 * - Every slot taken from the dispatch queue (or copy message) is acked exactly once.
 * - The actor never writes slot descriptor fields other than through ackSlot, and, for a
 *   chained resync copy whose READ it completed, chainToWrite (src/ring/chain-inbox.ts).
 * - A chained slot goes either to the master (READ failed, or no chain word) or to exactly one
 *   other leg's inbox, never both.
 * - slotOwner[slot] !== null only between submit to that device and the slot's ack.
 * - A connection's drop is reported at most once, and only while it is the current device.
 */
import type { BlockDevice } from '../core/block-device.js';
import type { Logger } from '../core/log.js';
import { assert } from '../core/assert.js';
import { settlesWithin, withTimeout } from '../core/timeout.js';
import { EnbdError, describeError, toPlainError, type PlainError } from '../core/errors.js';
import * as p from '../nbd/protocol.js';
import { errnoNames } from '../nbd/protocol-names.js';
import { RequestRing } from '../ring/request-ring.js';
import { Doorbell, SpscQueue } from '../ring/spsc-queue.js';
import { ackSlot } from '../ring/visited-mask.js';
import { ChainInboxes, chainToWrite } from '../ring/chain-inbox.js';
import { openLeg, parseLegUri, type LegAddress } from '../stubs/open-leg.js';
import type { Extent } from '../core/block-device.js';
import type { CopyMessage, LegActorApi, LegActorInit, LegCheck, LegDeviceOpener, LegInfo, LegStats } from './messages.js';
import { SpinWindow } from './wake-policy.js';

const kDrainBatch = 256;
/** disconnect()/shutdown() wait this long for a leg's close, then abandon it. */
const kCloseBoundMs = 12_000;
/** The idle timer never ticks faster than this. */
const kIdleTickMsMin = 20;
/** Probation probe block (at least the leg's minimum block). */
const kProbeBlockBytes = 4096;
/** Probe tokens cycle through [descriptorCount, descriptorCount + kProbeTokenSpan). */
const kProbeTokenSpan = 1 << 30;

function ignoreCompletion(): void {}

interface ProbeWaiter {
  device: BlockDevice;
  resolve: (errno: number) => void;
}

interface IdleProbe {
  device: BlockDevice;
  token: number;
  sentAtMs: number;
}

export class LegActor implements LegActorApi {
  private readonly ring: RequestRing;
  private readonly dispatch: SpscQueue;
  private readonly completion: SpscQueue;
  private readonly doorbell: Doorbell;
  private readonly legIndex: number;
  private readonly leg: LegAddress;
  private device: BlockDevice | null = null;
  /** Fenced devices whose fence is not proven yet (a later fence() waits on them again). */
  private fencing: BlockDevice[] = [];
  /** The device each slot was submitted to, until its ack (see design notes). */
  private readonly slotOwner: (BlockDevice | null)[];
  /** The current device's drop was reported (events bumped); stats say not connected. */
  private dropReported = false;
  private readonly closing = new WeakMap<BlockDevice, Promise<void>>();
  private readonly probeWaiters = new Map<number, ProbeWaiter>();
  private nextProbeToken = 0;
  private idleTimer: NodeJS.Timeout | null = null;
  private idleProbe: IdleProbe | null = null;
  private idleBuffer: Uint8Array = new Uint8Array(0);
  /** performance.now() of the last request issued to the device (or probe answered). */
  private lastActivityMs = 0;
  private readonly idleProbeMs: number;
  private readonly idleAnswerMs: number;
  private readonly idleTickBound = (): void => this.idleTick();
  private readonly events: Int32Array;
  private running = false;
  private paused = false;
  private pumpScheduled = false;
  private publishScheduled = false;
  /** Poll window after the queue ran empty (init.spinMicros; 0 = sleep at once). */
  private readonly spin: SpinWindow;
  /** Per-leg copy mode: the private payload copy of each slot in flight. */
  private readonly copies: (Uint8Array | null)[];
  private readonly issueBound = (slot: number): void => this.issue(slot, null);
  private readonly pumpBound = (): void => this.pump();
  private readonly publishBound = (): void => this.publishCompletions();
  private readonly statistics: LegStats = { requests: 0, bytesRead: 0, bytesWritten: 0, errors: 0, inFlight: 0, connected: false, latencySumMs: 0, latencyCount: 0 };
  private readonly issuedAt: Float64Array;
  /** Chained resync copies (src/ring/chain-inbox.ts): every leg's inbox; null when off. */
  private readonly chain: ChainInboxes | null;
  /** Legs this turn handed slots to (rung once in publishCompletions). */
  private chainedTo = 0;
  /** Completions staged since the last publish (a turn that only chained rings no doorbell). */
  private completionsStaged = false;
  /** The actor sleeps on its queue and its inbox; the first wake-up runs the pump. */
  private asleep = false;
  private readonly wakeBound = (): void => this.wake();
  /** Per slot: the last exact-length view handed to the device (reused while the length repeats). */
  private readonly views: (Uint8Array | null)[];

  constructor(
    private readonly init: LegActorInit,
    private readonly logger: Logger,
    /** Inline placement only: opens the leg's device instead of openLeg (tests' fault legs). */
    private readonly opener: LegDeviceOpener | null = null,
  ) {
    this.legIndex = init.legIndex;
    this.ring = RequestRing.attach(init.ring);
    this.dispatch = SpscQueue.attach(init.dispatch);
    this.completion = SpscQueue.attach(init.completion);
    this.doorbell = Doorbell.attach(init.doorbell);
    this.leg = parseLegUri(init.uri);
    this.copies = new Array<Uint8Array | null>(this.ring.descriptorCount).fill(null);
    this.events = new Int32Array(init.events);
    this.issuedAt = new Float64Array(this.ring.descriptorCount);
    this.slotOwner = new Array<BlockDevice | null>(this.ring.descriptorCount).fill(null);
    this.chain = init.chain !== undefined ? ChainInboxes.attach(init.chain, this.ring.slotCount) : null;
    this.views = new Array<Uint8Array | null>(this.ring.descriptorCount).fill(null);
    const idleProbeMs = init.idleProbeMs ?? 0;
    assert(Number.isFinite(idleProbeMs) && idleProbeMs >= 0, 'idleProbeMs is a number >= 0');
    this.idleProbeMs = idleProbeMs;
    this.idleAnswerMs = init.requestTimeoutMs > 0 ? init.requestTimeoutMs : idleProbeMs;
    const spinMicros = init.spinMicros ?? 0;
    assert(Number.isFinite(spinMicros) && spinMicros >= 0, 'spinMicros is a number >= 0');
    this.spin = new SpinWindow(spinMicros);
  }

  async open(): Promise<LegInfo | { error: PlainError }> {
    try {
      const device = this.opener !== null
        ? await this.opener(this.legIndex, this.init.uri, { connectTimeoutMs: this.init.connectTimeoutMs, requestTimeoutMs: this.init.requestTimeoutMs })
        : await openLeg(this.leg, {
          logger: this.logger,
          connectTimeoutMs: this.init.connectTimeoutMs,
          requestTimeoutMs: this.init.requestTimeoutMs,
          connections: this.init.connections ?? 1,
        });
      device.setCompletionHandler((token, errno) => this.onDeviceComplete(device, token, errno));
      if ('onClose' in device) {
        device.onClose = (error) => this.reportDrop(device, error === null ? 'closed' : error.message);
      }
      this.device = device;
      this.dropReported = false;
      this.idleProbe = null;
      this.lastActivityMs = performance.now();
      this.idleBuffer = new Uint8Array(Math.min(Math.max(1, device.blockSizes.minimumBytes), device.sizeBytes));
      this.statistics.connected = true;
      this.running = true;
      this.startIdleTimer();
      this.schedulePump();
      return {
        kind: this.leg.kind,
        uri: this.leg.uri,
        sizeBytes: device.sizeBytes,
        features: device.features,
        blockSizes: device.blockSizes,
        description: device.description,
      };
    } catch (error) {
      return { error: toPlainError(error) };
    }
  }

  private schedulePump(): void {
    if (this.pumpScheduled || !this.running) return;
    this.pumpScheduled = true;
    setImmediate(this.pumpBound);
  }

  /**
   * Drains a batch; yields to the event loop; when the queue is empty, re-checks it once per
   * turn for up to spinMs, then sleeps on it.
   */
  private pump(): void {
    this.pumpScheduled = false;
    if (!this.running || this.paused) return;
    const chainSnapshot = this.chain?.snapshot(this.legIndex) ?? 0;
    const drained = this.dispatch.drain(this.issueBound, kDrainBatch) + this.drainChained();
    if (drained > 0) {
      if (this.spin.worked()) this.dispatch.noteSpinHit();
      this.schedulePump();
      return;
    }
    if (this.spin.pollAgain()) {
      this.schedulePump();
      return;
    }
    if (this.chain !== null) {
      this.sleepOnBoth(chainSnapshot);
      return;
    }
    const wait = this.dispatch.waitAsync();
    if (wait === null) {
      this.schedulePump();
      return;
    }
    this.pumpScheduled = true;
    void wait.then(() => {
      this.pumpScheduled = false;
      this.pump();
    });
  }

  // ---- chained resync copies (src/ring/chain-inbox.ts) ----------------------------------

  /** Issues the WRITEs other legs' actors handed to this leg. */
  private drainChained(): number {
    return this.chain === null ? 0 : this.chain.drain(this.legIndex, this.issueBound);
  }

  /**
   * Sleeps on the dispatch queue and the chain inbox at once: the first to fire runs the pump
   * (the other's wait stays armed and is reused by the next sleep: no stacked waiters).
   */
  private sleepOnBoth(chainSnapshot: number): void {
    const chain = this.chain as ChainInboxes;
    const wait = this.dispatch.waitAsync();
    const chainWait = wait === null ? null : chain.waitAsync(this.legIndex, chainSnapshot);
    if (wait === null || chainWait === null) {
      this.schedulePump();
      return;
    }
    this.pumpScheduled = true;
    this.asleep = true;
    if (wait !== this.dispatchWait) {
      this.dispatchWait = wait;
      void wait.then(() => {
        if (this.dispatchWait === wait) this.dispatchWait = null;
        this.wake();
      });
    }
    if (chainWait !== this.chainWait) {
      this.chainWait = chainWait;
      void chainWait.then(this.wakeBound);
    }
  }

  private dispatchWait: Promise<unknown> | null = null;
  private chainWait: Promise<unknown> | null = null;

  private wake(): void {
    if (!this.asleep) return;
    this.asleep = false;
    this.pumpScheduled = false;
    this.pump();
  }

  /**
   * READ ack of a copy that goes on to another leg (the master set the chain word): hands the
   * slot to that leg's actor as a WRITE; the master sees only the WRITE's completion.
   */
  private chainOn(slot: number): boolean {
    if (this.chain === null) return false;
    const next = chainToWrite(this.ring, slot, p.kCmdWrite);
    if (next < 0) return false;
    this.chain.post(next, slot);
    this.chainedTo |= 1 << next;
    if (!this.publishScheduled) {
      this.publishScheduled = true;
      setImmediate(this.publishBound);
    }
    return true;
  }

  private ringChained(): void {
    const chain = this.chain;
    let legs = this.chainedTo;
    this.chainedTo = 0;
    while (chain !== null && legs !== 0) {
      const leg = 31 - Math.clz32(legs & -legs);
      legs &= legs - 1;
      chain.ring(leg);
    }
  }

  /** Per-leg copy mode: a WRITE payload posted as a private copy. */
  onCopyMessage(message: CopyMessage): void {
    this.issue(message.slot, message.data);
  }

  private issue(slot: number, copy: Uint8Array | null): void {
    const device = this.device;
    const ring = this.ring;
    this.statistics.inFlight += 1;
    if (device === null) {
      // Disconnected or reconnecting: fail at once, never wait for the leg.
      this.onComplete(slot, p.kEIo);
      return;
    }
    const command = ring.command(slot);
    const lengthBytes = ring.lengthBytes(slot);
    let data: Uint8Array | null = null;
    if (command === p.kCmdWrite || command === p.kCmdRead) {
      if (copy !== null) {
        assert(command === p.kCmdWrite && copy.length === lengthBytes, 'copies carry WRITE payloads');
        this.copies[slot] = copy;
        data = copy;
      } else {
        data = this.slotView(slot, lengthBytes);
      }
    }
    this.statistics.requests += 1;
    const nowMs = performance.now();
    this.issuedAt[slot] = nowMs;
    this.lastActivityMs = nowMs;
    assert(this.slotOwner[slot] === null, 'a slot is issued once per dispatch');
    this.slotOwner[slot] = device;
    device.submit(command, ring.flags(slot), ring.offsetBytes(slot), lengthBytes, data, slot);
  }

  /**
   * An exact-length view from the start of `slot` (may span a run); cached per slot. The cache
   * is keyed by length and by where the bytes start: a shadow descriptor's data moves between
   * uses (its granule run in the arena, kSlotDataOffset), a ring slot's never does.
   */
  private slotView(slot: number, lengthBytes: number): Uint8Array {
    const cached = this.views[slot] ?? null;
    if (cached !== null && cached.length === lengthBytes && cached.byteOffset === this.ring.data.byteOffset + this.ring.dataOffset(slot)) return cached;
    const view = this.ring.dataView(slot, lengthBytes);
    this.views[slot] = view;
    return view;
  }

  /** A device's completion: slots it still owns are acked; probe tokens go to their waiter. */
  private onDeviceComplete(device: BlockDevice, token: number, errno: number): void {
    if (token < this.slotOwner.length) {
      if (this.slotOwner[token] !== device) return; // acked already (fenced or abandoned)
      this.slotOwner[token] = null;
      this.onComplete(token, errno);
      return;
    }
    const waiter = this.probeWaiters.get(token);
    if (waiter === undefined || waiter.device !== device) return;
    this.probeWaiters.delete(token);
    waiter.resolve(errno);
  }

  private onComplete(slot: number, errno: number): void {
    const ring = this.ring;
    this.statistics.inFlight -= 1;
    const issuedAt = this.issuedAt[slot] ?? 0;
    if (issuedAt > 0) {
      this.statistics.latencySumMs += performance.now() - issuedAt;
      this.statistics.latencyCount += 1;
      this.issuedAt[slot] = 0;
    }
    this.copies[slot] = null;
    const command = ring.command(slot);
    if (errno !== 0) {
      this.statistics.errors += 1;
      this.logger.debug({ leg: this.legIndex, slot, command, errno }, 'leg request failed');
    } else if (command === p.kCmdRead) {
      this.statistics.bytesRead += ring.lengthBytes(slot);
    } else if (command === p.kCmdWrite) {
      this.statistics.bytesWritten += ring.lengthBytes(slot);
    }
    if (ackSlot(ring, slot, this.legIndex, errno !== 0, errno)) {
      if (errno === 0 && command === p.kCmdRead && this.chainOn(slot)) return;
      const staged = this.completion.stage(slot);
      assert(staged, 'completion queue holds every slot');
      this.completionsStaged = true;
      if (!this.publishScheduled) {
        this.publishScheduled = true;
        setImmediate(this.publishBound);
      }
    }
  }

  private publishCompletions(): void {
    this.publishScheduled = false;
    if (this.chainedTo !== 0) this.ringChained();
    if (!this.completionsStaged) return;
    this.completionsStaged = false;
    this.completion.publish();
    this.doorbell.ring();
  }

  async reconnect(): Promise<LegInfo | { error: PlainError }> {
    await this.disconnect();
    return await this.open();
  }

  /**
   * Closes the leg's connection (and any fenced one), each within kCloseBoundMs. Not a fence:
   * a fence() running meanwhile waits on these connections too, but once they are closed they
   * are forgotten, and a later fence() has nothing left to check.
   */
  async disconnect(): Promise<void> {
    const device = this.device;
    this.device = null;
    this.statistics.connected = false;
    if (device !== null) this.fencing.push(device);
    const devices = this.fencing.slice();
    await Promise.all(devices.map(async (each) => {
      await this.closeBounded(each);
      const at = this.fencing.indexOf(each);
      if (at >= 0) this.fencing.splice(at, 1);
    }));
  }

  async fence(timeoutMs: number): Promise<LegCheck> {
    assert(Number.isFinite(timeoutMs) && timeoutMs >= 0, 'fence timeout is a number >= 0');
    const device = this.device;
    if (device !== null) {
      this.device = null;
      this.statistics.connected = false;
      this.fencing.push(device);
    }
    const devices = this.fencing.slice();
    if (devices.length === 0) return { ok: true };
    // Also those a disconnect() is still closing: what they hold is acked EIO now, not later.
    for (const each of devices) this.abandon(each);
    const problems = await Promise.all(devices.map(async (each) => await this.fenceDevice(each, timeoutMs)));
    let reason: string | null = null;
    for (const [index, each] of devices.entries()) {
      const problem = problems[index] ?? null;
      if (problem !== null) {
        reason ??= problem;
        continue;
      }
      const at = this.fencing.indexOf(each);
      if (at < 0) continue; // another fence() or disconnect() took it already
      this.fencing.splice(at, 1);
      await this.closeBounded(each);
    }
    if (reason !== null) {
      this.logger.warn({ leg: this.legIndex, reason }, 'leg fence not proven yet');
      return { ok: false, reason };
    }
    this.logger.info({ leg: this.legIndex }, 'leg fenced: its old connection can apply nothing more');
    return { ok: true };
  }

  /** null once the device is fenced (see BlockDevice.fence), else why not. */
  private async fenceDevice(device: BlockDevice, timeoutMs: number): Promise<string | null> {
    try {
      if (device.fence !== undefined) {
        if (await device.fence(timeoutMs)) return null;
        return `${device.description} not fenced within ${timeoutMs} ms (its server has not closed the connection, or it was cut before it did)`;
      }
      if (await settlesWithin(this.closeOnce(device), timeoutMs)) return null;
      return `${device.description} did not close within ${timeoutMs} ms`;
    } catch (error) {
      return `fencing ${device.description} failed: ${describeError(error)}`;
    }
  }

  /**
   * Stops listening to a device: its completions are dropped from now on, the slots it owned
   * are acked with EIO, its probe requests fail with EIO.
   */
  private abandon(device: BlockDevice): void {
    assert(this.device !== device, 'only a device that left `device` is abandoned');
    device.setCompletionHandler(ignoreCompletion);
    const owners = this.slotOwner;
    let acked = 0;
    for (let slot = 0; slot < owners.length; slot += 1) {
      if (owners[slot] !== device) continue;
      owners[slot] = null;
      acked += 1;
      this.onComplete(slot, p.kEIo);
    }
    for (const [token, waiter] of this.probeWaiters) {
      if (waiter.device !== device) continue;
      this.probeWaiters.delete(token);
      waiter.resolve(p.kEIo);
    }
    if (this.idleProbe?.device === device) this.idleProbe = null;
    if (acked > 0) this.logger.debug({ leg: this.legIndex, slots: acked }, 'leg requests in flight acked with EIO');
  }

  /** close() once per device; errors are logged, never thrown. */
  private closeOnce(device: BlockDevice): Promise<void> {
    let closing = this.closing.get(device);
    if (closing === undefined) {
      closing = device.close().catch((error: unknown) => {
        this.logger.debug({ leg: this.legIndex, err: error }, 'closing the leg failed');
      });
      this.closing.set(device, closing);
    }
    return closing;
  }

  /** Closes a device that left `device`; abandons it if the close outlives kCloseBoundMs. */
  private async closeBounded(device: BlockDevice): Promise<void> {
    if (await settlesWithin(this.closeOnce(device), kCloseBoundMs)) return;
    this.logger.warn({ leg: this.legIndex, boundMs: kCloseBoundMs }, 'leg did not close in time; abandoning its connection');
    this.abandon(device);
  }

  /** Reports the current device's connection as dropped (once): events + doorbell. */
  private reportDrop(device: BlockDevice, reason: string): void {
    if (this.device !== device || this.dropReported) return;
    this.dropReported = true;
    this.idleProbe = null;
    this.logger.warn({ leg: this.legIndex, reason }, 'leg connection dropped');
    Atomics.add(this.events, this.legIndex, 1);
    this.doorbell.ring();
  }

  // ---- probes ---------------------------------------------------------------------------

  private takeProbeToken(): number {
    const token = this.slotOwner.length + this.nextProbeToken;
    this.nextProbeToken = (this.nextProbeToken + 1) % kProbeTokenSpan;
    assert(!this.probeWaiters.has(token), 'probe token is free');
    return token;
  }

  /** Submits one probe request; its completion goes to `resolve` (never to the ring). */
  private submitProbe(device: BlockDevice, command: number, lengthBytes: number, data: Uint8Array | null, resolve: (errno: number) => void): number {
    const token = this.takeProbeToken();
    this.probeWaiters.set(token, { device, resolve });
    device.submit(command, 0, 0, lengthBytes, data, token);
    return token;
  }

  /** errno of one probe request, or -1 when it was not answered within `timeoutMs`. */
  private async probeRequest(device: BlockDevice, command: number, lengthBytes: number, data: Uint8Array | null, timeoutMs: number): Promise<number> {
    let token = -1;
    const answered = new Promise<number>((resolve) => {
      token = this.submitProbe(device, command, lengthBytes, data, resolve);
    });
    try {
      return await withTimeout(answered, timeoutMs, -1);
    } finally {
      // Not answered in time: a late answer is dropped (the waiter goes, the token is unique).
      this.probeWaiters.delete(token);
    }
  }

  async probe(timeoutMs: number): Promise<LegCheck> {
    assert(Number.isFinite(timeoutMs) && timeoutMs >= 0, 'probe timeout is a number >= 0');
    const device = this.device;
    if (device === null) return { ok: false, reason: 'not connected' };
    const lengthBytes = Math.min(Math.max(device.blockSizes.minimumBytes, kProbeBlockBytes), device.sizeBytes);
    const buffer = new Uint8Array(lengthBytes);
    const steps: [number, string][] = [];
    if (lengthBytes > 0) steps.push([p.kCmdRead, 'READ'], [p.kCmdWrite, 'WRITE']);
    if (device.features.flush) steps.push([p.kCmdFlush, 'FLUSH']);
    const deadlineMs = performance.now() + timeoutMs;
    for (const [command, name] of steps) {
      const what = command === p.kCmdFlush ? name : `${name} at 0+${lengthBytes}`;
      const leftMs = deadlineMs - performance.now();
      const payload = command === p.kCmdFlush ? null : buffer;
      const errno = leftMs <= 0 ? -1 : await this.probeRequest(device, command, command === p.kCmdFlush ? 0 : lengthBytes, payload, leftMs);
      if (errno === -1) return this.probeFailed(`${what} not answered within the probe timeout of ${timeoutMs} ms`);
      if (errno !== 0) return this.probeFailed(`${what} failed: ${errnoNames[errno] ?? `errno ${errno}`}`);
      if (this.device !== device) return this.probeFailed(`the connection was closed during the probe (after ${what})`);
      this.lastActivityMs = performance.now();
    }
    return { ok: true };
  }

  private probeFailed(reason: string): LegCheck {
    this.logger.warn({ leg: this.legIndex, reason }, 'leg probe failed');
    return { ok: false, reason };
  }

  private startIdleTimer(): void {
    if (this.idleProbeMs <= 0 || this.idleTimer !== null) return;
    const periodMs = Math.max(kIdleTickMsMin, Math.floor(Math.min(this.idleProbeMs, this.idleAnswerMs) / 2));
    this.idleTimer = setInterval(this.idleTickBound, periodMs);
    this.idleTimer.unref();
  }

  private stopIdleTimer(): void {
    if (this.idleTimer !== null) clearInterval(this.idleTimer);
    this.idleTimer = null;
  }

  /** Idle timer: checks the probe in flight, or starts one after idleProbeMs without work. */
  private idleTick(): void {
    const device = this.device;
    if (device === null || this.dropReported) return;
    const nowMs = performance.now();
    const probe = this.idleProbe;
    if (probe !== null) {
      if (probe.device !== device) {
        this.idleProbe = null;
      } else if (nowMs - probe.sentAtMs > this.idleAnswerMs) {
        this.probeWaiters.delete(probe.token);
        this.reportDrop(device, `idle probe not answered within ${this.idleAnswerMs} ms`);
      }
      return;
    }
    if (nowMs - this.lastActivityMs < this.idleProbeMs || this.idleBuffer.length === 0) return;
    const sent: IdleProbe = { device, token: -1, sentAtMs: nowMs };
    this.idleProbe = sent;
    sent.token = this.submitProbe(device, p.kCmdRead, this.idleBuffer.length, this.idleBuffer, (errno) => {
      if (this.idleProbe === sent) this.idleProbe = null;
      this.lastActivityMs = performance.now();
      if (errno !== 0) this.reportDrop(device, `idle probe failed: ${errnoNames[errno] ?? `errno ${errno}`}`);
    });
  }

  async stats(): Promise<LegStats> {
    const device = this.device;
    const connected = device !== null && !this.dropReported && (!('isConnected' in device) || (device as { isConnected: boolean }).isConnected);
    return { ...this.statistics, connected };
  }

  async getExtents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    if (this.device === null) throw new EnbdError('ENBD_ERR_IO', `leg ${this.legIndex} is not connected`, p.kEIo);
    return await this.device.getExtents(offsetBytes, lengthBytes);
  }

  async setLogLevel(level: string): Promise<void> {
    this.logger.level = level;
  }

  async pause(): Promise<void> {
    this.paused = true;
  }

  async resume(): Promise<void> {
    this.paused = false;
    this.schedulePump();
  }

  /** Stops taking work and closes the leg (the master drained requests first). */
  async shutdown(): Promise<void> {
    this.running = false;
    this.stopIdleTimer();
    await this.disconnect();
  }
}
