/**
 * One promise raced against a timer: `withTimeout(promise, ms, fallback)` settles as `promise`
 * does, or with `fallback` once `ms` have passed, whichever comes first. The timer is cleared
 * on every path, so a settled race leaves nothing behind that keeps the event loop alive.
 * Thread: any (the caller's event loop).
 *
 * Design notes: the fallback is a value, not an error, so callers branch on it without a
 * try/catch (null for "no answer", -1 for "no errno", false for "did not settle"). A rejection
 * of `promise` before the timer fires rejects the race (callers that want it as the fallback
 * add `.catch(() => fallback)` themselves). A late settlement of `promise` after the timer is
 * ignored here; the caller owns any cleanup of the work it started.
 * Invariants: exactly one timer per call, cleared before the returned promise settles.
 */
import { assert } from './assert.js';

export async function withTimeout<T, F>(promise: PromiseLike<T>, timeoutMs: number, fallback: F): Promise<T | F> {
  assert(Number.isFinite(timeoutMs), 'timeoutMs is finite');
  let timer: NodeJS.Timeout | undefined;
  const expired = new Promise<F>((resolve) => {
    timer = setTimeout(() => resolve(fallback), Math.max(0, timeoutMs));
  });
  try {
    return await Promise.race([promise, expired]);
  } finally {
    clearTimeout(timer);
  }
}

/** True when `promise` fulfils within `timeoutMs`, false when the timer fires first. */
export async function settlesWithin(promise: PromiseLike<unknown>, timeoutMs: number): Promise<boolean> {
  return await withTimeout(Promise.resolve(promise).then(() => true), timeoutMs, false);
}
