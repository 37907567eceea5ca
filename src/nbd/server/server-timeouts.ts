/**
 * NBD server, the two per-connection timeouts: a handshake must finish within the handshake
 * timeout; a client in the middle of a request that sends nothing for the payload timeout is
 * disconnected.
 *
 * Thread: main thread (session master).
 *
 * Design notes
 * No timer per connection or request: the server's sweep calls `check` every few hundred ms
 * with the time since its previous sweep (`creditMs`, 0 when that sweep came late: a client
 * is not blamed for our own stall). A connection accepted since the previous sweep is
 * credited only its own age. The receive path pays one counter increment per chunk
 * (`receivedChunks`); silence is "no new chunk since the previous sweep".
 *
 * A connection draining after DISC or the client's EOF is closed after kDisconnectDrainMs
 * of credited time (the same bound a graceful server close gives its clients), so a client
 * that stops reading its replies, or a device that keeps buffers, cannot hold it forever.
 *
 * Invariants:
 * - Credited time only grows while the client owes bytes (silence) or is in the handshake;
 *   time the server holds the connection paused never counts (the caller says `owesBytes`).
 */

export const enum TimeoutVerdict {
  None = 0,
  Handshake = 1,
  Silence = 2,
  Drain = 3,
}

/** How long a connection may drain (answer what it received) after DISC or the client's EOF. */
export const kDisconnectDrainMs = 10_000;

export class ConnectionClock {
  private lastCheckedMs = performance.now();
  private handshakeWaitedMs = 0;
  /** Chunks received (bumped by the receive path). */
  receivedChunks = 0;
  private seenChunks = 0;
  private silentMs = 0;
  private drainedMs = 0;

  /**
   * One sweep (0 disables a timeout): Handshake when the handshake has not finished after
   * `handshakeTimeoutMs` of credited time, Silence when the client owed bytes and sent none
   * for `payloadTimeoutMs` of credited time, Drain when it has been `draining` (after DISC or
   * EOF) for kDisconnectDrainMs of credited time.
   */
  check(
    nowMs: number,
    creditMs: number,
    handshakeTimeoutMs: number,
    payloadTimeoutMs: number,
    inHandshake: boolean,
    owesBytes: boolean,
    draining = false,
  ): TimeoutVerdict {
    // A connection accepted since the previous sweep is credited only its own age.
    const credit = Math.min(creditMs, nowMs - this.lastCheckedMs);
    this.lastCheckedMs = nowMs;
    if (draining) {
      this.drainedMs += credit;
      if (this.drainedMs >= kDisconnectDrainMs) return TimeoutVerdict.Drain;
    }
    if (inHandshake) {
      this.handshakeWaitedMs += credit;
      if (handshakeTimeoutMs > 0 && this.handshakeWaitedMs >= handshakeTimeoutMs) return TimeoutVerdict.Handshake;
      return TimeoutVerdict.None;
    }
    if (payloadTimeoutMs <= 0 || !owesBytes) {
      this.silentMs = 0;
      return TimeoutVerdict.None;
    }
    if (this.receivedChunks !== this.seenChunks) {
      // Bytes arrived since the previous sweep: the silence starts again.
      this.seenChunks = this.receivedChunks;
      this.silentMs = 0;
      return TimeoutVerdict.None;
    }
    this.silentMs += credit;
    return this.silentMs >= payloadTimeoutMs ? TimeoutVerdict.Silence : TimeoutVerdict.None;
  }
}
