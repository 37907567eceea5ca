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
 * - The slot's data is handed to the stub as a view of the ring (`ring.dataView`): a WRITE is
 *   sent from shared memory, a READ lands in shared memory. No copy in shared mode.
 * - Per-leg copy mode (bench experiment): the master posts a private copy of a WRITE payload;
 *   the actor writes from that copy and acks the same visited mask.
 *
 * Invariants:
 * - Every slot taken from the dispatch queue (or copy message) is acked exactly once.
 * - The actor never writes slot descriptor fields other than through ackSlot.
 */
import type { BlockDevice } from '../core/block-device.js';
import type { Logger } from '../core/log.js';
import { assert } from '../core/assert.js';
import { EnbdError, toPlainError, type PlainError } from '../core/errors.js';
import * as p from '../nbd/protocol.js';
import { RequestRing } from '../ring/request-ring.js';
import { Doorbell, SpscQueue } from '../ring/spsc-queue.js';
import { ackSlot } from '../ring/visited-mask.js';
import { openLeg, parseLegUri, type LegAddress } from '../stubs/open-leg.js';
import type { Extent } from '../core/block-device.js';
import type { CopyMessage, LegActorApi, LegActorInit, LegCheck, LegDeviceOpener, LegInfo, LegStats } from './messages.js';

const kDrainBatch = 256;

export class LegActor implements LegActorApi {
  private readonly ring: RequestRing;
  private readonly dispatch: SpscQueue;
  private readonly completion: SpscQueue;
  private readonly doorbell: Doorbell;
  private readonly legIndex: number;
  private readonly leg: LegAddress;
  private device: BlockDevice | null = null;
  /** Set while we close the device ourselves, so its close is not reported as a drop. */
  private closingOnPurpose = false;
  private readonly events: Int32Array;
  private running = false;
  private paused = false;
  private pumpScheduled = false;
  private publishScheduled = false;
  /** Per-leg copy mode: the private payload copy of each slot in flight. */
  private readonly copies: (Uint8Array | null)[];
  private readonly issueBound = (slot: number): void => this.issue(slot, null);
  private readonly pumpBound = (): void => this.pump();
  private readonly publishBound = (): void => this.publishCompletions();
  private readonly statistics: LegStats = { requests: 0, bytesRead: 0, bytesWritten: 0, errors: 0, inFlight: 0, connected: false, latencySumMs: 0, latencyCount: 0 };
  private readonly issuedAt: Float64Array;

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
    this.copies = new Array<Uint8Array | null>(this.ring.slotCount).fill(null);
    this.events = new Int32Array(init.events);
    this.issuedAt = new Float64Array(this.ring.slotCount);
  }

  async open(): Promise<LegInfo | { error: PlainError }> {
    try {
      const device = this.opener !== null
        ? await this.opener(this.legIndex, this.init.uri, { connectTimeoutMs: this.init.connectTimeoutMs, requestTimeoutMs: this.init.requestTimeoutMs })
        : await openLeg(this.leg, {
          logger: this.logger,
          connectTimeoutMs: this.init.connectTimeoutMs,
          requestTimeoutMs: this.init.requestTimeoutMs,
        });
      device.setCompletionHandler((slot, errno) => this.onComplete(slot, errno));
      const closable = device as { onClose?: ((error: unknown) => void) | null };
      if ('onClose' in closable) {
        closable.onClose = () => {
          if (this.closingOnPurpose || this.device !== device) return;
          this.logger.warn({ leg: this.legIndex }, 'leg connection dropped');
          Atomics.add(this.events, this.legIndex, 1);
          this.doorbell.ring();
        };
      }
      this.device = device;
      this.statistics.connected = true;
      this.running = true;
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

  /** Drains a batch; yields to the event loop; sleeps on the queue when it is empty. */
  private pump(): void {
    this.pumpScheduled = false;
    if (!this.running || this.paused) return;
    const drained = this.dispatch.drain(this.issueBound, kDrainBatch);
    if (drained > 0) {
      this.schedulePump();
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
        data = ring.dataView(slot, lengthBytes);
      }
    }
    this.statistics.requests += 1;
    this.issuedAt[slot] = performance.now();
    device.submit(command, ring.flags(slot), ring.offsetBytes(slot), lengthBytes, data, slot);
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
      const staged = this.completion.stage(slot);
      assert(staged, 'completion queue holds every slot');
      if (!this.publishScheduled) {
        this.publishScheduled = true;
        setImmediate(this.publishBound);
      }
    }
  }

  private publishCompletions(): void {
    this.publishScheduled = false;
    this.completion.publish();
    this.doorbell.ring();
  }

  async reconnect(): Promise<LegInfo | { error: PlainError }> {
    await this.disconnect();
    return await this.open();
  }

  async disconnect(): Promise<void> {
    const device = this.device;
    this.device = null;
    this.statistics.connected = false;
    if (device === null) return;
    this.closingOnPurpose = true;
    try {
      await device.close();
    } catch (error) {
      this.logger.debug({ leg: this.legIndex, err: error }, 'closing the leg failed');
    } finally {
      this.closingOnPurpose = false;
    }
  }

  async fence(_timeoutMs: number): Promise<LegCheck> {
    await this.disconnect();
    return { ok: true };
  }

  async probe(_timeoutMs: number): Promise<LegCheck> {
    return this.device === null ? { ok: false, reason: 'not connected' } : { ok: true };
  }

  async stats(): Promise<LegStats> {
    const device = this.device;
    const connected = device !== null && (!('isConnected' in device) || (device as { isConnected: boolean }).isConnected);
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
    const device = this.device;
    this.device = null;
    if (device !== null) await device.close();
    this.statistics.connected = false;
  }
}
