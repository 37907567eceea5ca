/**
 * Wake-up policy of the ring's consumers (issue 15, "actor wake-ups"): how long a connection
 * actor keeps polling its dispatch queue, and the master its completion queues, after they ran
 * empty, before announcing that they sleep (Atomics.waitAsync). A consumer that has not
 * announced sleeping is never notified, so a busy pipeline runs without cross-thread
 * Atomics.notify (each one in Node posts a task to the sleeper's event loop: an eventfd write
 * and a wake-up).
 *
 * Thread: any (pure functions; the master computes the budgets and hands them to the actors in
 * LegActorInit).
 *
 * Design notes
 * - The poll is a bounded event-loop spin, not a busy loop: the consumer re-checks its queue
 *   once per event-loop turn (setImmediate), so its sockets are serviced between checks (libuv
 *   polls with a zero timeout while an immediate is pending). It ends at the first non-empty
 *   check or when `spinMicros` have passed since the queue ran empty; then the consumer sleeps
 *   as before (the lost-wakeup protocol of src/ring/spsc-queue.ts is unchanged: a spinning
 *   consumer simply has its sleeping flag at 0).
 * - Default: no spin, on any CPU count (defaultWakePolicy takes the CPU count so a measured
 *   per-count default can be added). On one CPU a spinning thread only delays the producer it
 *   waits for; on this project's 2-vCPU hosts (fio, the legs and the mirror's threads sharing
 *   them) a 50 us poll caught the next publish for ~0.1-1.5 % of requests and cost CPU per
 *   request (bench/README.md, "Actor wake-ups"); hosts with more CPUs were not measured, and a
 *   model-test failure seen once with ENBD_SPIN_US=50 (not reproduced from its seed) is not
 *   explained yet. ENBD_SPIN_US turns it on (tuning and the bench's A/B; microseconds).
 *
 * Invariants: budgets are finite integers >= 0 and at most kSpinMicrosMax.
 */
import { availableParallelism } from 'node:os';

/** Upper bound of a budget: a consumer never polls longer than this before sleeping. */
export const kSpinMicrosMax = 1000;
/** Default actor budget (see the design notes and bench/README.md, "Actor wake-ups"). */
export const kActorSpinMicrosDefault = 0;
/** Default master budget. */
export const kMasterSpinMicrosDefault = 0;

export interface WakePolicy {
  /** Connection actors: µs of polling the dispatch queue after it ran empty. */
  actorSpinMicros: number;
  /** Master: µs of polling the completion queues after they ran empty. */
  masterSpinMicros: number;
}

function clampMicros(value: number): number {
  if (!Number.isFinite(value) || value < 0) return 0;
  return Math.min(kSpinMicrosMax, Math.floor(value));
}

/** The budgets for this process: ENBD_SPIN_US if set, else by CPU count. */
export function defaultWakePolicy(cpus = availableParallelism(), env: NodeJS.ProcessEnv = process.env): WakePolicy {
  const override = env['ENBD_SPIN_US'];
  if (override !== undefined && override.trim() !== '' && Number.isFinite(Number(override))) {
    const micros = clampMicros(Number(override));
    return { actorSpinMicros: micros, masterSpinMicros: micros };
  }
  // One CPU: never spin (a spinning thread only delays the producer it waits for), whatever
  // the defaults for more CPUs become.
  if (cpus <= 1) return { actorSpinMicros: 0, masterSpinMicros: 0 };
  return { actorSpinMicros: kActorSpinMicrosDefault, masterSpinMicros: kMasterSpinMicrosDefault };
}

export { clampMicros as clampSpinMicros };

/**
 * One consumer's bounded poll window (the design notes above), shared by the connection actor's
 * dispatch pump and the master's completion pump. The window opens at the first empty check
 * after work and closes at the next drain that finds work (a spin hit) or when the budget has
 * passed (the consumer then sleeps). Plain fields: one thread.
 */
export class SpinWindow {
  readonly budgetMs: number;
  private startMs = -1;

  constructor(budgetMicros: number) {
    this.budgetMs = budgetMicros / 1000;
  }

  /** A drain found work: true when it came while polling (a spin hit); the window closes. */
  worked(): boolean {
    const hit = this.startMs >= 0;
    this.startMs = -1;
    return hit;
  }

  /** The queue was empty: true = check again on the next turn; false = sleep now. */
  pollAgain(): boolean {
    if (this.budgetMs <= 0) return false;
    const nowMs = performance.now();
    if (this.startMs < 0) {
      this.startMs = nowMs;
      return true;
    }
    if (nowMs - this.startMs < this.budgetMs) return true;
    this.startMs = -1;
    return false;
  }
}
