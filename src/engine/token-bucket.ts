/**
 * The byte-rate token bucket of the background copiers (resync.ts and verify.ts): tokens
 * accrue at the rate asked for, up to a burst of 100 ms of rate (or one request, if larger),
 * so a pause does not bank a flood. The caller passes the rate and the clock at each take (the
 * resync rate changes with client load; tests drive Date with mock timers).
 * Thread: main thread.
 *
 * Invariants:
 * - tokens <= max(bytes, rate / 10) after each take; a take that returns 0 spent `bytes`.
 * - Nothing allocated per take.
 */
export class TokenBucket {
  private tokens = 0;
  private lastRefill = 0;

  /** Tokens accrue from `nowMs` on (the rate was unlimited until now, or a run starts). */
  refillFrom(nowMs: number): void {
    this.lastRefill = nowMs;
  }

  /** Empty, accruing from `nowMs` on. */
  reset(nowMs: number): void {
    this.tokens = 0;
    this.lastRefill = nowMs;
  }

  /** Takes `bytes` at `rate` bytes/s (> 0) and returns 0, or returns the ms until they may be taken. */
  take(bytes: number, rate: number, nowMs: number): number {
    const burst = Math.max(bytes, rate / 10);
    this.tokens = Math.min(burst, this.tokens + ((nowMs - this.lastRefill) * rate) / 1000);
    this.lastRefill = nowMs;
    if (this.tokens >= bytes) {
      this.tokens -= bytes;
      return 0;
    }
    return Math.max(1, Math.ceil(((bytes - this.tokens) * 1000) / rate));
  }
}
