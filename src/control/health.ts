/**
 * The array's health as an exit code, for scripts: `enbd status` and `enbd wait` exit with it,
 * like `mdadm --detail --test`. Pure functions of the status result (no I/O).
 *
 * Thread: the CLI's main thread.
 *
 * Design notes
 * | code | meaning                                                    | mdadm --detail --test |
 * |------|------------------------------------------------------------|-----------------------|
 * | 0    | every leg (removed legs do not count) is in-sync           | 0 array ok            |
 * | 1    | at least one leg in-sync, another one is not (any state)   | 1 degraded            |
 * | 2    | no leg is in-sync (resyncing legs do not count)            | 2 dead / unusable     |
 * | 4    | the daemon could not be asked (no socket, refused, ...)    | 4 cannot get info     |
 * `enbd wait` exits 0 once the code is 0, 1 when its --timeout passes first, 4 when the daemon
 * cannot be reached or goes away while it waits.
 *
 * Invariant: a code of 0 means every listed non-removed leg said in-sync in that one status.
 */
import { assert } from '../core/assert.js';
import type { LegView } from './protocol.js';

export const kExitInSync = 0;
export const kExitDegraded = 1;
export const kExitNoInSyncLeg = 2;
export const kExitUnreachable = 4;

export type HealthCode = typeof kExitInSync | typeof kExitDegraded | typeof kExitNoInSyncLeg;

/** 0 every leg in sync, 1 degraded or resyncing, 2 no in-sync leg. */
export function healthCode(legs: ReadonlyArray<Pick<LegView, 'state'>>): HealthCode {
  const live = legs.filter((leg) => leg.state !== 'removed');
  const inSync = live.filter((leg) => leg.state === 'in-sync').length;
  assert(inSync <= live.length, 'in-sync legs are a subset of the live legs');
  if (inSync === 0) return kExitNoInSyncLeg;
  return inSync === live.length ? kExitInSync : kExitDegraded;
}

/** "leg b resyncing 45.0%, leg c failed": the legs that are not in sync, by name, for messages. */
export function describeLagging(legs: ReadonlyArray<Pick<LegView, 'name' | 'state' | 'resync'>>): string {
  const lagging = legs.filter((leg) => leg.state !== 'removed' && leg.state !== 'in-sync');
  if (lagging.length === 0) return 'every leg in sync';
  return lagging
    .map((leg) => {
      const resync = leg.resync;
      if (resync === null || resync.bytesTotal <= 0) return `leg ${leg.name} ${leg.state}`;
      const percent = (((resync.bytesTotal - resync.bytesLeft) / resync.bytesTotal) * 100).toFixed(1);
      return `leg ${leg.name} ${leg.state} ${percent}%`;
    })
    .join(', ');
}

const kDurationUnits: Record<string, number> = { '': 1, ms: 0.001, s: 1, m: 60, h: 3600 };

/**
 * A duration in seconds: "30", "1.5", "500ms", "2s", "1m", "1h". Returns null when the text is
 * not one (the caller names its flag in the error).
 */
export function parseSeconds(text: string): number | null {
  const match = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h)?$/i.exec(text.trim());
  if (match === null || match[1] === undefined) return null;
  const unit = kDurationUnits[(match[2] ?? '').toLowerCase()];
  if (unit === undefined) return null;
  const seconds = Number(match[1]) * unit;
  return Number.isFinite(seconds) ? seconds : null;
}
