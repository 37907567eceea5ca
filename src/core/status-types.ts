/**
 * Plain-data shapes that the engine reports and the messages between threads and processes
 * carry: a leg's kind, a resync's progress, a dirty map's snapshot, the on-leg metadata's
 * status and member records.
 * Types only: no code, no imports. They live at the bottom so that the shared message modules
 * (src/engine/messages.ts between master and actors, src/control/protocol.ts between daemon
 * and CLI) import nothing above them; the modules that produce these values (stubs/open-leg,
 * engine/resync, engine/meta-keeper, engine/snapshots, meta/superblock) import them from here
 * and re-export them.
 *
 * Threads: any (erased at run time).
 */

/** Which server stub a leg URI opens (src/stubs/open-leg.ts). */
export type LegKind = 'nbd' | 'file';

/**
 * A member's role as this leg last saw it:
 * - in-sync: holds every write up to the array's `events`.
 * - needs-resync: missed writes; the write-intent bitmap covers them (bitmap resync).
 * - needs-full-sync: contents unknown (a new leg, or `enbd create` without --assume-clean).
 * - removed: the slot is empty.
 */
export type MemberState = 'in-sync' | 'needs-resync' | 'needs-full-sync' | 'removed';

/** One entry of the superblock's member table (src/meta/superblock.ts). */
export interface MemberRecord {
  legUuid: string;
  state: MemberState;
  /** The last `events` value this leg knows the member reached (split-brain detection). */
  events: number;
  /** Full-sync progress of the member: bytes from offset 0 known copied (0 when none). */
  recoveryOffsetBytes: number;
  /**
   * The leg's name (src/engine/leg-names.ts) as last recorded; absent in metadata written before
   * names were recorded (and for a member never named). At start a name given on the command
   * line wins over it.
   */
  name?: string;
}

/** A resync's progress (src/engine/resync.ts). */
export interface ResyncProgress {
  leg: number;
  running: boolean;
  paused: boolean;
  bytesDone: number;
  bytesLeft: number;
  bytesTotal: number;
  bytesPerSecond: number;
  etaSeconds: number | null;
  startedAt: number;
  copiesInFlight: number;
}

/** The on-leg metadata keeper's status (src/engine/meta-keeper.ts). */
export interface KeeperStatus {
  arrayUuid: string;
  arrayName: string;
  events: number;
  bitmapChunkBytes: number;
  chunkCount: number;
  /** Chunks whose bit is durable on the legs. */
  dirtyChunks: number;
  /** Data-changing requests that waited for a bitmap write. */
  intentWaits: number;
  bitmapWrites: number;
  superblockWrites: number;
  members: MemberRecord[];
}

/** A leg's dirty map ("chunks this leg missed"): counters and its first dirty runs. */
export interface BitmapSnapshot {
  leg: number;
  deviceBytes: number;
  chunkBytes: number;
  dirtyBytes: number;
  dirtyChunks: number;
  pagesInUse: number;
  poolPages: number;
  freePages: number;
  sentinelPages: number;
  memoryBytes: number;
  /** In offset order, at most the limit asked for; the last run ends at the device's end. */
  firstRuns: Array<{ offsetBytes: number; lengthBytes: number }>;
}

/** A verify's progress (src/engine/verify.ts): the running one, or the last. */
export interface VerifyProgress {
  running: boolean;
  repair: boolean;
  /** Who started it: 'operator' or 'schedule'. */
  reason: string;
  offsetBytes: number;
  lengthBytes: number;
  /** Bytes done: checked + skipped + not compared (the bar). */
  bytesDone: number;
  bytesChecked: number;
  /** Bytes every leg reported as reading zero (not read). */
  bytesSkipped: number;
  /** Bytes not compared: fewer than two legs in sync, or a READ failed. */
  bytesUnchecked: number;
  bytesPerSecond: number;
  etaSeconds: number | null;
  mismatchChunks: number;
  repairedChunks: number;
  startedAt: number;
  finishedAt: number | null;
  stopped: boolean;
}

/** The verifier's status (src/engine/verify.ts). */
export interface VerifyStatus {
  chunkBytes: number;
  threads: number;
  /** The pool's hash: xxh64, sha256 or blake2b512. */
  algorithm: string;
  intervalMs: number;
  /** The running verify, else the last one (null: none yet). */
  current: VerifyProgress | null;
  /** Totals since start (metrics). */
  mismatchChunksTotal: number;
  checkedBytesTotal: number;
  repairedChunksTotal: number;
  /** Checksum resync, per leg: bytes found identical (not copied) and found different. */
  resyncVerify: Array<{ leg: number; matchedBytes: number; differentBytes: number }>;
}

