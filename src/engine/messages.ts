/**
 * Every message and shared structure that crosses between the session master and a
 * connection actor (worker or inline). Plain data only: structured clone keeps SABs shared and
 * drops Error classes, so failures travel as PlainError.
 * Threads: both sides.
 */
import type { BlockDevice, BlockSizes, DeviceFeatures, Extent } from '../core/block-device.js';
import type { PlainError } from '../core/errors.js';
import type { RingBuffers } from '../ring/request-ring.js';
import type { LegKind } from '../core/status-types.js';

export type CopyMode = 'shared' | 'per-leg';
export type Placement = 'workers' | 'inline';

/** workerData of a connection actor. */
export interface LegActorInit {
  legIndex: number;
  uri: string;
  ring: RingBuffers;
  /** master -> actor SPSC queue of slot indices. */
  dispatch: SharedArrayBuffer;
  /** actor -> master SPSC queue of completed slot indices. */
  completion: SharedArrayBuffer;
  /** The master's doorbell, rung after publishing completions. */
  doorbell: SharedArrayBuffer;
  /**
   * Int32 per leg: bumped (Atomics.add) by the actor when its leg's connection drops on its
   * own; the master compares it with the value it last saw after each doorbell.
   */
  events: SharedArrayBuffer;
  logLevel: string;
  connectTimeoutMs: number;
  requestTimeoutMs: number;
  /**
   * Probe an idle leg every this many ms with a cheap READ (0 = never); a probe that fails or
   * is not answered within the request timeout (or this interval, when that is 0) is reported
   * as a drop.
   */
  idleProbeMs?: number;
  /** Connections per NBD leg when its URI does not say (used with multi-conn only; default 1). */
  connections?: number;
  /**
   * Chained resync copies (src/ring/chain-inbox.ts): every leg's inbox in one SAB. Absent: the
   * actor never chains (copy READs go back to the master as before).
   */
  chain?: SharedArrayBuffer;
  /** µs the actor polls its empty dispatch queue before sleeping (src/engine/wake-policy.ts; default 0). */
  spinMicros?: number;
}

/** Opens a leg's server stub (the default: src/stubs/open-leg.ts; tests inject fault legs). */
export type LegDeviceOpener = (legIndex: number, uri: string, options: { requestTimeoutMs: number; connectTimeoutMs: number }) => Promise<BlockDevice>;

/** Result of a fence or probe. */
export type LegCheck = { ok: true } | { ok: false; reason: string };

export interface LegInfo {
  kind: LegKind;
  uri: string;
  sizeBytes: number;
  features: DeviceFeatures;
  blockSizes: BlockSizes;
  description: string;
}

export interface LegStats {
  /** Leg index (filled in by the master). */
  index?: number;
  requests: number;
  bytesRead: number;
  bytesWritten: number;
  errors: number;
  inFlight: number;
  connected: boolean;
  /** Sum and count of this leg's request latencies (issue to answer), ms. */
  latencySumMs: number;
  latencyCount: number;
}

/** Per-leg copy mode: the payload travels as a private copy instead of a slot pointer. */
export interface CopyMessage {
  slot: number;
  data: Uint8Array;
}

/** Control plane of a connection actor (comlink for workers, direct calls inline). */
export interface LegActorApi {
  open(): Promise<LegInfo | { error: PlainError }>;
  /** Closes the leg's connection (failing what it still holds) and opens a new one. */
  reconnect(): Promise<LegInfo | { error: PlainError }>;
  /** Closes the leg's connection; requests fail with EIO until reconnect(). */
  disconnect(): Promise<void>;
  /**
   * Fences the leg: the actor stops using its connection at once (everything it had in flight
   * is acked with EIO now, new work fails with EIO), then makes sure the leg's server can no
   * longer apply anything sent on it: NBD legs send NBD_CMD_DISC (the server finishes what it
   * holds, then closes) and wait for the server's close; file legs wait for their pending I/O.
   * ok once that is proven; not ok after `timeoutMs` (the old connection is kept: a later
   * fence() waits on it again). Idempotent; ok at once when there is no old connection.
   */
  fence(timeoutMs: number): Promise<LegCheck>;
  /**
   * Probation check of a freshly (re)connected leg, outside the ring: READ one block at
   * offset 0, WRITE the same bytes back, FLUSH (when supported), all within `timeoutMs`.
   */
  probe(timeoutMs: number): Promise<LegCheck>;
  stats(): Promise<LegStats>;
  getExtents(offsetBytes: number, lengthBytes: number): Promise<Extent[]>;
  pause(): Promise<void>;
  setLogLevel(level: string): Promise<void>;
  resume(): Promise<void>;
  shutdown(): Promise<void>;
}
