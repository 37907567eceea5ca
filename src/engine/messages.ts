/**
 * Every message and shared structure that crosses between the session master and a
 * connection actor (worker or inline). Plain data only: structured clone keeps SABs shared and
 * drops Error classes, so failures travel as PlainError.
 * Threads: both sides.
 */
import type { BlockSizes, DeviceFeatures, Extent } from '../core/block-device.js';
import type { PlainError } from '../core/errors.js';
import type { RingBuffers } from '../ring/request-ring.js';
import type { LegKind } from '../stubs/open-leg.js';

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
}

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
  stats(): Promise<LegStats>;
  getExtents(offsetBytes: number, lengthBytes: number): Promise<Extent[]>;
  pause(): Promise<void>;
  setLogLevel(level: string): Promise<void>;
  resume(): Promise<void>;
  shutdown(): Promise<void>;
}
