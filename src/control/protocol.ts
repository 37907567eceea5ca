/**
 * Messages of the control socket (inside the frames of frame.ts) and the shapes of their
 * results. Plain data only: both ends (daemon and CLI) import this file, and it imports only
 * core (errors.ts for ProtocolError's base, the types-only status-types.ts): nothing above it.
 *
 * Threads: the daemon's main thread and the CLI client's.
 *
 * Design notes
 * | direction        | message                                                   |
 * |------------------|-----------------------------------------------------------|
 * | client -> daemon | { id, method, params }                                    |
 * | daemon -> client | { id, ok: true, result } or { id, ok: false, error }      |
 * | daemon -> client | { event, data }  (only after a successful 'subscribe')    |
 *
 * - id: a non-negative safe integer chosen by the client; the answer carries it back. Answers
 *   may come out of order (a slow leg.add does not hold up a status).
 * - error: { code, message }; code is the engine's EnbdError code (ENBD_ERR_*) or one of
 *   kControlErrorCodes. The CLI prints the message.
 * - A frame that is not a request of this shape closes the connection (the daemon logs why);
 *   an unknown method is answered with ENBD_CTL_UNKNOWN_METHOD and then closes it too.
 */
import { EnbdError } from '../core/errors.js';
import type { BitmapSnapshot, KeeperStatus, ResyncProgress, VerifyProgress, VerifyStatus } from '../core/status-types.js';

/** Checkpoint (changed-block tracking) methods: src/control/checkpoint-handlers.ts. */
export const kCheckpointMethods = ['checkpoint.create', 'checkpoint.list', 'checkpoint.remove', 'checkpoint.freeze', 'checkpoint.runs'] as const;
export type CheckpointMethod = (typeof kCheckpointMethods)[number];

/** A checkpoint as the daemon reports it (the engine's CheckpointInfo, plain data). */
export interface CheckpointView {
  name: string;
  createdMs: number;
  state: 'active' | 'frozen';
  granularityBytes: number;
  changedBytes: number;
}

export interface CheckpointListResult {
  granularityBytes: number;
  /** The checkpoints live in the on-leg metadata (false: --metadata none, memory only). */
  persistent: boolean;
  checkpoints: CheckpointView[];
}

export interface CheckpointActionResult {
  checkpoint: CheckpointView;
  persistent: boolean;
}

export interface CheckpointFreezeResult {
  frozen: CheckpointView;
  created: CheckpointView;
  persistent: boolean;
  sizeBytes: number;
}

export interface CheckpointRunsResult {
  name: string;
  sizeBytes: number;
  /** Changed runs from the asked offset, in order; `nextOffsetBytes` null when the end was reached. */
  runs: Array<{ offsetBytes: number; lengthBytes: number }>;
  nextOffsetBytes: number | null;
}

export const kCheckpointRunsMax = 4096;

export const kControlMethods = [
  'status',
  'subscribe',
  'leg.fail',
  'leg.reconnect',
  'leg.remove',
  'leg.add',
  'leg.bitmap',
  'ring.slots',
  'resync.pause',
  'resync.resume',
  'resync.rate',
  'verify.start',
  'verify.stop',
  'log.level',
  'repl.eval',
  ...kCheckpointMethods,
] as const;

export type ControlMethod = (typeof kControlMethods)[number];

export function isControlMethod(value: string): value is ControlMethod {
  return (kControlMethods as readonly string[]).includes(value);
}

export const kControlErrorCodes = {
  badRequest: 'ENBD_CTL_BAD_REQUEST',
  badParams: 'ENBD_CTL_BAD_PARAMS',
  unknownMethod: 'ENBD_CTL_UNKNOWN_METHOD',
  busy: 'ENBD_CTL_BUSY',
  internal: 'ENBD_CTL_INTERNAL',
} as const;

export interface ControlRequest {
  id: number;
  method: string;
  params: Record<string, unknown>;
}

export interface ControlErrorBody {
  code: string;
  message: string;
}

export type ControlResponse =
  | { id: number; ok: true; result: unknown }
  | { id: number; ok: false; error: ControlErrorBody };

export interface ControlEvent {
  event: string;
  data: unknown;
}

export type ServerMessage = ({ kind: 'response' } & ControlResponse) | ({ kind: 'event' } & ControlEvent);

/** A frame that does not hold a message of the expected shape. */
export class ProtocolError extends EnbdError {
  declare readonly code: typeof kControlErrorCodes.badRequest;
  /** The request id when it could be read (the daemon then answers before closing). */
  readonly id: number | null;
  constructor(message: string, id: number | null = null) {
    super(kControlErrorCodes.badRequest, message);
    this.name = 'ProtocolError';
    this.id = id;
  }
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return false;
  const prototype = Object.getPrototypeOf(value) as unknown;
  return prototype === Object.prototype || prototype === null;
}

function isRequestId(value: unknown): value is number {
  return typeof value === 'number' && Number.isSafeInteger(value) && value >= 0;
}

const kMethodBytesMax = 64;

/** Checks a decoded frame from a client; throws ProtocolError naming what is wrong. */
export function parseRequest(value: unknown): ControlRequest {
  if (!isPlainObject(value)) throw new ProtocolError(`a request must be a map, got ${describeType(value)}`);
  const id = value['id'];
  if (!isRequestId(id)) throw new ProtocolError(`request id must be a non-negative integer, got ${describeType(id)}`);
  const method = value['method'];
  if (typeof method !== 'string' || method.length === 0 || method.length > kMethodBytesMax) {
    throw new ProtocolError(`request ${id}: method must be a string of 1..${kMethodBytesMax} characters`, id);
  }
  const params = value['params'] ?? {};
  if (!isPlainObject(params)) throw new ProtocolError(`request ${id} (${method}): params must be a map, got ${describeType(params)}`, id);
  return { id, method, params: { ...params } };
}

/** Checks a decoded frame from the daemon; throws ProtocolError naming what is wrong. */
export function parseServerMessage(value: unknown): ServerMessage {
  if (!isPlainObject(value)) throw new ProtocolError(`a daemon message must be a map, got ${describeType(value)}`);
  if (typeof value['event'] === 'string') return { kind: 'event', event: value['event'], data: value['data'] };
  const id = value['id'];
  if (!isRequestId(id)) throw new ProtocolError('daemon message has neither an event name nor a request id');
  if (value['ok'] === true) return { kind: 'response', id, ok: true, result: value['result'] };
  const error = value['error'];
  if (value['ok'] !== false || !isPlainObject(error) || typeof error['message'] !== 'string') {
    throw new ProtocolError(`daemon answer ${id} is neither a result nor an error`);
  }
  const code = typeof error['code'] === 'string' ? error['code'] : kControlErrorCodes.internal;
  return { kind: 'response', id, ok: false, error: { code, message: error['message'] } };
}

function describeType(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  if (typeof value === 'object') return 'an object of another kind';
  return typeof value === 'string' ? 'a string' : `${typeof value} ${String(value).slice(0, 32)}`;
}

// ---- results ------------------------------------------------------------------------------

/** The engine's resync progress, as the daemon sends it (a plain shape from core/status-types.ts). */
export type ResyncProgressView = ResyncProgress;

export interface LegView {
  index: number;
  /** The leg's stable name (enbd leg fail NAME; the metrics' leg label). */
  name: string;
  uri: string;
  kind: string;
  state: string;
  failureReason: string | null;
  inFlight: number;
  /** Mean latency of the leg's requests since start (ms); null before its first request or when its actor did not answer. */
  latencyMeanMs: number | null;
  requests: number | null;
  errors: number | null;
  connected: boolean | null;
  dirtyBytes: number;
  reconnectAttempts: number;
  /** Times the leg left the admitted states since start, and within the faulty window. */
  failures: number;
  recentFailures: number;
  resync: ResyncProgressView | null;
  /** Bytes copied to this leg by resyncs since start. */
  resyncedBytes: number;
  /** Its member slot and leg UUID in the on-leg metadata (null: --metadata none). */
  member: { slotIndex: number; legUuid: string } | null;
  /** Client reads it served, its recent read latency (EWMA, ms), read errors repaired (issue 14). */
  reads?: number;
  readLatencyMs?: number | null;
  readRepairs?: number;
  /** Serves reads only when no other leg can; with write-behind, bytes it is behind by. */
  writeMostly?: boolean;
  behindBytes?: number;
  /** With write-behind: writes acknowledged before it had them, and writes sent to it synchronously at the bound. */
  deferredWrites?: number;
  boundHits?: number;
}

/** The on-leg metadata of the array (null: --metadata none): the keeper's own status. */
export type MetadataView = KeeperStatus;

export interface LatencyView {
  count: number;
  meanMs: number;
}

export interface StatusResult {
  export: { name: string; sizeBytes: number; clients: number };
  daemon: { pid: number; uptimeSeconds: number; logLevel: string; control: string };
  legs: LegView[];
  resync: { paused: boolean; minBytesPerSecond: number; maxBytesPerSecond: number };
  stats: {
    requests: Record<string, number>;
    writeRequests: number;
    writeCopies: number;
    writeBytesCopied: number;
    ringSlotsInUse: number;
    ringSlots: number;
    payloadBytesCopied: number;
    payloadBytesDirect: number;
  };
  /** Client request latency by kind (read, write, flush, ...), since start. */
  latency: Record<string, LatencyView>;
  metadata: MetadataView | null;
  /** Online verify: the running (or last) verify, totals, checksum-resync counts. */
  verify?: VerifyView;
}

/** A leg's dirty map: the engine's snapshot as it is (firstRuns: at most kBitmapRunsMax). */
export type BitmapResult = BitmapSnapshot;

/** The engine's verify status (a type-only import: no engine code). */
export type VerifyView = VerifyStatus;
export type VerifyProgressView = VerifyProgress;

export interface SlotView {
  slot: number;
  state: string;
  command: string;
  offsetBytes: number;
  lengthBytes: number;
  spanSlots: number;
}

export interface SlotsResult {
  slotCount: number;
  slotBytes: number;
  freeCount: number;
  /** Live requests (runs of slots). */
  inUse: number;
  /** The first in-use requests (at most kSlotsListedMax). */
  requests: SlotView[];
}

export interface ReplEvalResult {
  /** util.inspect of the value, or the error's text ("Uncaught ..."); bounded in length. */
  output: string;
  threw: boolean;
  /** The code is an incomplete statement (the client asks for more lines). */
  incomplete: boolean;
}

export const kBitmapRunsMax = 16;
export const kSlotsListedMax = 32;

export interface LegActionResult {
  leg: number;
  name: string;
  state: string;
}

export interface ResyncRatesResult {
  minBytesPerSecond: number;
  maxBytesPerSecond: number;
}

export interface LogLevelResult {
  level: string;
  previous: string;
}

/** The result type of each method (what ControlClient.call resolves with). */
export interface ControlResults {
  status: StatusResult;
  subscribe: { events: string[] };
  'leg.fail': LegActionResult;
  'leg.reconnect': LegActionResult;
  'leg.remove': LegActionResult;
  'leg.add': LegActionResult;
  'leg.bitmap': BitmapResult;
  'ring.slots': SlotsResult;
  'resync.pause': { paused: boolean };
  'resync.resume': { paused: boolean };
  'resync.rate': ResyncRatesResult;
  'verify.start': VerifyProgressView;
  'verify.stop': { stopped: boolean; verify: VerifyProgressView | null };
  'log.level': LogLevelResult;
  'repl.eval': ReplEvalResult;
  'checkpoint.create': CheckpointActionResult;
  'checkpoint.list': CheckpointListResult;
  'checkpoint.remove': CheckpointActionResult;
  'checkpoint.freeze': CheckpointFreezeResult;
  'checkpoint.runs': CheckpointRunsResult;
}

/** Events pushed to subscribers. */
export const kControlEvents = ['leg-state', 'leg-added', 'leg-removed', 'resync-progress', 'log-level'] as const;
