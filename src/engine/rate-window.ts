/**
 * A sliding-window rate: bytes per second over the last `windowMs`, from cumulative byte counts
 * sampled at most every `stepMs`. Unlike a moving average updated only when bytes move, it falls
 * to 0 while nothing moves (a paused resync) and it is not inflated in the first moments (the
 * span is at least `minSpanMs`).
 *
 * Threads: main thread. Allocation: two fixed typed arrays, nothing per sample.
 *
 * Invariants: samples are kept in time order in a ring; rate() >= 0.
 */
export class RateWindow {
  private readonly times: Float64Array;
  private readonly totals: Float64Array;
  private head = 0;
  private count = 0;
  private startMs = 0;
  private lastTotal = 0;

  constructor(
    private readonly windowMs = 10_000,
    private readonly stepMs = 250,
    private readonly minSpanMs = 1000,
  ) {
    const slots = Math.ceil(windowMs / stepMs) + 2;
    this.times = new Float64Array(slots);
    this.totals = new Float64Array(slots);
  }

  /** Starts over at `nowMs` with `total` bytes so far. */
  reset(nowMs: number, total = 0): void {
    this.head = 0;
    this.count = 0;
    this.startMs = nowMs;
    this.lastTotal = total;
    this.push(nowMs, total);
  }

  /** The cumulative byte count at `nowMs` (kept when a step has passed since the last sample). */
  add(nowMs: number, total: number): void {
    this.lastTotal = total;
    const newest = this.times[(this.head + this.count - 1) % this.times.length] ?? 0;
    if (this.count === 0 || nowMs - newest >= this.stepMs) this.push(nowMs, total);
  }

  private push(nowMs: number, total: number): void {
    const size = this.times.length;
    if (this.count === size) {
      this.head = (this.head + 1) % size;
      this.count -= 1;
    }
    const at = (this.head + this.count) % size;
    this.times[at] = nowMs;
    this.totals[at] = total;
    this.count += 1;
  }

  /** Bytes per second over the window ending at `nowMs`. */
  rate(nowMs: number): number {
    if (this.count === 0) return 0;
    const from = nowMs - this.windowMs;
    const size = this.times.length;
    // The oldest sample at or after the window start (or the oldest there is).
    let index = 0;
    while (index < this.count - 1 && (this.times[(this.head + index) % size] as number) < from) index += 1;
    const baseTime = Math.max(this.startMs, Math.min(this.times[(this.head + index) % size] as number, nowMs));
    const baseTotal = this.totals[(this.head + index) % size] as number;
    const span = Math.max(this.minSpanMs, nowMs - baseTime);
    return Math.max(0, ((this.lastTotal - baseTotal) * 1000) / span);
  }
}
