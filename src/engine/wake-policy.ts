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
 * - Default budget by CPUs this process may run on (os.availableParallelism(), which honours
 *   taskset): 0 up to kSpinCpusMin - 1 CPUs, kActorSpinMicrosDefault / kMasterSpinMicrosDefault
 *   from kSpinCpusMin on. On one CPU a spinning thread only delays the producer it waits for;
 *   on this project's 2-vCPU hosts (fio, the legs and the mirror's threads sharing them) a 50 us
 *   poll caught the next publish in under 3 % of its windows and cost CPU per request, so 2
 *   CPUs get no spin either (bench/README.md, "Actor wake-ups"). With 4+ CPUs the budget is
 *   the design's guess, not measured here. ENBD_SPIN_US overrides both budgets (tuning and the
 *   bench's A/B; a number of microseconds).
 *
 * Invariants: budgets are finite integers >= 0 and at most kSpinMicrosMax.
 */
import { availableParallelism } from 'node:os';

/** Upper bound of a budget: a consumer never polls longer than this before sleeping. */
export const kSpinMicrosMax = 1000;
/** Fewest CPUs at which the default budgets are non-zero. */
export const kSpinCpusMin = 4;
/** Default actor budget with kSpinCpusMin or more CPUs (see bench/README.md, "Actor wake-ups"). */
export const kActorSpinMicrosDefault = 50;
/** Default master budget with kSpinCpusMin or more CPUs. */
export const kMasterSpinMicrosDefault = 50;

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
  if (cpus < kSpinCpusMin) return { actorSpinMicros: 0, masterSpinMicros: 0 };
  return { actorSpinMicros: kActorSpinMicrosDefault, masterSpinMicros: kMasterSpinMicrosDefault };
}

export { clampMicros as clampSpinMicros };
