/**
 * The shape of a mirror's resync window: how many copies a resyncing leg keeps in flight, how
 * large each may be, which clean gaps are copied along, and how much of the ring they may hold.
 * Kept out of mirror.ts so the numbers and their reasons live in one place.
 *
 * Thread: main thread (called when a resync starts).
 *
 * Design notes
 * - Copies hold ring slots (a 4 KiB copy holds a whole slot): their footprint is capped at
 *   three quarters of the ring (kResyncRingShare), so client requests always find a quarter of
 *   the slots free, and more as copies end (the window shrinks to Resync's kBusyCopies, 16,
 *   within 50 ms of a client request); within that, `resyncLanes` (default 192) copies at most.
 *   4 KiB copies: 192 in flight with the default ring (was 16 lanes: per copy, 128 in flight
 *   made 1.1-1.35 syscalls and 0.36-0.45 context switches in the process, 16 made 2.2-2.4 and
 *   0.85-0.96; a scattered 4 KiB resync is bound by the latency of a copy through three threads
 *   and two legs, not by a CPU: 512 in flight (a 1024 x 64 KiB ring) copied ~1.3-2x faster than
 *   128, see bench/README "Resync window depth"); 1 MiB copies of a 256 KiB-slot ring: 48 in
 *   flight (48 MiB, three quarters of the default ring).
 * - Gap: 64 KiB of clean chunks between two dirty runs are copied with them. A copy's fixed
 *   cost (two requests, three thread hops with chained copies, the range lock) is worth far more than 64 KiB of
 *   memcpy and socket bandwidth on these legs; the bytes copied then exceed the dirty bytes.
 *   Not with on-leg metadata: a copy may write a chunk only while its bit is durable on every
 *   admitted leg (the keeper's write intent, invariant I1 of meta-keeper.ts), and a clean gap
 *   chunk's bit is not set (its chunks are 64 KiB or more there anyway, most often more than
 *   the gap).
 *
 * Invariants:
 * - maxCopyBytes <= the ring's largest request; maxFootprintBytes = three quarters of the ring's
 *   slots (rounded down) times the slot size.
 * - gapBytes = 0 with on-leg metadata.
 */
import type { RequestRing } from '../ring/request-ring.js';
import type { ResyncWindow } from './resync.js';

export const kDefaultResyncCopies = 192;
/** The share of the ring's slots copies in flight may hold (the rest stays for clients). */
export const kResyncRingShare = 3 / 4;
export const kDefaultResyncCopyBytes = 1024 * 1024;
export const kDefaultResyncGapBytes = 64 * 1024;

/**
 * The MirrorOptions fields the window reads (declared here, not picked from mirror.ts, so this
 * module does not import its importer: no cycle, not even a type-only one).
 */
export interface ResyncWindowOptions {
  resyncLanes?: number | undefined;
  resyncCopyBytes?: number | undefined;
  resyncGapBytes?: number | undefined;
  /** Set when the legs carry on-leg metadata (only its presence is read). */
  metadata?: unknown;
}

export function resyncWindow(options: ResyncWindowOptions, ring: RequestRing): ResyncWindow {
  return {
    maxCopies: Math.max(1, options.resyncLanes ?? kDefaultResyncCopies),
    maxCopyBytes: Math.min(options.resyncCopyBytes ?? kDefaultResyncCopyBytes, ring.maxRequestBytes),
    gapBytes: options.metadata !== undefined ? 0 : Math.max(0, options.resyncGapBytes ?? kDefaultResyncGapBytes),
    maxFootprintBytes: Math.floor(ring.slotCount * kResyncRingShare) * ring.slotBytes,
  };
}
