/**
 * A leg over several NBD connections (the seed's "group of connections per server"): one
 * BlockDevice that spreads requests over N NbdClients to the same export, so a server that
 * serialises per connection (or a network path with per-connection limits) serves N requests
 * at once. Used for `--leg-connections N` / a leg URI's `connections=N` when the server
 * advertises NBD_FLAG_CAN_MULTI_CONN; otherwise the leg keeps one connection and the log says
 * why (without multi-conn a FLUSH on one connection need not cover writes on another, and
 * caches need not agree between connections).
 *
 * Thread: the thread that owns the leg (its connection actor's worker, or main inline).
 *
 * Design notes
 * | request              | connections used                                                |
 * |----------------------|-----------------------------------------------------------------|
 * | READ/WRITE/TRIM/ZERO/| the one with the fewest requests pending (ties: round robin);   |
 * | CACHE                | the mirror's range lock already orders overlapping writes       |
 * | FLUSH                | every connection; completes once all answered, with the first   |
 * |                      | error any gave (multi-conn makes one enough; all is stricter)   |
 * | block status         | the connection with the fewest pending                          |
 * - A leg is one unit for state: the first connection lost fires the group's onClose (once);
 *   the engine then fails the leg and fences it, and fence() fences every connection (DISC and
 *   wait for each server close) and holds only when all hold. close() closes all.
 * - Completions are routed by a handler bound once per connection; nothing is allocated per
 *   request except for FLUSH (a small record per flush in flight).
 *
 * Invariants:
 * - Each token submitted to the group completes exactly once: a FLUSH token after its last
 *   connection answered, any other token when its one connection answered.
 * - pending[i] = tokens submitted to connection i and not yet completed by it.
 */
import type { BlockDevice, BlockSizes, CompletionHandler, DeviceFeatures, Extent } from '../core/block-device.js';
import type { EnbdError } from '../core/errors.js';
import { assert } from '../core/assert.js';
import { kCmdFlush } from '../nbd/protocol.js';

/** The most connections a leg may open (a sanity bound for the flag and the URI parameter). */
export const kMaxLegConnections = 16;

/** What the group needs of each connection (an NbdClient). */
export interface GroupMember extends BlockDevice {
  onClose?: ((error: EnbdError | null) => void) | null;
  readonly isConnected?: boolean;
}

interface FlushState {
  remaining: number;
  errno: number;
}

function noHandler(): void {}

export class ConnectionGroup implements BlockDevice {
  readonly sizeBytes: number;
  readonly features: DeviceFeatures;
  readonly blockSizes: BlockSizes;
  readonly description: string;
  onClose: ((error: EnbdError | null) => void) | null = null;
  private handler: CompletionHandler = noHandler;
  private readonly pending: Int32Array;
  private readonly flushes = new Map<number, FlushState>();
  private next = 0;
  private lost = false;

  constructor(private readonly members: readonly GroupMember[]) {
    assert(members.length >= 1, 'a connection group has at least one connection');
    const first = members[0] as GroupMember;
    for (const member of members) {
      assert(member.sizeBytes === first.sizeBytes, 'every connection of a leg sees the same export size');
    }
    this.sizeBytes = first.sizeBytes;
    this.features = first.features;
    this.blockSizes = first.blockSizes;
    this.description = `${first.description} (${members.length} connections)`;
    this.pending = new Int32Array(members.length);
    members.forEach((member, index) => {
      member.setCompletionHandler((token, errno) => this.onMemberComplete(index, token, errno));
      member.onClose = (error) => this.onMemberClose(error);
    });
  }

  get connectionCount(): number {
    return this.members.length;
  }

  /** Requests pending on each connection (tests, stats). */
  pendingPerConnection(): number[] {
    return Array.from(this.pending);
  }

  get isConnected(): boolean {
    return !this.lost && this.members.every((member) => member.isConnected !== false);
  }

  get inFlight(): number {
    let total = 0;
    for (const member of this.members) total += member.inFlight;
    return total;
  }

  setCompletionHandler(handler: CompletionHandler): void {
    this.handler = handler;
  }

  submit(command: number, flags: number, offsetBytes: number, lengthBytes: number, data: Uint8Array | null, token: number): void {
    if (command === kCmdFlush) {
      assert(!this.flushes.has(token), 'a FLUSH token is in flight once');
      this.flushes.set(token, { remaining: this.members.length, errno: 0 });
      for (let index = 0; index < this.members.length; index += 1) {
        this.pending[index] = (this.pending[index] as number) + 1;
        (this.members[index] as GroupMember).submit(command, flags, offsetBytes, lengthBytes, data, token);
      }
      return;
    }
    const index = this.pick();
    this.pending[index] = (this.pending[index] as number) + 1;
    (this.members[index] as GroupMember).submit(command, flags, offsetBytes, lengthBytes, data, token);
  }

  /** The connection with the fewest pending requests, starting after the last pick. */
  private pick(): number {
    const count = this.members.length;
    let best = this.next;
    let bestPending = this.pending[best] as number;
    for (let step = 1; step < count && bestPending > 0; step += 1) {
      const index = (this.next + step) % count;
      const pending = this.pending[index] as number;
      if (pending < bestPending) {
        best = index;
        bestPending = pending;
      }
    }
    this.next = (best + 1) % count;
    return best;
  }

  private onMemberComplete(index: number, token: number, errno: number): void {
    this.pending[index] = (this.pending[index] as number) - 1;
    if (this.flushes.size > 0) {
      const flush = this.flushes.get(token);
      if (flush !== undefined) {
        if (flush.errno === 0) flush.errno = errno;
        flush.remaining -= 1;
        if (flush.remaining > 0) return;
        this.flushes.delete(token);
        this.handler(token, flush.errno);
        return;
      }
    }
    this.handler(token, errno);
  }

  private onMemberClose(error: EnbdError | null): void {
    if (this.lost) return;
    this.lost = true;
    this.onClose?.(error);
  }

  async getExtents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    return await (this.members[this.pick()] as GroupMember).getExtents(offsetBytes, lengthBytes);
  }

  /** Fences every connection; true only when every one is fenced. */
  async fence(timeoutMs: number): Promise<boolean> {
    const results = await Promise.all(this.members.map(async (member) => {
      if (member.fence !== undefined) return await member.fence(timeoutMs);
      await member.close();
      return true;
    }));
    return results.every((fenced) => fenced);
  }

  async close(): Promise<void> {
    await Promise.all(this.members.map(async (member) => await member.close()));
  }
}
